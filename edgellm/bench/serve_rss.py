"""Server RSS over rounds of mixed requests: starts `edgellm serve` (built-in model), runs the rounds, prints RSS.

python -m edgellm.bench.serve_rss --rounds 5 --requests 200
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

WORDS = ["import", "os", "sys", "def", "return", "for", "in", "if", "else", "while", "class", "self", "print", "the",
         "a", "of", "to", "and", "value", "list", "dict"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def one(url: str, model: str, rng: random.Random, histories: dict[str, list[dict]]) -> int:
    kind = rng.random()
    with httpx.Client(base_url=url, timeout=300) as http:
        if kind < 0.4:  # an agent's next turn
            name = rng.choice(sorted(histories))
            messages = histories[name]
            messages.append({"role": "user", "content": text(rng, rng.randint(5, 60))})
            r = http.post("/v1/chat/completions", headers={"X-Agent-Id": name},
                          json={"model": model, "messages": messages, "max_tokens": 16})
            if r.status_code == 200:
                messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            else:  # context full: start over
                messages.clear()
            return r.status_code
        if kind < 0.9:  # anonymous, long or short, streaming or not
            body = {"model": model, "max_tokens": rng.randint(1, 32), "stream": rng.random() < 0.5}
            if kind < 0.7:
                body["prompt"] = text(rng, rng.randint(5, 1500))
                path = "/v1/completions"
            else:
                body["messages"] = [{"role": "user", "content": text(rng, rng.randint(5, 1500))}]
                path = "/v1/chat/completions"
            if body["stream"]:
                with http.stream("POST", path, json=body) as r:
                    for _ in r.iter_lines():
                        pass
                    return r.status_code
            return http.post(path, json=body).status_code
        bad = rng.choice([{"model": model, "prompt": "x", "max_tokens": "5"},
                          {"model": model, "prompt": "x" * 2_000_000}, {"model": model, "prompt": "x", "seed": 2**70}])
        return http.post("/v1/completions", json=bad).status_code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--port", type=int, default=8131)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--port", str(args.port),
                                   "--store", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while True:
                try:
                    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                    break
                except httpx.HTTPError:
                    assert time.time() < deadline and server.poll() is None, "server did not start"
                    time.sleep(0.5)
            print(f"round 0: RSS {rss_mb(server.pid):.0f} MB (idle after start)")
            rng = random.Random(args.seed)
            histories: dict[str, list[dict]] = {f"agent{i}": [] for i in range(args.agents)}
            for n in range(1, args.rounds + 1):
                rngs = [random.Random(rng.random()) for _ in range(args.requests)]
                t = time.time()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    codes = list(pool.map(lambda r: one(url, model, r, histories), rngs))
                time.sleep(1)
                agents = httpx.get(f"{url}/health").json()["agents"]
                print(f"round {n}: RSS {rss_mb(server.pid):.0f} MB, {time.time() - t:.0f} s, statuses "
                      f"{json.dumps({c: codes.count(c) for c in sorted(set(codes))})}, live agents "
                      f"{agents['live_agents']} holding {agents['live_bytes'] / 2**20:.0f} MB", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
