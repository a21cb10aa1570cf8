"""OpenAI wire format: request bodies (validated by pydantic), response chunks and the error envelope."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from itertools import accumulate
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edgellm.errors import EdgeLLMError
from edgellm.sampling import TokenLogprob
from edgellm.speculative import P_MIN


class ServeError(EdgeLLMError):
    """A request the server refuses, with the HTTP status and OpenAI error type to answer it with."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error envelope, which its clients turn into typed exceptions."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _valid_unicode(text: str) -> str:
    """JSON can escape a lone surrogate ("\\ud800"), which no tokenizer, file name or UTF-8 reply can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"lone surrogate at position {e.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[int]
INT64 = 2**63


class _Body(BaseModel):
    """Strict like OpenAI: no "5" or true for an int, no "yes" for a bool, no Infinity/NaN (ints stay fine as
    floats); unknown fields are ignored so newer clients keep working."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class AdapterLoad(_Body):
    """POST /v1/adapters: make a PEFT LoRA adapter directory (on the server's disk) resident under `name`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    path: Text


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`; `strict` is accepted but decoding always follows the schema."""

    name: Text
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {} allows any JSON value
    strict: bool | None = None


class ResponseFormat(_Body):
    """`type` is checked by the server (not a Literal) so an unknown one gets a 400 naming the supported ones."""

    type: Text
    json_schema: JsonSchemaFormat | None = None


class RawGrammar(_Body):
    """Extension (as llama-server's `grammar`, vLLM's `guided_regex`): decoding follows a Lark or regex grammar."""

    type: Literal["lark", "regex"]
    value: Text


class SpeculativeField(_Body):
    """Extension: speculative decoding for this request (`false`: none, whatever the server's default)."""

    mode: Literal["ngram", "draft", "kvpred"] = "ngram"
    k: int = Field(default=8, ge=1, le=64)  # the longest draft
    adaptive: bool = True  # the draft length follows what pays, 0 (off) included
    p_min: float = Field(default=P_MIN, ge=0, lt=1)  # draft/kvpred: stop drafting at a guess less likely than this


class SamplingFields(_Body):
    """Sampling fields shared by both endpoints; top_k, min_p and repetition_penalty are extensions (as vLLM),
    as are kv_prediction, grammar and adapter.

    REFUSED lists OpenAI fields this server cannot honour, with the values that ask for nothing (unset, OpenAI's
    default): they are typed `Any` so any other value gets a 400 naming the field rather than a silent ignore."""

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, lt=1)
    # useful values are 1-2; the bounds keep logits x or / the penalty finite in float32
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None  # OpenAI's limit: each is checked per token
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)  # OpenAI's int64; torch refuses wider seeds
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    kv_prediction: bool = False  # extension: predict the prompt's KV cache (server started with --kv-predictor)
    speculative: SpeculativeField | Literal[False] | None = None  # extension; None: the server's default
    adapter: Text | None = None  # extension: a LoRA adapter loaded with --adapter (or model "<base>:<adapter>")
    response_format: ResponseFormat | None = None
    grammar: RawGrammar | None = None
    # OpenAI's: token id (a JSON key, so a string) -> bias added to that token's logit before sampling
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    def check_refused(self) -> None:
        """A 400 naming the first REFUSED field set to a value that asks for something."""
        for name, (harmless, why) in self.REFUSED.items():
            value = getattr(self, name)
            if not any(value == h and type(value) is type(h) for h in harmless):
                raise ServeError(f"{name} is not supported by this server ({why}); omit it", param=name)

    def token_bias(self, vocab: int) -> dict[int, float] | None:
        """`logit_bias` keyed by token id, each checked against the model's `vocab`: a 400 naming the key if not."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) < vocab):
                raise ServeError(f"logit_bias key {key!r} is not a token id of this model (0 to {vocab - 1})",
                                 param="logit_bias")
            bias[int(key)] = value
        return bias or None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Body):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionDef(_Body):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # accepted; a forced call always follows the schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Body):
    name: FunctionName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ChosenFunction


class FunctionCall(_Body):
    name: Text
    arguments: Text  # JSON, as the model wrote it


class ToolCall(_Body):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)

    def as_template_message(self) -> dict:
        """The dict chat templates expect (as transformers passes it): multi-part text joined, tool fields kept."""
        extra = self.model_dump(include={"tool_calls", "tool_call_id", "name"}, exclude_none=True)
        return {"role": self.role, "content": self.text() or "", **extra}


class ChatCompletionRequest(SamplingFields):
    REFUSED = {
        "audio": ((None,), "text output only"),
        "modalities": ((None, ["text"]), "text output only"),
        "functions": ((None, []), "deprecated; use tools"),
        "function_call": ((None,), "deprecated; use tool_choice"),
        "prediction": ((None,), "no predicted outputs"),
        "web_search_options": ((None,), "no web search"),
        "moderation": ((None,), "no moderation model"),
        "reasoning_effort": ((None,), "no reasoning-effort control"),
        "verbosity": ((None, "medium"), "no verbosity control"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI's range; needs logprobs: true
    audio: Any = None
    modalities: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None


class CompletionRequest(SamplingFields):
    REFUSED = {"best_of": ((None, 1), "n=1 only"), "suffix": ((None, ""), "no insertion")}

    prompt: Text | TokenIds | list[Text] | list[TokenIds]  # OpenAI's four forms; a list must hold one prompt (n=1)
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for /v1/completions; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=5)  # OpenAI's range: top alternatives per token
    echo: bool = False
    best_of: Any = None
    suffix: Any = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


TokenText = Callable[[int], str]  # a token id's text, as logprobs show it


def _token(text: TokenText, token: int, logprob: float) -> dict:
    s = text(token)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode())}


def chat_logprobs(items: list[TokenLogprob], text: TokenText) -> dict:
    """A chat choice's `logprobs`: one entry per generated token, each with its top alternatives."""
    return {"content": [{**_token(text, i.token, i.logprob), "top_logprobs": [_token(text, t, lp) for t, lp in i.top]}
                        for i in items]}


def completion_logprobs(items: list[tuple[int, TokenLogprob | None]], text: TokenText, offset: int = 0) -> dict:
    """A completion choice's legacy `logprobs` for (token, scores) pairs, None for echo's unscored first token;
    `text_offset` counts characters into the returned text from `offset` (a stream's earlier chunks)."""
    pieces = [text(t) for t, _ in items]
    offsets = list(accumulate(map(len, pieces), initial=offset))[:len(pieces)]
    return {"tokens": pieces, "token_logprobs": [i and i.logprob for _, i in items],
            "top_logprobs": [i and _top_dict(i, text) for _, i in items], "text_offset": offsets}


def _top_dict(item: TokenLogprob, text: TokenText) -> dict[str, float]:
    """The legacy token→logprob map, best first; ids sharing a text (lone UTF-8 bytes) keep the best one's."""
    top: dict[str, float] = {}
    for token, logprob in item.top:
        top.setdefault(text(token), logprob)
    return top


def _chunk(object_: str, id: str, model: str, created: int, choice: dict, usage_: dict | None) -> dict:
    """One SSE chunk: a choice, or (the last chunk with include_usage) no choice and the usage."""
    chunk: dict[str, Any] = {"id": id, "object": object_, "created": created, "model": model,
                             "choices": [] if usage_ is not None else [{"index": 0, "logprobs": None, **choice}]}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def chat_chunk(id: str, model: str, created: int, delta: dict, finish: str | None = None,
               usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    return _chunk("chat.completion.chunk", id, model, created,
                  {"delta": delta, "finish_reason": finish, "logprobs": logprobs}, usage_)


def completion_chunk(id: str, model: str, created: int, text: str, finish: str | None = None,
                     usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    return _chunk("text_completion", id, model, created,
                  {"text": text, "finish_reason": finish, "logprobs": logprobs}, usage_)


def chat_response(id: str, model: str, text: str | None, finish: str, usage_: dict, logprobs: dict | None = None,
                  tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage_}


def completion_response(id: str, model: str, text: str, finish: str, usage_: dict,
                        logprobs: dict | None = None) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}], "usage": usage_}
