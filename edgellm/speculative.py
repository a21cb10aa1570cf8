"""Draft proposers for speculative decoding: cheap guesses at the next tokens, which the runner verifies with one
forward pass of the model (`runner.speculative_decode`). A wrong guess costs only the wasted positions.
"""

from __future__ import annotations

from typing import Protocol


class Proposer(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` guesses at the tokens that follow `tokens` (prompt then generated); [] when there is no guess."""
        ...


class NGramProposer:
    """Prompt-lookup decoding (transformers' prompt_lookup_num_tokens, llama.cpp's lookup): no draft model.

    Finds the most recent earlier occurrence of the last n tokens (n from `max_ngram` down to `min_ngram`) and
    proposes what followed it. Edits, quotes and code re-emit their context verbatim, so the guesses often hold.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        size = len(tokens)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            tail, last = tokens[-n:], tokens[-1]
            for start in range(size - n - 1, -1, -1):
                if tokens[start + n - 1] == last and tokens[start:start + n] == tail:
                    return self._follow(tokens, start + n, k)
        return []

    @staticmethod
    def _follow(tokens: list[int], pos: int, k: int) -> list[int]:
        """`k` tokens from `pos` on; past the end the guess continues from itself, so a repeating span (a loop,
        a list) yields a full draft rather than only the tokens up to the end of the context."""
        draft: list[int] = []
        for i in range(pos, pos + k):
            draft.append(tokens[i] if i < len(tokens) else draft[i - len(tokens)])
        return draft
