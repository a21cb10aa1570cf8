"""OpenAI-compatible server: `create_app` for embedding, `serve` for the `edgellm serve` command."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable

import uvicorn

from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import parse_bytes
from edgellm.serve.app import create_app
from edgellm.speculative import Speculation, check_draft_model

__all__ = ["SERVER_BLOCK_TOKENS", "ShutdownNotifyingServer", "create_app", "is_loopback", "parse_bytes", "serve"]

# oneDNN keeps a compiled kernel for each matmul shape it meets, up to 1024 by default: a server meets a new prompt
# length on most requests, and those kernels grew RSS by ~1 GB. 64 keeps decode's few shapes hot (measured no slower).
ONEDNN_PRIMITIVES = 64
# Agents share a system prompt or tool preamble a whole block at a time: 64 tokens wastes little at the end of a
# shared prefix, and attention reads blocks through a page table at no measurable cost (the seed paper used 256).
SERVER_BLOCK_TOKENS = 64


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


class ShutdownNotifyingServer(uvicorn.Server):
    """uvicorn waits for running responses before it shuts the app down, then cuts off whatever is still streaming
    (a chunked reply with no error and no [DONE]): tell the app first, so it ends them with an error event."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, store_dir: str = "edgellm-agents",
          kv_format: str | None = None, memory_budget: str | None = None, max_concurrency: int = 8, max_queue: int = 64,
          api_key: str | None = None, dtype: str = "auto", prefill_chunk: int = 512,
          kv_predictor: str | None = None, max_body_bytes: int | None = None,
          expert_budget: str | None = None, block_tokens: int | None = None, draft_model: str | None = None,
          speculation: Speculation | None = None, adapters: list[tuple[str, str]] | None = None) -> None:
    """Load the model and run the server until interrupted; agent memories are flushed to disk on exit.

    With `memory_budget`, KV memory is one block pool of that size (formats it cannot hold, KIVI and windowed
    ones, keep per-agent caches under a byte budget instead). `draft_model`: a directory of a draft model sharing
    the tokenizer; `speculation`: requests' default. `adapters`: (name, directory) of PEFT LoRA adapters that
    requests select by name. `store_dir`: a directory, or a shared store's URL (file:///dir, redis://host:port/db)
    whose agents this server leases while it holds them.
    """
    from edgellm.agents import AgentStore
    from edgellm.kv.formats import KVFormat, dense_format
    from edgellm.kv.pool import BlockPool
    from edgellm.kv.store import LeasedMemory, check_store_url, is_store_url, open_store
    from edgellm.loader import load
    from edgellm.models.lora import load_adapter

    if not is_loopback(host) and not api_key:
        raise InvalidRequestError(f"refusing to listen on non-loopback address {host!r} without --api-key")
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
        memory = LeasedMemory(open_store(store_dir, model.fingerprint))
        store_dir = memory.directory
    store = AgentStore(store_dir, model, tokenizer, fmt, None if pooled else budget, budget if pooled else None,
                       block_tokens or SERVER_BLOCK_TOKENS, memory=memory)
    app = create_app(model, tokenizer, store, max_concurrency=max_concurrency, max_queue=max_queue, api_key=api_key,
                     prefill_chunk=prefill_chunk, kv_predictor=predictor, max_body_bytes=max_body_bytes,
                     draft_model=draft, speculation=speculation)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    ShutdownNotifyingServer(config, app.state.begin_shutdown).run()
