"""Logprobs and echo through the real server and the official `openai` client, checked against transformers' own
forward of the same checkpoint: the logprobs must be the model's raw distribution, whatever the sampling."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import transformers

from edgellm.tokenizer import Tokenizer
from tests.conftest import build_checkpoint
from tests.test_serve import CONTEXT, Server, _error

MESSAGES = [{"role": "user", "content": "def fibonacci(n):"}]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("logprobs-llama"), "llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"), prefill_chunk=4)  # prompts span several steps
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf(model_dir) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def text_of(tok: Tokenizer, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def reference(hf: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of a cache-less full forward; row i scores ids[i + 1]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def follow(hf: transformers.PreTrainedModel, tok: Tokenizer, prompt: list[int], pieces: list[str],
           logprobs: list[float]) -> list[int]:
    """The generated ids behind the server's token texts: a text may stand for several ids (a lone UTF-8 byte
    shows as U+FFFD), so at each step exactly one id of that text must have the reported logprob."""
    by_text: dict[str, list[int]] = {}
    for i in range(tok.vocab_size):
        by_text.setdefault(text_of(tok, i), []).append(i)
    ids = list(prompt)
    for piece, logprob in zip(pieces, logprobs, strict=True):
        row = reference(hf, ids)[-1]
        matches = [i for i in by_text[piece] if abs(row[i].item() - logprob) < TOL]
        assert len(matches) == 1, (piece, logprob, matches)
        ids.append(matches[0])
    return ids[len(prompt):]


def check_chat_content(content, prompt: list[int], tok: Tokenizer, hf, top: int) -> None:
    generated = follow(hf, tok, prompt, [c.token for c in content], [c.logprob for c in content])
    ref = reference(hf, prompt + generated)
    for j, c in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        assert abs(c.logprob - row[generated[j]].item()) < TOL
        assert c.bytes == list(c.token.encode())
        values, ids = row.topk(top)
        assert [t.token for t in c.top_logprobs] == [text_of(tok, i) for i in ids.tolist()]
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(values.tolist(), abs=TOL)


def test_chat_logprobs_equal_an_independent_forward_streaming_and_not(server, hf, tok):
    client, prompt = server.client(), tok.encode_chat(MESSAGES)
    full = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=8,
                                          logprobs=True, top_logprobs=5)
    content = full.choices[0].logprobs.content
    assert len(content) == 8
    check_chat_content(content, prompt, tok, hf, 5)
    assert all(c.token == c.top_logprobs[0].token for c in content)  # greedy picks the top token
    chunks = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=8,
                                            logprobs=True, top_logprobs=5, stream=True)
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=TOL)
    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_sampled_logprobs_are_the_raw_model_distribution(server, hf, tok):
    """Penalties and temperature change which token is drawn, not the logprobs reported for it."""
    out = server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, temperature=1.5, seed=3, max_tokens=10, logprobs=True,
        top_logprobs=0, frequency_penalty=2, presence_penalty=2, extra_body={"repetition_penalty": 1.5})
    content = out.choices[0].logprobs.content
    assert all(c.top_logprobs == [] for c in content)
    check_chat_content(content, tok.encode_chat(MESSAGES), tok, hf, 0)


def test_completion_logprobs_and_echo(server, hf, tok):
    client, prompt = server.client(), tok.encode("def fibonacci(n):\n    return")
    out = client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                    echo=True)
    lp, text = out.choices[0].logprobs, out.choices[0].text
    assert len(lp.tokens) == len(prompt) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:len(prompt)] == [text_of(tok, t) for t in prompt]
    ids = prompt + follow(hf, tok, prompt, lp.tokens[len(prompt):], lp.token_logprobs[len(prompt):])
    ref = reference(hf, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < TOL
        values, top = ref[i - 1].topk(3)
        expected: dict[str, float] = {}  # ids sharing a text keep the best one's logprob
        for t, v in zip(top.tolist(), values.tolist(), strict=True):
            expected.setdefault(text_of(tok, t), v)
        assert list(lp.top_logprobs[i]) == list(expected)
        assert list(lp.top_logprobs[i].values()) == pytest.approx(list(expected.values()), abs=TOL)
    echoed = tok.decode(prompt)
    assert text.startswith(echoed) and lp.text_offset[len(prompt)] == len(echoed)
    assert lp.text_offset == sorted(lp.text_offset)

    plain = client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=6, logprobs=0)
    assert plain.choices[0].text == text[len(echoed):]
    assert plain.choices[0].logprobs.tokens == lp.tokens[len(prompt):]
    assert plain.choices[0].logprobs.top_logprobs == [{}] * 6 and plain.choices[0].logprobs.text_offset[0] == 0
    chunks = client.completions.create(model=server.model, prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                       stream=True)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens[len(prompt):]
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs[len(prompt):],
                                                                            abs=TOL)


def test_echo_scores_the_prompt_with_max_tokens_0_and_when_cached(server, hf, tok):
    client, text = server.client(), "The quick brown fox jumps over the lazy dog"
    prompt = tok.encode(text)
    ref = reference(hf, prompt)
    out = client.completions.create(model=server.model, prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice, expected = out.choices[0], [ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert choice.text == text and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(prompt) and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=TOL)
    # an agent's memory then holds the prompt: echo must still score every prompt token
    client.completions.create(model=server.model, prompt=text, max_tokens=2, temperature=0,
                              extra_headers={"X-Agent-Id": "scorer"})
    cached = client.completions.create(model=server.model, prompt=text, max_tokens=1, echo=True, logprobs=1,
                                       temperature=0, extra_headers={"X-Agent-Id": "scorer"})
    assert cached.usage.prompt_tokens_details.cached_tokens > 0
    assert cached.choices[0].logprobs.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=TOL)
    echoed = client.completions.create(model=server.model, prompt=text, max_tokens=0, echo=True)
    assert echoed.choices[0].text == text and echoed.choices[0].logprobs is None


def test_out_of_range_logprobs_fields_are_400_naming_the_field(server):
    chat = {"model": server.model, "messages": MESSAGES, "max_tokens": 2}
    completion = {"model": server.model, "prompt": "hi", "max_tokens": 2}
    cases = [
        ("chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {**chat, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {**chat, "logprobs": 1}, "logprobs"),
        ("chat/completions", {**chat, "logprobs": True, "n": 2}, "n"),
        ("completions", {**completion, "logprobs": 6}, "logprobs"),
        ("completions", {**completion, "logprobs": True}, "logprobs"),
        ("completions", {**completion, "max_tokens": 0}, "max_tokens"),
        ("completions", {**completion, "max_tokens": -1, "echo": True}, "max_tokens"),
        ("completions", {**completion, "echo": True, "stream": True}, "echo"),
        ("completions", {**completion, "echo": "yes"}, "echo"),
    ]
    for path, body, param in cases:
        r = httpx.post(f"{server.url}/v1/{path}", json=body)
        assert r.status_code == 400, (body, r.text)
        assert _error(r)["param"] == param, (body, r.text)
