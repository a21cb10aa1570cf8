"""Constrained decoding (OpenAI's `response_format`) with llguidance: a grammar is a logits processor that masks
every token the grammar cannot take next, and is told each accepted token so it can advance and say when the
output is complete.

llguidance computes the mask in Rust from the tokenizer's byte-level vocabulary (tens of µs per token) and needs
no torch of its own; the bitmask is unpacked here with numpy (its torch helper uses torch.compile) into a 0/-inf
row added to the logits.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np
import torch

from edgellm.errors import InvalidRequestError
from edgellm.tokenizer import Tokenizer

_ADDEND = np.array([-np.inf, 0], dtype=np.float32)  # a disallowed token's logit goes to -inf, an allowed one's stays
_JSON_LAYOUT: dict[str, object] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def llg_tokenizer(tokenizer: Tokenizer, n_vocab: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` over the model's `n_vocab` logits; EOS is the tokenizer's own EOS token
    too, so a grammar can end even where the caller ignores EOS. Costs up to a second for a large vocabulary
    (it builds a token trie): build it once per tokenizer."""
    eos = set(tokenizer.eos_token_ids)
    if tokenizer.eos_token is not None and (tid := tokenizer.backend.token_to_id(tokenizer.eos_token)) is not None:
        eos.add(tid)
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=sorted(eos) or None)


class Grammar:
    """A compiled grammar for one tokenizer, shared by requests; each sequence gets its own `processor()`."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer) -> None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidRequestError(f"the grammar is not supported: {messages[0]}")
        self.grammar, self.tokenizer = grammar, tokenizer

    @classmethod
    def json(cls, tokenizer: llguidance.LLTokenizer, schema: dict | None = None) -> Grammar:
        """JSON matching `schema`; without one, any JSON object (OpenAI's `json_object`). Separators are
        json.dumps' and no other whitespace is allowed: a small model otherwise can pad with newlines forever."""
        text = json.dumps({"type": "object"} if schema is None else schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_LAYOUT)
        except ValueError as e:
            raise InvalidRequestError(f"the JSON schema is not supported: {e}") from e
        return cls(grammar, tokenizer)

    @classmethod
    def raw(cls, tokenizer: llguidance.LLTokenizer, kind: str, text: str) -> Grammar:
        """A client's own grammar (`kind` "lark" or "regex"), for output no JSON schema describes."""
        compile_ = llguidance.LLMatcher.grammar_from_lark if kind == "lark" else llguidance.LLMatcher.grammar_from_regex
        try:
            grammar = compile_(text)
        except ValueError as e:
            raise InvalidRequestError(f"the {kind} grammar is not supported: {e}") from e
        return cls(grammar, tokenizer)

    def processor(self) -> GrammarProcessor:
        return GrammarProcessor(self)


class GrammarProcessor:
    """One sequence's matcher: masks the logits, then advances on the sampled token."""

    def __init__(self, grammar: Grammar) -> None:
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.grammar)
        self.eos = set(grammar.tokenizer.eos_tokens)
        self.vocab = grammar.tokenizer.vocab_size
        self.bitmask = np.empty((self.vocab + 31) // 32, dtype=np.int32)

    def __call__(self, tokens: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Adding a 0/-inf row costs a few µs where a masked_fill on the logits took ~70."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[:self.vocab]
        return logits + torch.from_numpy(np.take(_ADDEND, allowed))

    def accept(self, token: int) -> bool:
        """Advance on `token`; True when it ends the output (the grammar is complete and this is EOS)."""
        if not self.matcher.consume_token(token):
            raise InvalidRequestError(f"the grammar rejected token {token}: {self.matcher.get_error()}")
        return token in self.eos and self.matcher.is_stopped()
