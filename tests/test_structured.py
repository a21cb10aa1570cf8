"""Structured outputs (`response_format`) through the real server and the official `openai` client: on a random
model, whatever it samples, the answer must parse as JSON and follow the schema. And the same from the command
line: `edgellm generate --json-schema FILE` / `--json-object`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pydantic
import pytest

from edgellm.cli import main
from tests.conftest import build_checkpoint
from tests.test_cli_errors import house_error
from tests.test_serve import CONTEXT, Server

MESSAGES = [{"role": "user", "content": "Give me a colour and a count as JSON."}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
          "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 1000}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir: Path = build_checkpoint(tmp_path_factory.mktemp("structured-llama"), "llama",
                                       max_position_embeddings=CONTEXT)
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"))
    yield srv
    srv.stop()


def chat(server: Server, response_format: dict, seed: int, **kwargs):
    return server.client().chat.completions.create(model=server.model, messages=MESSAGES, seed=seed,
                                                   temperature=1.0, response_format=response_format, **kwargs)


def test_json_object_parses(server):
    """Any object: a random model may write a string that never ends, so a seed may run out of tokens ("length",
    an unclosed prefix); every one that stops must parse, and most stop."""
    choices = [chat(server, {"type": "json_object"}, seed, max_tokens=CONTEXT // 2).choices[0] for seed in range(6)]
    stopped = [c.message.content for c in choices if c.finish_reason == "stop"]
    assert len(stopped) >= 3
    assert all(isinstance(json.loads(text), dict) for text in stopped)
    assert all(c.message.content.startswith("{") for c in choices)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_validates(server, seed):
    choice = chat(server, JSON_SCHEMA, seed, max_tokens=64).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_length_cut_is_a_prefix(server):
    """Out of tokens before the JSON closes: finish_reason "length" and a prefix of schema-shaped JSON."""
    choice = chat(server, JSON_SCHEMA, 0, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith("{")


def test_stream_concatenates_to_the_json(server):
    full = chat(server, JSON_SCHEMA, 7, max_tokens=64).choices[0].message.content
    chunks = list(chat(server, JSON_SCHEMA, 7, max_tokens=64, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full), SCHEMA)


def test_text_is_free(server):
    choice = chat(server, {"type": "text"}, 0, max_tokens=8).choices[0]
    assert choice.finish_reason == "length"


def test_completions_json_schema(server):
    choice = server.client().completions.create(model=server.model, prompt="JSON:", seed=3, temperature=1.0,
                                                max_tokens=64, extra_body={"response_format": JSON_SCHEMA}).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.text), SCHEMA)


@pytest.mark.parametrize(("response_format", "param"), [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
     "response_format.json_schema.schema"),
])
def test_unsupported_is_400(server, response_format, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, response_format, 0, max_tokens=8)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


class Pick(pydantic.BaseModel):
    colour: str
    count: int


def test_parse_with_pydantic(server):
    completions = server.client().chat.completions
    if not hasattr(completions, "parse"):
        pytest.skip("this openai client has no chat.completions.parse")
    message = completions.parse(model=server.model, messages=MESSAGES, seed=1, temperature=1.0, max_tokens=CONTEXT,
                                response_format=Pick).choices[0].message
    assert isinstance(message.parsed, Pick)


@pytest.mark.parametrize("seed", range(2))
def test_cli_json_schema(tmp_path, capsys, seed):
    """The built-in model, sampled: the JSON closes ("stop") and validates."""
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    assert main(["generate", "--prompt", "def f():", "--json-schema", str(tmp_path / "schema.json"), "--temp", "1",
                 "--seed", str(seed), "--max-tokens", "48", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_cli_json_object(capsys):
    assert main(["generate", "--prompt", "x", "--json-object", "--temp", "1", "--seed", "3", "--max-tokens", "48",
                 "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop"
    assert isinstance(json.loads(out["text"]), dict)


@pytest.mark.parametrize(("content", "needle"), [
    ('{"type": ', "cannot read a JSON schema"),
    ("[1, 2]", "a JSON schema is an object"),
    ('{"type": "nonsense"}', "nonsense"),
    (None, "No such file"),
])
def test_cli_bad_schema_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    code = main(["generate", "--prompt", "x", "--json-schema", str(path), "--threads", "1"])
    assert house_error(code, capsys.readouterr().err, needle) is None


def test_cli_schema_and_object_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--json-schema", str(tmp_path / "s.json"), "--json-object"])
    assert house_error(e.value.code, capsys.readouterr().err, "not allowed with") is None
