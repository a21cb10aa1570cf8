"""Building the server's app from `edgellm serve`'s options: the model, its agent store and `create_app`."""

from __future__ import annotations

import os
import sys

from fastapi import FastAPI

from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import parse_bytes
from edgellm.serve.app import create_app
from edgellm.speculative import Speculation, check_draft_model

# oneDNN keeps a compiled kernel for each matmul shape it meets, up to 1024 by default: a server meets a new prompt
# length on most requests, and those kernels grew RSS by ~1 GB. 64 keeps decode's few shapes hot (measured no slower).
ONEDNN_PRIMITIVES = 64
# Agents share a system prompt or tool preamble a whole block at a time: 64 tokens wastes little at the end of a
# shared prefix, and attention reads blocks through a page table at no measurable cost (the seed paper used 256).
SERVER_BLOCK_TOKENS = 64


def build_app(model_path: str | None, store_dir: str = "edgellm-agents", kv_format: str | None = None,
              memory_budget: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
              api_key: str | None = None, dtype: str = "auto", prefill_chunk: int = 512,
              kv_predictor: str | None = None, max_body_bytes: int | None = None, expert_budget: str | None = None,
              block_tokens: int | None = None, draft_model: str | None = None,
              speculation: Speculation | None = None, adapters: list[tuple[str, str]] | None = None,
              lease_ttl_s: float = 60.0) -> FastAPI:
    """Load the model and build `serve`'s app (its arguments; `lease_ttl_s`: how long a shared store's agent stays
    leased to this server after its last use). The engine starts with the app's lifespan."""
    from edgellm.agents import AgentStore
    from edgellm.kv.formats import KVFormat, dense_format
    from edgellm.kv.pool import BlockPool
    from edgellm.kv.store import LeasedMemory, check_store_url, is_store_url, open_store
    from edgellm.loader import load
    from edgellm.models.lora import load_adapter

    if max_concurrency < 1 or max_queue < 0 or prefill_chunk < 1:
        raise InvalidRequestError("--max-concurrency and --prefill-chunk must be >= 1, --max-queue >= 0")
    budget = parse_bytes(memory_budget) if memory_budget else None
    if is_store_url(store_dir):
        check_store_url(store_dir)  # before minutes of model loading
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))  # before the first matmul
    model, tokenizer = load(model_path, dtype)
    if expert_budget:
        from edgellm.models import offload
        offload.enable(model, expert_budget)
    for name, path in adapters or []:
        load_adapter(model, path, name)
    predictor = None
    if kv_predictor:
        from edgellm.kvpred import load_predictor
        predictor = load_predictor(kv_predictor, model, tokenizer.fingerprint)
    draft = None
    if draft_model:
        draft, draft_tokenizer = load(draft_model, dtype)
        check_draft_model(draft, draft_tokenizer, model, tokenizer)
    if speculation is not None and {"draft": draft, "kvpred": predictor}.get(speculation.mode, model) is None:
        raise InvalidRequestError(f"--speculative {speculation.mode} needs "
                                  f"{'--draft-model' if speculation.mode == 'draft' else '--kv-predictor'}")
    fmt = KVFormat.parse(kv_format) if kv_format else dense_format(model.dtype)
    pooled = budget is not None and BlockPool.supports(fmt)
    if budget is not None and not pooled:
        print(f"edgellm: KV format {fmt} has no block-pool layout (KIVI keys, a full-precision window): "
              "--memory-budget bounds the live agents' caches instead, without prefix sharing", file=sys.stderr)
    memory = None
    if is_store_url(store_dir):
        memory = LeasedMemory(open_store(store_dir, model.fingerprint), ttl_s=lease_ttl_s)
        store_dir = memory.directory
    store = AgentStore(store_dir, model, tokenizer, fmt, None if pooled else budget, budget if pooled else None,
                       block_tokens or SERVER_BLOCK_TOKENS, memory=memory)
    app = create_app(model, tokenizer, store, max_concurrency=max_concurrency, max_queue=max_queue, api_key=api_key,
                     prefill_chunk=prefill_chunk, kv_predictor=predictor, max_body_bytes=max_body_bytes,
                     draft_model=draft, speculation=speculation)
    return app
