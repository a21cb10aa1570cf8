"""OpenAI request fields through the real server and the official `openai` client: every field the client library
defines is supported, refused with a 400 naming it, or ignored by design, as README's table says; and the
`grammar` extension constrains decoding to a Lark or regex grammar."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from edgellm.serve import protocol as p
from tests.conftest import build_checkpoint
from tests.test_serve import CONTEXT, Server

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(\w+)` \| (chat|completions|both) \| (supported|refused|ignored) \|.*\|$", re.M)
MESSAGES = [{"role": "user", "content": "Write a code."}]
REFUSED_CHAT = {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"], "functions": [
    {"name": "f", "parameters": {}}], "function_call": "auto", "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "moderation": {"model": "x"}, "reasoning_effort": "high", "verbosity": "low",
    "logit_bias": {"42": 5}}
REFUSED_COMPLETIONS = {"best_of": 2, "suffix": "end", "logit_bias": {"42": -100}}
IGNORED_CHAT = {"store": True, "metadata": {"k": "v"}, "service_tier": "flex", "prompt_cache_key": "k",
                "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "x"}, "safety_identifier": "abc"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_checkpoint(tmp_path_factory.mktemp("fields-llama"), "llama", max_position_embeddings=CONTEXT)
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"))
    yield srv
    srv.stop()


def chat(server: Server, max_tokens: int = 4, **kwargs):
    return server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=max_tokens,
                                                   **kwargs)


def complete(server: Server, max_tokens: int = 4, **kwargs):
    return server.client().completions.create(model=server.model, prompt="Hi", max_tokens=max_tokens, **kwargs)


def readme_rows() -> dict[tuple[str, str], str]:
    """(field, endpoint) → status, from the README's table."""
    rows = {}
    for field, where, status in ROW.findall(README.read_text()):
        for endpoint in ("chat", "completions") if where == "both" else (where,):
            rows[field, endpoint] = status
    return rows


@pytest.mark.parametrize(("endpoint", "params", "model"), [
    ("chat", chat_params.CompletionCreateParamsBase, p.ChatCompletionRequest),
    ("completions", completion_params.CompletionCreateParamsBase, p.CompletionRequest),
])
def test_readme_table_covers_the_client_library(endpoint, params, model):
    """Every field of the installed client's params is in the table, whose status matches the request model."""
    rows = readme_rows()
    for field in [*params.__annotations__, "stream"]:
        status = rows.get((field, endpoint))
        assert status is not None, f"README's field table lacks {endpoint} field {field!r}"
        expected = "refused" if field in model.REFUSED else "supported" if field in model.model_fields else "ignored"
        assert status == expected, (field, endpoint)


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT.items())
def test_refused_chat_field_is_400(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, extra_body={field: value})
    assert e.value.body["param"] == field
    assert field in e.value.body["message"]


@pytest.mark.parametrize(("field", "value"), REFUSED_COMPLETIONS.items())
def test_refused_completions_field_is_400(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, extra_body={field: value})
    assert e.value.body["param"] == field


@pytest.mark.parametrize("n", [2, 5])
def test_n_above_one_is_400(server, n):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, n=n)
    assert e.value.body["param"] == "n"


def test_defaults_of_refused_fields_are_accepted(server):
    """Values that ask for nothing (a client's explicit defaults) are not refused."""
    chat(server, modalities=["text"], verbosity="medium", logit_bias={}, functions=[])
    complete(server, best_of=1, suffix="", logit_bias={})


@pytest.mark.parametrize(("field", "value"), IGNORED_CHAT.items())
def test_ignored_chat_field_is_accepted(server, field, value):
    assert chat(server, extra_body={field: value}).choices[0].finish_reason == "length"


@pytest.mark.parametrize("seed", range(3))
def test_regex_grammar_is_followed(server, seed):
    choice = chat(server, seed=seed, temperature=1.0, max_tokens=32,
                  extra_body={"grammar": {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}}).choices[0]
    assert choice.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", choice.message.content)


def test_lark_grammar_on_completions(server):
    choice = complete(server, seed=1, temperature=1.0, max_tokens=16,
                      extra_body={"grammar": {"type": "lark", "value": 'start: ("yes" | "no") "!"'}}).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text in ("yes!", "no!")


@pytest.mark.parametrize("extra", [
    {"grammar": {"type": "regex", "value": "[a-"}},
    {"grammar": {"type": "lark", "value": "start: undefined_rule"}},
    {"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}},
    {"grammar": {"type": "regex", "value": "a"}, "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "f"}}]},
])
def test_bad_or_combined_grammar_is_400(server, extra):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, extra_body=extra)
    assert e.value.body["param"] == "grammar"


def test_unknown_grammar_type_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, extra_body={"grammar": {"type": "ebnf", "value": "x"}})
    assert e.value.body["param"].startswith("grammar")
