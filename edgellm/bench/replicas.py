"""`edgellm bench serve`: load-test a server at --url (`bench.serve`), or `serve --replicas N` on a local Ray,
started and torn down here for each N of --replicas N[,M...], so 1 vs N replicas and failover are measured alike.

Each N gets its own Ray (N CPUs, 1 thread per replica), a gateway on a free loopback port and a shared store (a new
temporary directory unless --store names one). With --failover an agent talks two turns, its home replica (the
X-Edgellm-Replica of its second turn) is killed, and the third turn is timed from the kill to its first token: it
must be answered by another replica, which restores the agent from the store (its cached_tokens show how much).
The home's lease has to lapse first, so failover takes about the lease (--replica-lease, default 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from typing import Any

import httpx

from edgellm.bench import serve as bs
from edgellm.bench.common import free_port, write_report
from edgellm.errors import InvalidRequestError

MAX_CONCURRENCY = 4  # running sequences per replica; the rest of a level queues on it
FAILOVER_AGENT = "bench-failover"


def kill_replica(replica_id: str) -> None:
    """Kill the Ray actor of a Serve replica, as a crash would (no drain, no restart of that actor)."""
    import ray
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{replica_id}"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise InvalidRequestError(f"no Ray actor for replica {replica_id}")


async def failover(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Two turns of one agent, its home killed, then the third turn: kill to first token, who answered, and how
    much of its prompt came from the memory the home saved."""
    rng = random.Random(args.seed + 1)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
        await client.delete(f"/v1/agents/{FAILOVER_AGENT}")
        prompt = "Notes: " + bs.words(rng, args.context_len)
        results: list[bs.RequestResult] = []
        home, killed_at = "", 0.0
        for turn in (1, 2, 3):
            prompt += f"\nTurn {turn}: " + bs.words(rng, 8) + "\nReply:"
            body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            if turn == 3:
                killed_at = time.perf_counter()
                kill_replica(home)
            sent_at = time.perf_counter()
            result = await bs.stream_completion(client, body, {"X-Agent-Id": FAILOVER_AGENT})
            if not result.ok:
                raise InvalidRequestError(f"failover agent, turn {turn}: {result.error}")
            home = result.replica or ""
            results.append(result)
            prompt += result.text
    last = results[-1]
    return {"home_replica": results[1].replica, "replica": last.replica,
            "other_replica": last.replica != results[1].replica,
            "kill_to_first_token_s": sent_at - killed_at + last.ttft_s,
            "cached_tokens": last.cached_tokens, "prompt_tokens": last.prompt_tokens,
            "cached_share": last.cached_tokens / max(last.prompt_tokens, 1),
            # what the home's memory of turn 2 holds (its last token is sampled, never run): the most turn 3 can reuse
            "saved_tokens": results[1].prompt_tokens + results[1].completion_tokens - 1}


def bench_replicas(args: argparse.Namespace, replicas: int) -> dict[str, Any]:
    """One replica count: Ray up, deploy, sweep (+ agents, + failover), Ray and a temporary store down."""
    from ray import serve

    from edgellm.serve import replicas as rs
    temp = None if args.store else tempfile.mkdtemp(prefix="edgellm-bench-store-")
    store = args.store or f"file://{temp}"
    lease = args.replica_lease or rs.REPLICA_LEASE_S
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rs.init_ray(None, replicas, log_to_driver=False)
    try:
        started = time.perf_counter()
        app_kwargs = {"model_path": args.model, "store_dir": store, "max_concurrency": MAX_CONCURRENCY,
                      "max_queue": max(16, *args.concurrency, args.agents)}
        rs.deploy(app_kwargs, replicas, 1, port=port, lease_ttl_s=lease)
        deploy_s = time.perf_counter() - started
        inner = argparse.Namespace(**{**vars(args), "url": url, "model": None, "api_key": None})
        report = asyncio.run(bs.bench(inner))
        out = {"replicas": replicas, "deploy_s": deploy_s, "lease_s": lease, "bench": report}
        if args.failover and replicas >= 2:
            out["failover"] = asyncio.run(failover(url, report["model"], args))
        return out
    finally:
        serve.shutdown()
        import ray
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def command(args: argparse.Namespace) -> str:
    out = ["--replicas", ",".join(map(str, args.replicas))] + ["--failover"] * args.failover
    out += [*(["--model", args.model] if args.model else []), *(["--store", args.store] if args.store else [])]
    out += ["--replica-lease", str(args.replica_lease)] if args.replica_lease is not None else []
    return "edgellm bench serve " + " ".join(out + bs._command_args(args)[2:])


add_arguments = bs.add_arguments


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`bench serve`'s entry: against --url as `bench.serve` runs it, or once per replica count."""
    if args.replicas is None:
        return bs.run(args)
    bs.check_args(args)
    report = run_replicas(args)
    write_report(report, args.json)
    return report


def run_replicas(args: argparse.Namespace) -> dict[str, Any]:
    """Each replica count in turn; prints each one's tables, then the comparison."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError("--replicas needs Ray Serve, which is not installed: pip install 'ray[serve]'") from e
    runs = []
    for n in args.replicas:
        runs.append(bench_replicas(args, n))
        print(f"--- {n} replica(s), deployed in {runs[-1]['deploy_s']:.1f} s")
        bs.print_report(runs[-1]["bench"])
    report = {"command": command(args), "runs": runs}
    print_comparison(report)
    return report


def print_comparison(report: dict[str, Any]) -> None:
    """Per replica count: throughput and TTFT per concurrency, warm turns' prompt share from memory, failover."""
    print(f"{'replicas':>8} {'conc':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'warm from memory':>17} "
          f"{'failover':>9} {'its cached':>11}")
    for run in report["runs"]:
        warm = run["bench"]["agent_summary"].get("warm_cached_share_min")
        fo = run.get("failover")
        for i, lv in enumerate(run["bench"]["levels"]):
            extra = ""
            if i == 0:
                extra = f" {'-' if warm is None else f'{100 * warm:.1f}% (min)':>17}"
                extra += (f" {fo['kill_to_first_token_s']:>8.1f}s {fo['cached_tokens']:>4}/{fo['prompt_tokens']:<6}"
                          if fo else f" {'-':>9} {'-':>11}")
            print(f"{run['replicas']:>8} {lv['concurrency']:>5} {lv['tokens_per_s']:>8.1f} "
                  f"{lv['ttft_p50_s'] * 1e3:>7.0f}ms {lv['ttft_p99_s'] * 1e3:>7.0f}ms{extra}")
    print(report["command"])
