"""OpenAI-compatible server: `create_app` for embedding, `serve` for the `edgellm serve` command."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import uvicorn

from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import parse_bytes
from edgellm.serve.app import create_app
from edgellm.serve.build import SERVER_BLOCK_TOKENS, build_app
from edgellm.speculative import Speculation

__all__ = ["SERVER_BLOCK_TOKENS", "ShutdownNotifyingServer", "build_app", "create_app", "is_loopback", "parse_bytes",
           "serve"]


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
          speculation: Speculation | None = None, adapters: list[tuple[str, str]] | None = None,
          replicas: int = 0, ray_address: str | None = None, replica_threads: int = 1,
          replica_lease_s: float | None = None) -> None:
    """Load the model and run the server until interrupted; agent memories are flushed to disk on exit.

    With `memory_budget`, KV memory is one block pool of that size (formats it cannot hold, KIVI and windowed
    ones, keep per-agent caches under a byte budget instead). `draft_model`: a directory of a draft model sharing
    the tokenizer; `speculation`: requests' default. `adapters`: (name, directory) of PEFT LoRA adapters that
    requests select by name. `store_dir`: a directory, or a shared store's URL (file:///dir, redis://host:port/db)
    whose agents this server leases while it holds them. `replicas`: run that many engines under Ray Serve (at
    `ray_address`, else a local Ray), `replica_threads` CPU threads each, agents routed to a home replica;
    `replica_lease_s`: how long a dead replica's agents stay leased to it, the failover time (default
    `replicas.REPLICA_LEASE_S`).
    """
    if not is_loopback(host) and not api_key:
        raise InvalidRequestError(f"refusing to listen on non-loopback address {host!r} without --api-key")
    if replica_lease_s is not None and not replicas:
        raise InvalidRequestError("--replica-lease applies only with --replicas")
    if replicas:
        return _serve_replicas(replicas, ray_address, replica_threads, host, port, replica_lease_s, dict(
            model_path=model_path, store_dir=store_dir, kv_format=kv_format, memory_budget=memory_budget,
            max_concurrency=max_concurrency, max_queue=max_queue, api_key=api_key, dtype=dtype,
            prefill_chunk=prefill_chunk, kv_predictor=kv_predictor, max_body_bytes=max_body_bytes,
            expert_budget=expert_budget, block_tokens=block_tokens, draft_model=draft_model,
            speculation=speculation, adapters=adapters))
    app = build_app(model_path, store_dir, kv_format, memory_budget, max_concurrency, max_queue, api_key, dtype,
                    prefill_chunk, kv_predictor, max_body_bytes, expert_budget, block_tokens, draft_model,
                    speculation, adapters)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    ShutdownNotifyingServer(config, app.state.begin_shutdown).run()


def _serve_replicas(replicas: int, ray_address: str | None, threads: int, host: str, port: int,
                    lease_s: float | None, app_kwargs: dict) -> None:
    """`serve` on `replicas` engines: checked here in one line each, before Ray or a model is started."""
    from edgellm.kv.store import check_store_url, is_store_url

    if replicas < 1 or threads < 1:
        raise InvalidRequestError("--replicas and --replica-threads must be >= 1")
    if lease_s is not None and lease_s <= 0:
        raise InvalidRequestError(f"--replica-lease must be > 0 seconds, got {lease_s}")
    if not is_store_url(app_kwargs["store_dir"]):
        raise InvalidRequestError("--replicas needs a shared --store (file:///dir or redis://host:port/db) so that "
                                  "any replica can take over any agent")
    check_store_url(app_kwargs["store_dir"])
    try:
        from edgellm.serve.replicas import serve_replicas
    except ImportError as e:
        if not (e.name or "").startswith("ray"):
            raise
        raise InvalidRequestError("--replicas needs Ray Serve, which is not installed: pip install 'ray[serve]'") from e
    serve_replicas(app_kwargs, replicas, threads, host, port, ray_address, lease_s)
