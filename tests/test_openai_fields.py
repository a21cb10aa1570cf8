"""OpenAI request fields through the real server and the official `openai` client: every field the client library
defines is supported, refused with a 400 naming it, or ignored by design, as README's table says; and the
`grammar` extension constrains decoding to a Lark or regex grammar; `logit_bias` forces and bans tokens."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
import torch
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from edgellm.errors import InvalidRequestError
from edgellm.sampling import Sampler, SamplingParams
from edgellm.serve import protocol as p
from tests.conftest import build_checkpoint
from tests.test_serve import CONTEXT, Server

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(\w+)` \| (chat|completions|both) \| (supported|refused|ignored) \|.*\|$", re.M)
MESSAGES = [{"role": "user", "content": "Write a code."}]
REFUSED_CHAT = {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"], "functions": [
    {"name": "f", "parameters": {}}], "function_call": "auto", "prediction": {"type": "content", "content": "x"},
    "web_search_options": {}, "moderation": {"model": "x"}, "reasoning_effort": "high", "verbosity": "low"}
REFUSED_COMPLETIONS = {"best_of": 2, "suffix": "end"}
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


def token_ids_by_text(server: Server) -> dict[str, list[int]]:
    """Every token's text as logprobs show it, and the ids that share it (byte-level BPE: rarely more than one)."""
    tokenizer = server.app.state.engine.tokenizer
    texts: dict[str, list[int]] = {}
    for token in range(tokenizer.backend.get_vocab_size()):
        texts.setdefault(tokenizer.decode([token], skip_special_tokens=False), []).append(token)
    return texts


def test_logit_bias_plus_100_forces_a_token(server):
    texts = token_ids_by_text(server)
    forced = next(text for text, ids in texts.items() if len(ids) == 1 and len(text) > 2 and "<|" not in text)
    bias = {str(texts[forced][0]): 100}
    for seed in range(3):
        choice = chat(server, max_tokens=6, seed=seed, temperature=1.0, logit_bias=bias).choices[0]
        assert choice.message.content == forced * 6
    assert complete(server, max_tokens=5, logit_bias=bias).choices[0].text == forced * 5


def test_logit_bias_minus_100_bans_tokens(server):
    """Ban every token of the greedy answer: none comes back, though the rest of the vocabulary stays open."""
    texts = token_ids_by_text(server)
    greedy = complete(server, max_tokens=8, temperature=0, logprobs=0).choices[0].logprobs.tokens
    banned = {str(token): -100 for text in set(greedy) for token in texts[text]}
    biased = complete(server, max_tokens=8, temperature=0, logprobs=0, logit_bias=banned).choices[0].logprobs.tokens
    assert len(biased) == 8 and not set(biased) & set(greedy)


def test_logit_bias_yields_to_the_grammar(server):
    """The grammar masks last: a +100 bias cannot force a token the JSON cannot take."""
    texts = token_ids_by_text(server)
    bias = {str(token): 100 for token in texts[" fox"]}
    choice = chat(server, max_tokens=CONTEXT // 2, seed=0, temperature=1.0, logit_bias=bias,
                  extra_body={"grammar": {"type": "regex", "value": "[0-9]{4}"}}).choices[0]
    assert re.fullmatch("[0-9]{4}", choice.message.content)


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {"384": 1}, {"١": 1}, {"5": 100.5}, {"5": -101},
                                  {"5": "1"}, {"5": True}, ["5"]])
def test_bad_logit_bias_is_400(server, bias):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, logit_bias=bias)
    assert e.value.body["param"].startswith("logit_bias")


def test_logit_bias_in_the_sampler():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert Sampler(SamplingParams(logit_bias={3: 100}))(logits) == 3
    assert Sampler(SamplingParams(logit_bias={0: -100}))(logits) == 1
    with pytest.raises(InvalidRequestError, match="vocabulary has 4"):
        Sampler(SamplingParams(logit_bias={4: 1}))(logits)
    for bad in ({0: 100.5}, {0: float("nan")}, {-1: 1}):
        with pytest.raises(InvalidRequestError, match="logit_bias"):
            SamplingParams(logit_bias=bad).validate()
