"""`edgellm serve --replicas N`: the OpenAI-compatible app on N engine replicas under Ray Serve, agents routed home.

Only this module imports Ray. Each `EngineReplica` runs one engine (`build_app`, the single server's app) and
answers the HTTP requests the `Gateway` (the HTTP ingress) hands it, streams included. Requests for an agent
(X-Agent-Id, else `user`) go to the agent's home replica by consistent hashing of the agent id over the live
replicas (`AgentAffinityRouter`, a Ray Serve request router): the replicas follow the home in ring order, so when
the home is down or its queue is full Serve routes the turn to the next one, which restores the agent from the
shared store. A replica answering 409 agent_leased (another holds the agent) or 429 is skipped by the gateway,
which retries the turn on the rest of the ring until the lease can have expired. Requests without an agent go to
the least-loaded replica. Every response carries X-Edgellm-Replica, the id of the replica that answered. GET
/health, /metrics, /v1/agents and /v1/agents/{name} are answered for the whole cluster: the gateway asks every live
replica and merges their answers.
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
from edgellm.serve.metrics import merge_by_replica

REPLICA_HEADER = "x-edgellm-replica"
AGENT_HEADER = "x-agent-id"
RETRY_STATUSES = {409, 429}  # agent leased by another replica, queue full: another replica may serve the turn
VIRTUAL_NODES = 64  # ring points per replica: agents spread evenly, and a lost replica's agents spread over the rest
# a killed replica's agents stay leased to it until their lease expires, so this is the failover time (`serve
# --replica-lease`). Shorter fails over sooner but renews more often (every third of it, per running turn) and lets
# an idle agent move off a slow or partitioned home sooner; fencing tokens keep a replica whose lease lapsed from
# overwriting newer memory, whatever the length
REPLICA_LEASE_S = 10.0
# a draining replica looks this often for its requests to end (Serve's default: 2 s), then releases its agents'
# leases: sooner than they expire, so other replicas take the agents over without waiting
DRAIN_POLL_S = 0.5
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


Answer = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body of one replica's reply
HEALTH_SUMMED = ("active", "queued", "max_concurrency", "max_queue")  # the cluster's load and capacity
# a replica's own agents and KV memory; saved_agents, kv_format and block sizes describe the shared store or model
AGENTS_SUMMED = ("live_agents", "live_bytes", "logical_bytes", "evictions", "budget_bytes", "pool_bytes",
                 "free_blocks", "shared_blocks")


class Gateway:
    """The HTTP ingress: forwards each request to an engine replica, retrying refused turns on the next one.
    GET /health, /metrics, /v1/agents and /v1/agents/{name} ask every replica and answer for the cluster."""

    def __init__(self, engine: Any, retry_s: float) -> None:
        self.engine, self.retry_s = engine, retry_s

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        path = request.url.path
        if request.method == "GET" and (path in ("/health", "/metrics", "/v1/agents")
                                        or path.startswith("/v1/agents/")):
            return await self.cluster_answer(path, request.url.query, headers)
        # /v1/agents/{name}: to the agent's home, which most likely holds it
        agent = path.removeprefix("/v1/agents/") if path.startswith("/v1/agents/") else None
        return await self.forward(request.method, path, request.url.query, headers, body,
                                  agent or agent_key(dict(request.headers), body))

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                      agent: str | None, avoid: list[str] | None = None) -> Response:
        """Send the request to a replica (skipping `avoid`); one that refuses the turn (429, or 409 because another
        replica holds the agent) is skipped, and the turn retried, until `retry_s` has passed."""
        avoid = list(avoid or ())
        deadline = time.monotonic() + self.retry_s
        refused: Answer | None = None
        while True:
            chunks = self.engine.options(stream=True).handle.remote(method, path, query, headers, body, agent=agent,
                                                                    avoid=tuple(avoid))
            try:
                status, reply_headers = await chunks.__anext__()
            except RayActorError:  # the replica died before it answered; Serve drops it from the candidates
                await asyncio.sleep(0.1)
            else:
                if status not in RETRY_STATUSES or time.monotonic() > deadline:
                    return StreamingResponse(chunks, status, dict(reply_headers))
                refused = (status, reply_headers, b"".join([c async for c in chunks]))
                if status == 409 and error_code(refused[2]) != "agent_leased":  # busy here: not another's
                    return Response(refused[2], status, dict(reply_headers))
                replica = dict(reply_headers)[REPLICA_HEADER]
                if replica in avoid:  # every live replica refused it: wait for the lease or the queue
                    avoid.clear()
                    await asyncio.sleep(0.25)
                avoid.append(replica)
            if time.monotonic() > deadline:
                if refused is None:
                    return unavailable()
                return Response(refused[2], refused[0], dict(refused[1]))

    async def ask_all(self, path: str, query: str, headers: list[tuple[str, str]]) -> dict[str, Answer]:
        """Each live replica's answer to a GET, by replica id: each request avoids the replicas that answered,
        until one answers twice (the router falls back to all of them once every one is avoided)."""
        answers: dict[str, Answer] = {}
        deadline = time.monotonic() + self.retry_s
        while time.monotonic() < deadline:
            chunks = self.engine.options(stream=True).handle.remote("GET", path, query, headers, b"",
                                                                    avoid=tuple(answers))
            try:
                status, reply_headers = await chunks.__anext__()
                body = b"".join([c async for c in chunks])
            except RayActorError:
                await asyncio.sleep(0.1)
                continue
            replica = dict(reply_headers)[REPLICA_HEADER]
            if replica in answers:
                break
            answers[replica] = (status, reply_headers, body)
        return answers

    async def cluster_answer(self, path: str, query: str, headers: list[tuple[str, str]]) -> Response:
        """The cluster's /health (loads and KV bytes summed), /metrics (samples labelled by replica), agent list
        and agent (each agent once, with the replica holding it live)."""
        answers = await self.ask_all(path, query, headers)
        if not answers:
            return unavailable()
        refused = [a for a in answers.values() if a[0] != 200]
        # refused by all (no API key, an agent found nowhere), or by any for what every replica must answer
        if refused and (not path.startswith("/v1/agents") or len(refused) == len(answers)):
            status, reply_headers, body = refused[0]
            return Response(body, status, dict(reply_headers))
        if path == "/metrics":
            text = merge_by_replica({r: a[2].decode() for r, a in answers.items()})
            return Response(text, 200, media_type=dict(next(iter(answers.values()))[1]).get("content-type"))
        found = {r: json.loads(a[2]) for r, a in answers.items() if a[0] == 200}
        if path == "/health":
            return JSONResponse(cluster_health(found))
        if path == "/v1/agents":
            listed = [{**agent, "replica": replica} for replica, page in found.items() for agent in page["data"]]
            return JSONResponse({"object": "list", "data": merge_agents(listed)})
        return JSONResponse(merge_agents([{**agent, "replica": replica} for replica, agent in found.items()])[0])


def error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def unavailable() -> JSONResponse:
    return JSONResponse(p.error_body("no engine replica answered", "server_error", code="replica_unavailable"), 503)


def cluster_health(replies: dict[str, dict]) -> dict:
    """The replicas' /health as one: loads, capacities and their agents' KV bytes summed, and each reply by
    replica. Without the API key a replica says only "ok", and so does this."""
    first = next(iter(replies.values()))
    if "model" not in first:
        return {"status": "ok"}
    out = {**first, "replicas": replies}
    out |= {key: sum(r[key] for r in replies.values()) for key in HEALTH_SUMMED}
    out["agents"] = dict(first["agents"])
    for key in AGENTS_SUMMED:
        values = [r["agents"].get(key) for r in replies.values()]
        if any(v is not None for v in values):  # budget_bytes is None on replicas without one
            out["agents"][key] = sum(v or 0 for v in values)
    return out


def merge_agents(listed: list[dict]) -> list[dict]:
    """Each agent once, by name: the entry of the replica that holds its lease, else of one holding it live
    (an idle agent's lease may have lapsed), else the shared store's; `replica` is None unless it is live."""
    best: dict[str, dict] = {}
    for agent in listed:
        agent = {**agent, "replica": agent["replica"] if agent.get("live") else None}
        rank = (agent.get("leased", False), agent.get("live", False), agent.get("tokens", 0))
        held = best.get(agent["id"])
        if held is None or rank > (held.get("leased", False), held.get("live", False), held.get("tokens", 0)):
            best[agent["id"]] = agent
    return [best[name] for name in sorted(best)]


def deploy(app_kwargs: dict[str, Any], replicas: int, threads: int, host: str = "127.0.0.1", port: int = 8000,
           lease_ttl_s: float = REPLICA_LEASE_S, app_name: str = "edgellm") -> None:
    """Deploy the gateway and `replicas` engines on the connected Ray cluster (returns once they are running).
    `app_kwargs`: `build_app`'s; `lease_ttl_s`: how long a dead replica's agents stay leased to it."""
    # a replica is full when its engine would answer 429: Serve then routes the turn to the next one on the ring
    max_ongoing = app_kwargs.get("max_concurrency", 8) + app_kwargs.get("max_queue", 64)
    engine = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=replicas,
                              ray_actor_options={"num_cpus": threads}, max_ongoing_requests=max_ongoing,
                              graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
                              request_router_config=RequestRouterConfig(request_router_class=AgentAffinityRouter))
    gateway = serve.deployment(Gateway, name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max_ongoing * replicas)
    serve.start(http_options={"host": host, "port": port})
    serve.run(gateway.bind(engine.bind(app_kwargs, threads, lease_ttl_s), lease_ttl_s + 5), name=app_name,
              route_prefix="/")


def init_ray(address: str | None, num_cpus: int, log_to_driver: bool = True) -> None:
    """Connect to `address`, else start a local Ray sized for the replicas; workers import this edgellm.
    `log_to_driver` False keeps the replicas' request logs out of a benchmark's tables."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to send (and often no network)
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
    runtime_env = {"env_vars": {"PYTHONPATH": path}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=log_to_driver)


def serve_replicas(app_kwargs: dict[str, Any], replicas: int, threads: int, host: str, port: int,
                   ray_address: str | None, lease_ttl_s: float | None = None) -> None:
    """Run `replicas` engines behind the gateway until interrupted, then drain them."""
    init_ray(ray_address, replicas * threads)
    try:
        deploy(app_kwargs, replicas, threads, host, port, lease_ttl_s or REPLICA_LEASE_S)
        print(f"edgellm: {replicas} replicas serving on http://{host}:{port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # replicas' __del__ flush their live agents to the store first
        ray.shutdown()
