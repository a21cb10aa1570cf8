"""Tokenizer from tokenizer.json (the `tokenizers` library), chat templates rendered as transformers does."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from edgellm.errors import CheckpointError, InvalidRequestError


def _token_text(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or remove it") from e


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(f"no tokenizer.json in {path}; edgellm needs the fast-tokenizer file")
        try:
            self.backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception on parse errors
            raise CheckpointError(f"{file} could not be parsed ({e}); re-save the tokenizer") from e
        self.config = _read_json(path / "tokenizer_config.json")
        config_file = path / "tokenizer_config.json"
        self.fingerprint = hashlib.sha256(
            file.read_bytes() + (config_file.read_bytes() if config_file.exists() else b"")).hexdigest()[:32]
        gen = _read_json(path / "generation_config.json")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is None and (path / "chat_template.jinja").exists():
            self.chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        eos = gen.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.eos_token is not None and (tid := self.backend.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        self.eos_token_ids: set[int] = ids

    @classmethod
    def from_backend(cls, backend: HFTokenizer, eos_token_ids: set[int], fingerprint: str, bos_token: str | None = None,
                     eos_token: str | None = None, chat_template: str | None = None) -> Tokenizer:
        """A tokenizer built in memory rather than read from a directory, e.g. from a GGUF file's vocabulary."""
        self = cls.__new__(cls)
        self.backend, self.fingerprint, self.eos_token_ids = backend, fingerprint, set(eos_token_ids)
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.config = {"bos_token": bos_token, "eos_token": eos_token, "chat_template": chat_template}
        return self

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` with the checkpoint's Jinja chat template (same environment as transformers)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use `edgellm generate` with a plain prompt")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}") from e

    @cached_property
    def _template(self) -> jinja2.Template:
        """The chat template compiled once (a server renders it on every request)."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the model's chat template does not compile: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of a rendered chat; the template already holds any BOS, so none is added again. `tools`
        (OpenAI function tools) reach the template as transformers' `tools=` does."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a token stream into text pieces, holding back bytes of a multi-byte character until complete."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decoding starts here so tokenizers that strip a leading space keep it mid-text
        self.read = 0

    def add(self, token: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        decode = self.tokenizer.decode
        piece = decode(self.ids[self.prefix:])[len(decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        return piece
