"""Load-test an OpenAI-compatible server: success rate, TTFT, inter-token latency and tokens/s per concurrency.

A concurrency sweep in the style of published vLLM serving studies (find where throughput stops growing), and
a multi-agent scenario: K agents taking turns over a long shared context (or each its own), cold (first turn) vs
warm TTFT, the share of each warm prompt served from memory, and the server's physical vs logical KV bytes.
Works against any server speaking /v1/completions with streaming; agents are named with the `X-Agent-Id` header.
With --replicas instead of --url, `bench.replicas` starts `serve --replicas N` itself and can time failover.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgellm.bench.common import positive_int, positive_ints, write_report
from edgellm.errors import InvalidRequestError

WORDS = ("model", "memory", "agent", "token", "cache", "server", "stream", "batch", "latency", "budget", "restore",
         "prefix", "decode", "prefill", "kernel", "thread", "queue", "socket", "vector", "matrix", "layer", "window",
         "context", "answer", "question")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="server root, e.g. http://127.0.0.1:8000 (or --replicas)")
    p.add_argument("--model", default=None,
                   help="model id (default: the server's first /v1/models entry); with --replicas, the model to "
                        "serve (default: the built-in one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64], help="comma-separated")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="requests per level (default: 2x the concurrency, at least 8)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt length in words (~tokens)")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--agents", type=int, default=0, help="multi-agent scenario with K agents (0 skips it)")
    p.add_argument("--turns", type=positive_int, default=3, help="turns per agent in the multi-agent scenario")
    p.add_argument("--context-len", type=positive_int, default=1024, help="shared context in words (~tokens)")
    p.add_argument("--unique-contexts", action="store_true",
                   help="each agent gets its own context of --context-len words instead of one shared one")
    p.add_argument("--round-robin", action="store_true",
                   help="agents speak one at a time (TTFT without queueing) instead of all at once")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--replicas", type=positive_ints, default=None, metavar="N[,M...]",
                   help="instead of --url: start a local Ray and bench `serve --replicas N` for each N in turn "
                        "(1 thread per replica, pip install 'ray[serve]')")
    p.add_argument("--failover", action="store_true",
                   help="with --replicas (N >= 2): kill an agent's home replica between its turns and time the "
                        "next turn's first token on another replica")
    p.add_argument("--store", default=None, metavar="URL",
                   help="with --replicas: the replicas' shared store (default: file:// in a temporary directory)")
    p.add_argument("--replica-lease", type=float, default=None, metavar="SECONDS",
                   help="with --replicas: serve's --replica-lease, the failover time (default 10)")


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""
    error: str | None = None
    replica: str | None = None  # X-Edgellm-Replica: which engine replica answered


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def stream_completion(client: httpx.AsyncClient, body: dict, headers: dict[str, str]) -> RequestResult:
    """One streamed request, timing the first and every following text chunk."""
    t0 = time.perf_counter()
    last, first, gaps, pieces, usage = t0, None, [], [], {}
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            replica = r.headers.get("x-edgellm-replica")
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"].get("message")))
                usage = chunk.get("usage") or usage
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    pieces.append(chunk["choices"][0]["text"])
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    return RequestResult(True, (first or last) - t0, gaps, usage.get("completion_tokens", len(pieces)),
                         (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                         usage.get("prompt_tokens", 0), "".join(pieces), replica=replica)


async def sweep_level(client: httpx.AsyncClient, model: str, concurrency: int, requests: int, args: argparse.Namespace,
                      rng: random.Random) -> dict[str, Any]:
    """`requests` requests with at most `concurrency` in flight; each prompt is unique so nothing is cached."""
    prompts = [f"request {rng.random():.12f}: " + words(rng, args.prompt_len) for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> RequestResult:
        async with gate:
            body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            return await stream_completion(client, body, {})

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps_s]
    ttft = [r.ttft_s for r in ok]
    return {"concurrency": concurrency, "requests": requests, "success_rate": len(ok) / requests,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
            "tokens_per_s": sum(r.completion_tokens for r in ok) / wall, "wall_s": wall,
            "errors": sorted({r.error for r in results if r.error})[:3]}


async def memory(client: httpx.AsyncClient) -> dict[str, Any]:
    """The server's KV memory figures from /health (edgellm's; {} from servers that do not report them)."""
    try:
        agents = (await client.get("/health")).json().get("agents") or {}
    except (httpx.HTTPError, ValueError):
        return {}
    keys = ("live_bytes", "logical_bytes", "pool_bytes", "shared_blocks", "evictions", "live_agents")
    return {k: agents[k] for k in keys if k in agents}


async def agent_turns(client: httpx.AsyncClient, model: str, args: argparse.Namespace,
                      rng: random.Random) -> list[dict[str, Any]]:
    """K agents over one long shared context (or each its own); each turn every agent speaks, all at once or one
    at a time. Turn 1 is cold, later ones warm."""
    shared = "Shared notes: " + words(rng, args.context_len)
    names = [f"bench-agent-{i}" for i in range(args.agents)]
    for name in names:  # start cold even if a previous run left memories behind
        await client.delete(f"/v1/agents/{name}")
    transcripts = {name: ("Notes: " + words(rng, args.context_len) if args.unique_contexts else shared)
                   + f"\nAgent {name} joins." for name in names}
    turns = []
    for turn in range(1, args.turns + 1):
        async def speak(name: str, turn: int = turn) -> RequestResult:
            transcripts[name] += f"\nTurn {turn}: " + words(rng, 8) + "\nReply:"
            body = {"model": model, "prompt": transcripts[name], "max_tokens": args.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            result = await stream_completion(client, body, {"X-Agent-Id": name})
            transcripts[name] += result.text
            return result

        first_memory = None
        if args.round_robin:
            results = []
            for i, name in enumerate(names):
                results.append(await speak(name))
                if turn == 1 and i == 0:
                    first_memory = await memory(client)  # one agent alone: what sharing is measured against
        else:
            results = await asyncio.gather(*(speak(n) for n in names))
        ok = [r for r in results if r.ok]
        ttft = [r.ttft_s for r in ok]
        reused = [r.cached_tokens / r.prompt_tokens for r in ok if r.prompt_tokens]
        turns.append({"turn": turn, "kind": "cold" if turn == 1 else "warm", "agents": len(names),
                      "success_rate": len(ok) / len(names), "ttft_p50_s": percentile(ttft, 50),
                      "ttft_mean_s": sum(ttft) / len(ttft) if ttft else 0.0,
                      "cached_tokens_mean": sum(r.cached_tokens for r in ok) / len(ok) if ok else 0.0,
                      "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
                      "cached_share_min": min(reused, default=0.0),
                      "memory": await memory(client), "first_agent_memory": first_memory,
                      "errors": sorted({r.error for r in results if r.error})[:3]})
    return turns


def summarize_turns(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Warm vs cold TTFT, the least share of a warm prompt served from memory, and with one shared context taken
    round-robin, the physical KV of all agents over that of the first one alone."""
    cold, warm = [t for t in turns if t["kind"] == "cold"], [t for t in turns if t["kind"] == "warm"]
    if not cold or not warm:
        return {}
    out = {"warm_ttft_vs_cold": percentile([t["ttft_p50_s"] for t in warm], 50) / max(cold[0]["ttft_p50_s"], 1e-9),
           "warm_cached_share_min": min(t["cached_share_min"] for t in warm)}
    one, every = cold[0].get("first_agent_memory") or {}, cold[0].get("memory") or {}
    if one.get("live_bytes") and every.get("live_bytes"):
        out["physical_vs_first_agent"] = every["live_bytes"] / one["live_bytes"]
        out["logical_vs_physical"] = every.get("logical_bytes", 0) / every["live_bytes"]
    return out


def saturation(levels: list[dict[str, Any]]) -> int | None:
    """The lowest concurrency whose throughput is within 10% of the best seen with every request succeeding."""
    good = [lv for lv in levels if lv["success_rate"] == 1.0]
    if not good:
        return None
    best = max(lv["tokens_per_s"] for lv in good)
    return min(lv["concurrency"] for lv in good if lv["tokens_per_s"] >= 0.9 * best)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max([*args.concurrency, args.agents, 1]) + 4)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        try:
            models = (await client.get("/v1/models")).raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise InvalidRequestError(f"cannot list models at {args.url}/v1/models ({e})") from e
        model = args.model or models[0]["id"]
        rng = random.Random(args.seed)
        levels = []
        for c in args.concurrency:
            levels.append(await sweep_level(client, model, c, args.requests or max(8, 2 * c), args, rng))
        turns = await agent_turns(client, model, args, rng) if args.agents > 0 else []
    return {"url": args.url, "model": model, "prompt_len_words": args.prompt_len, "max_tokens": args.max_tokens,
            "levels": levels, "saturation_concurrency": saturation(levels), "agent_turns": turns,
            "agent_summary": summarize_turns(turns),
            "command": "edgellm bench serve " + " ".join(_command_args(args))}


def _command_args(args: argparse.Namespace) -> list[str]:
    out = ["--url", args.url, "--concurrency", ",".join(map(str, args.concurrency)), "--prompt-len",
           str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    if args.requests:
        out += ["--requests", str(args.requests)]
    if args.agents:
        out += ["--agents", str(args.agents), "--turns", str(args.turns), "--context-len", str(args.context_len)]
        out += ["--unique-contexts"] * args.unique_contexts + ["--round-robin"] * args.round_robin
    return out


def print_report(report: dict[str, Any]) -> None:
    print(f"model {report['model']} at {report['url']}: prompt ~{report['prompt_len_words']} words, "
          f"{report['max_tokens']} new tokens")
    print(f"{'conc':>5} {'reqs':>5} {'ok%':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'tok/s':>8}")
    for lv in report["levels"]:
        print(f"{lv['concurrency']:>5} {lv['requests']:>5} {100 * lv['success_rate']:>5.1f}% "
              f"{lv['ttft_p50_s'] * 1e3:>7.0f}ms {lv['ttft_p99_s'] * 1e3:>7.0f}ms {lv['itl_p50_s'] * 1e3:>6.1f}ms "
              f"{lv['itl_p99_s'] * 1e3:>6.1f}ms {lv['tokens_per_s']:>8.1f}")
    print(f"saturation: concurrency {report['saturation_concurrency']}")
    for key, value in report.get("agent_summary", {}).items():
        print(f"{key}: {value:.3f}")
    if report["agent_turns"]:
        print(f"{'turn':>5} {'kind':>5} {'agents':>6} {'ok%':>6} {'TTFT p50':>9} {'prompt':>7} {'cached':>7} "
              f"{'min %':>6} {'KV MiB':>7} {'logical':>8}")
        for t in report["agent_turns"]:
            mem = t.get("memory") or {}
            print(f"{t['turn']:>5} {t['kind']:>5} {t['agents']:>6} {100 * t['success_rate']:>5.1f}% "
                  f"{t['ttft_p50_s'] * 1e3:>7.0f}ms {t['prompt_tokens_mean']:>7.0f} {t['cached_tokens_mean']:>7.0f} "
                  f"{100 * t['cached_share_min']:>5.1f}% {mem.get('live_bytes', 0) / 2**20:>7.1f} "
                  f"{mem.get('logical_bytes', 0) / 2**20:>8.1f}")


def check_args(args: argparse.Namespace) -> None:
    """One line for each bad combination, before a server or Ray is started."""
    if (args.url is None) == (args.replicas is None):
        raise InvalidRequestError("give either --url of a running server or --replicas N[,M...] to start one")
    if args.replicas is None and (args.failover or args.store or args.replica_lease is not None):
        raise InvalidRequestError("--failover, --store and --replica-lease need --replicas")
    if args.failover and max(args.replicas) < 2:
        raise InvalidRequestError("--failover needs 2 or more replicas: another one takes the agent over")
    if args.replica_lease is not None and not 0 < args.replica_lease < float("inf"):
        raise InvalidRequestError(f"--replica-lease must be a positive number of seconds, got {args.replica_lease}")
    if args.store is not None:
        from edgellm.kv.store import check_store_url, is_store_url
        if not is_store_url(args.store):
            raise InvalidRequestError(f"--store {args.store}: replicas need a shared store URL, file:///dir or "
                                      "redis://host:port/db")
        check_store_url(args.store)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep (and agent scenario) against --url, print the tables, write --json; returns the report.
    `edgellm bench serve` enters through `edgellm.bench.replicas.run`, which sends --replicas runs elsewhere."""
    check_args(args)
    report = asyncio.run(bench(args))
    print_report(report)
    write_report(report, args.json)
    return report
