"""Tool calling through the real server and the official `openai` client, on a tiny random model whose chat
template renders tools Hermes-style: a forced call must name a tool and its arguments follow the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from edgellm.serve.tools import ToolCallParser, parse
from edgellm.tokenizer import Tokenizer
from tests.conftest import build_checkpoint
from tests.test_serve import Server

TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %}{{ t | tojson }}{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments }}}</tool_call>'
    "{% endfor %}<|end|>"
    "{% elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response><|end|>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = build_checkpoint(tmp_path_factory.mktemp("tools-llama"), "llama", max_position_embeddings=2048)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"))
    yield srv
    srv.stop()


def chat(server: Server, seed: int = 0, messages: list[dict] = MESSAGES, **kwargs):
    kwargs = {"tools": TOOLS, "max_tokens": 192, "temperature": 1.0, **kwargs}
    return server.client().chat.completions.create(model=server.model, messages=messages, seed=seed, **kwargs)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("seed", range(3))
def test_required_returns_a_valid_call(server, seed):
    choice = chat(server, seed, tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])


def test_named_function_is_forced(server):
    for seed in range(2):
        choice = chat(server, seed, tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "add"
        check_call(choice.message.tool_calls[0])


def test_stream_sends_the_call_whole(server):
    full = chat(server, 5, tool_choice="required").choices[0].message.tool_calls[0]
    chunks = list(chat(server, 5, tool_choice="required", stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id.startswith("call_")
    assert (deltas[0].function.name, deltas[0].function.arguments) == (full.function.name, full.function.arguments)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    check_call(deltas[0])


def test_round_trip(server, model_dir):
    """The call and its result go back as an assistant and a tool message; the template renders both."""
    call = chat(server, 1, tool_choice="required").choices[0].message.tool_calls[0]
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    answer = chat(server, 2, history, tool_choice="none", max_tokens=4)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"
    tokenizer = Tokenizer(model_dir)
    rendered = tokenizer.apply_chat_template(
        [{**m, "content": m["content"] or ""} for m in history], tools=None)
    assert "<tool_response>sunny, 21 degrees</tool_response>" in rendered and call.function.arguments in rendered
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_auto_without_a_call_is_content(server):
    choice = chat(server, 0, tool_choice="auto", max_tokens=8).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)


def test_tools_reach_the_template(server):
    """With tools (auto) the prompt holds them; with tool_choice none it does not."""
    with_tools = chat(server, 0, max_tokens=1).usage.prompt_tokens
    without = chat(server, 0, tool_choice="none", max_tokens=1).usage.prompt_tokens
    assert with_tools > without


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tools_are_400(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4,
                                                **{"tools": TOOLS, **kwargs})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param


def test_parser_holds_a_split_call():
    parser = ToolCallParser()
    pieces = ["Sure. <tool", '_call>{"name": "add", ', '"arguments": {"a": 1, "b": 2}}</tool_call', ">", " done<"]
    results = [parser.feed(piece) for piece in pieces]
    assert [r[0] for r in results] == ["Sure. ", "", "", "", " done"]
    assert [len(r[1]) for r in results] == [0, 0, 0, 1, 0]
    assert results[3][1][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert parser.flush() == "<"


def test_parse_keeps_what_is_not_a_call():
    assert parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse("cut <tool_call>{\"name\"") == ("cut <tool_call>{\"name\"", [])
    content, calls = parse('<tool_call>{"name": "a"}</tool_call>\n<tool_call>{"name": "b"}</tool_call>', limit=1)
    assert content is None and [c["function"]["name"] for c in calls] == ["a"]
