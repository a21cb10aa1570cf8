"""`edgellm serve --replicas N`: the OpenAI-compatible app on N engine replicas under Ray Serve, agents routed home.

Only this module imports Ray. Each `EngineReplica` runs one engine (`build_app`, the single server's app) and
answers the HTTP requests the `Gateway` (the HTTP ingress) hands it, streams included. Requests for an agent
(X-Agent-Id, else `user`) go to the agent's home replica by consistent hashing of the agent id over the live
replicas (`AgentAffinityRouter`, a Ray Serve request router): the replicas follow the home in ring order, so when
the home is down or its queue is full Serve routes the turn to the next one, which restores the agent from the
shared store. A replica answering 409 agent_leased (another holds the agent) or 429 is skipped by the gateway,
which retries the turn on the rest of the ring until the lease can have expired. Requests without an agent go to
the least-loaded replica. Every response carries X-Edgellm-Replica, the id of the replica that answered.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgellm.serve import protocol as p

REPLICA_HEADER = "x-edgellm-replica"
AGENT_HEADER = "x-agent-id"
RETRY_STATUSES = {409, 429}  # agent leased by another replica, queue full: another replica may serve the turn
VIRTUAL_NODES = 64  # ring points per replica: agents spread evenly, and a lost replica's agents spread over the rest
# a killed replica's agents stay leased to it until their lease expires: short leases make failover quick, and
# fencing tokens keep a replica whose lease lapsed from overwriting newer memory
REPLICA_LEASE_S = 10.0
OBJECT_STORE_BYTES = 256 * 2**20  # requests and chunks are small; Ray's default reserves 30% of RAM


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def ring_order(key: str, replicas: list[str]) -> list[str]:
    """`replicas` in the order consistent hashing tries them for `key`: its home first, then clockwise."""
    points = sorted((_point(f"{r}#{v}"), r) for r in replicas for v in range(VIRTUAL_NODES))
    start = bisect.bisect(points, (_point(key), ""))
    order: list[str] = []
    for i in range(len(points)):
        replica = points[(start + i) % len(points)][1]
        if replica not in order:
            order.append(replica)
    return order


def agent_key(headers: dict[str, str], body: bytes) -> str | None:
    """The routing key of a request's agent: X-Agent-Id, else the body's `user` (as the app reads them)."""
    if name := headers.get(AGENT_HEADER):
        return name
    try:
        fields = json.loads(body) if body else None
    except ValueError:
        return None
    user = fields.get("user") if isinstance(fields, dict) else None
    return user if isinstance(user, str) and user else None


class AgentAffinityRouter(RequestRouter):
    """Ranks the live replicas for a request: its agent's ring order (replicas the gateway saw refuse the turn
    last), else all of them in one rank, where Serve picks the shortest queue."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        avoid = set(kwargs.get("avoid") or ())
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if kwargs.get("agent") is None:
            return [[r for i, r in by_id.items() if i not in avoid] or candidate_replicas]
        order = ring_order(kwargs["agent"], list(by_id))
        return [[by_id[i]] for i in [*(i for i in order if i not in avoid), *(i for i in order if i in avoid)]]


class EngineReplica:
    """One engine: the single server's app, answering requests as (status, headers) then body chunks."""

    def __init__(self, app_kwargs: dict[str, Any], threads: int, lease_ttl_s: float) -> None:
        import torch

        from edgellm.serve.build import build_app
        torch.set_num_threads(threads)
        self.app = build_app(**app_kwargs, lease_ttl_s=lease_ttl_s)
        self.app.state.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def handle(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                     agent: str | None = None, avoid: tuple[str, ...] = ()) -> AsyncIterator[Any]:
        """Run one request through the app (`agent` and `avoid` are for the router)."""
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        finished = asyncio.Event()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await finished.wait()  # the gateway stopped reading: the client left
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, messages.put)
            finally:
                messages.put_nowait(None)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("edgellm-replica", 80)}
        task = asyncio.create_task(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield message["status"], [(k.decode(), v.decode()) for k, v in message.get("headers", [])
                                              if k.lower() != b"content-length"] + [(REPLICA_HEADER, self.replica_id)]
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            finished.set()
            await task

    async def __del__(self) -> None:
        """Graceful drain: end running responses, then stop the engine, which writes live agents to the store."""
        self.app.state.begin_shutdown()
        await asyncio.to_thread(self.app.state.engine.stop)


class Gateway:
    """The HTTP ingress: forwards each request to an engine replica, retrying refused turns on the next one."""

    def __init__(self, engine: Any, retry_s: float) -> None:
        self.engine, self.retry_s = engine, retry_s

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        agent = agent_key(dict(request.headers), body)
        avoid: list[str] = []
        deadline = time.monotonic() + self.retry_s
        refused: tuple[int, list[tuple[str, str]], bytes] | None = None
        while True:
            chunks = self.engine.options(stream=True).handle.remote(
                request.method, request.url.path, request.url.query, headers, body, agent=agent, avoid=tuple(avoid))
            try:
                status, reply_headers = await chunks.__anext__()
            except RayActorError:  # the replica died before it answered; Serve drops it from the candidates
                await asyncio.sleep(0.1)
            else:
                if status not in RETRY_STATUSES or time.monotonic() > deadline:
                    return StreamingResponse(chunks, status, dict(reply_headers))
                refused = (status, reply_headers, b"".join([c async for c in chunks]))
                replica = dict(reply_headers)[REPLICA_HEADER]
                if replica in avoid:  # every live replica refused it: wait for the lease or the queue
                    avoid.clear()
                    await asyncio.sleep(0.25)
                avoid.append(replica)
            if time.monotonic() > deadline:
                if refused is None:
                    return JSONResponse(p.error_body("no engine replica answered", "server_error",
                                                     code="replica_unavailable"), 503)
                return Response(refused[2], refused[0], dict(refused[1]))


def deploy(app_kwargs: dict[str, Any], replicas: int, threads: int, host: str = "127.0.0.1", port: int = 8000,
           lease_ttl_s: float = REPLICA_LEASE_S, app_name: str = "edgellm") -> None:
    """Deploy the gateway and `replicas` engines on the connected Ray cluster (returns once they are running).
    `app_kwargs`: `build_app`'s; `lease_ttl_s`: how long a dead replica's agents stay leased to it."""
    # a replica is full when its engine would answer 429: Serve then routes the turn to the next one on the ring
    max_ongoing = app_kwargs.get("max_concurrency", 8) + app_kwargs.get("max_queue", 64)
    engine = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=replicas,
                              ray_actor_options={"num_cpus": threads}, max_ongoing_requests=max_ongoing,
                              graceful_shutdown_timeout_s=30,
                              request_router_config=RequestRouterConfig(request_router_class=AgentAffinityRouter))
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max_ongoing * replicas)
    serve.start(http_options={"host": host, "port": port})
    serve.run(gateway.bind(engine.bind(app_kwargs, threads, lease_ttl_s), lease_ttl_s + 5), name=app_name,
              route_prefix="/")


def init_ray(address: str | None, num_cpus: int) -> None:
    """Connect to `address`, else start a local Ray sized for the replicas; workers import this edgellm."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to send (and often no network)
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 runtime_env=runtime_env)


def serve_replicas(app_kwargs: dict[str, Any], replicas: int, threads: int, host: str, port: int,
                   ray_address: str | None) -> None:
    """Run `replicas` engines behind the gateway until interrupted, then drain them."""
    init_ray(ray_address, replicas * threads)
    try:
        deploy(app_kwargs, replicas, threads, host, port)
        print(f"edgellm: {replicas} replicas serving on http://{host}:{port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # replicas' __del__ flush their live agents to the store first
        ray.shutdown()
