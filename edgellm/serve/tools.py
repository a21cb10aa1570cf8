"""OpenAI tool calling in the Hermes/Qwen style most 2025 chat templates use: the model writes
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which is parsed into OpenAI `tool_calls`.
`tool_choice: "required"` or a named function constrains decoding to one such call (a Lark grammar embedding the
tools' JSON schemas), so even a weak model answers with a valid call."""

from __future__ import annotations

import json
import uuid

import llguidance

from edgellm.errors import InvalidRequestError
from edgellm.grammar import Grammar
from edgellm.serve import protocol as p

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# json.dumps' separators, no other whitespace: a small model otherwise can pad with newlines forever
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def forced_tool(body: p.ChatCompletionRequest) -> str | None:
    """Check `tools` against `tool_choice`; the name a named choice forces, "" for any tool ("required"), None
    when decoding is free."""
    names = [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise p.ServeError("tools must have distinct function names", param="tools")
    choice = body.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    if not names:
        raise p.ServeError("tool_choice needs tools", param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise p.ServeError("response_format cannot be combined with a forced tool_choice", param="response_format")
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in names:
            raise p.ServeError(f"tool_choice names function {choice.function.name!r}, which is not in tools",
                               param="tool_choice")
        return choice.function.name
    return ""


def tool_grammar(tools: list[p.Tool], name: str, tokenizer: llguidance.LLTokenizer) -> Grammar:
    """One `<tool_call>` of the function `name` (any of `tools` when ""), its arguments following its schema."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters}}
             for t in tools if name in ("", t.function.name)]
    schema = {"x-guidance": _LAYOUT, "anyOf": calls}
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(
            f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}')
        return Grammar(grammar, tokenizer)
    except (ValueError, InvalidRequestError) as e:
        raise p.ServeError(f"the tools' parameters schemas are not supported: {e}", param="tools") from e


def _call(body: str) -> dict | None:
    """An OpenAI tool call from the JSON between the tags, or None when it is not a call."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


class ToolCallParser:
    """Splits streamed text into content and tool calls: text inside `<tool_call>` (or that may start one) is held
    until the call closes; one that does not parse is given back as content. With `limit`, later calls are
    dropped (`parallel_tool_calls: false`)."""

    def __init__(self, limit: int | None = None) -> None:
        self.buffer, self.inside, self.limit, self.count = "", False, limit, 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        content, calls = [], []
        while True:
            if not self.inside:
                start = self.buffer.find(OPEN)
                if start < 0:
                    keep = next((n for n in range(min(len(OPEN) - 1, len(self.buffer)), 0, -1)
                                 if self.buffer.endswith(OPEN[:n])), 0)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return "".join(content), calls
                content.append(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(OPEN):], True
            end = self.buffer.find(CLOSE)
            if end < 0:
                return "".join(content), calls
            body, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(CLOSE):], False
            if (call := _call(body.strip())) is None:
                content.append(OPEN + body + CLOSE)
            elif self.limit is None or self.count < self.limit:
                calls.append(call)
                self.count += 1

    def flush(self) -> str:
        """What is still held at the end (an unclosed call, a partial tag), as content."""
        rest = (OPEN if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        return rest


def parse(text: str, limit: int | None = None) -> tuple[str | None, list[dict]]:
    """A whole answer's content (None when it is only calls) and tool calls."""
    parser = ToolCallParser(limit)
    content, calls = parser.feed(text)
    content += parser.flush()
    return (content.strip() or None) if calls else content, calls


def stream_delta(calls: list[dict], first_index: int) -> list[dict]:
    """OpenAI's streaming `delta.tool_calls`: each call whole, numbered across the stream."""
    return [{"index": first_index + i, **call} for i, call in enumerate(calls)]
