"""What every `bench kv` section shares: the model under test (and its random twin), seeded ids, random-K/V caches."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from edgellm.bench.speed import build_random_llama
from edgellm.kv.formats import KVFormat
from edgellm.kv.prompt_cache import PromptCache
from edgellm.loader import load_model
from edgellm.perf.hardware import dtype_name
from edgellm.tokenizer import Tokenizer

FILL_CHUNK = 2048  # random K/V tokens written per call when filling a cache
GIB, MIB = 2**30, 2**20


class Subject(NamedTuple):
    """A model under test, its tokenizer, and how the report names it."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    random_weights: bool


def random_twin(model: nn.Module, window: int, seed: int = 0) -> nn.Module:
    """A random-init model of `model`'s architecture whose window reaches `window` positions.

    Prefill, restore and decode cost depend on shapes, not weight values, so the twin times contexts the real model
    was not trained for; its fingerprint differs, so the real model's memory files never restore into it.
    """
    torch.manual_seed(seed)
    twin = type(model)(replace(model.args, max_position_embeddings=window))
    twin.tie_weights()
    twin = twin.to(model.dtype).eval().requires_grad_(False)
    twin.fingerprint = f"random-twin:{model.fingerprint}:{window}"
    return twin


def load_subjects(args: argparse.Namespace, dtype: torch.dtype, workdir: Path) -> tuple[Subject, Subject | None]:
    """The model under test and, when a TTFT context is past its window, its random-init twin."""
    # the prompt and the agent's new token, or the cache and the decoded token
    longest = max(args.contexts) + 1 if {"ttft", "decode"} & set(args.sections) else 0
    if args.random_llama:
        path = Path(build_random_llama(args.random_llama, str(workdir / f"random-llama-{args.random_llama}"),
                                       dtype_name(dtype)))
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = max(config["max_position_embeddings"], longest)
        (path / "config.json").write_text(json.dumps(config))
        return Subject(load_model(path, dtype), Tokenizer(path), path.name, True), None
    if args.model:
        path = Path(args.model)
    else:
        from edgellm.assets import default_model_path
        path = default_model_path()
    main = Subject(load_model(path, dtype), Tokenizer(path), path.name, False)
    if longest <= main.model.args.max_position_embeddings:
        return main, None
    return main, Subject(random_twin(main.model, longest), main.tokenizer, f"random {main.name}", True)


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_cache(model: nn.Module, fmt: KVFormat, ids: list[int], seed: int, spare: int = 0) -> PromptCache:
    """A cache holding `ids` whose K/V are random values written straight in (no prefill, no window limit)."""
    args, dtype = model.args, model.dtype
    generator = torch.Generator().manual_seed(seed)
    cache = PromptCache(model, len(ids) + spare, fmt)
    for layer in cache.layers:
        for start in range(0, len(ids), FILL_CHUNK):
            shape = (1, args.num_key_value_heads, min(FILL_CHUNK, len(ids) - start), args.head_dim)
            layer.update_and_fetch(torch.randn(shape, generator=generator).to(dtype),
                                   torch.randn(shape, generator=generator).to(dtype))
    cache.tokens = list(ids)
    return cache


def held_bytes(cache: PromptCache) -> int:
    """Bytes of the tensors the cache holds for its tokens (what a save writes, header aside)."""
    return sum(t.nbytes for layer in cache.layers for t in layer.state().values())
