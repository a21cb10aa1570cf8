"""Prometheus metrics of one server, in their own registry so several servers can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Requests, errors, queue depth, TTFT / inter-token latency, cache reuse and KV memory."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgellm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("edgellm_errors", "Requests answered with an error, by error type", ["type"],
                              registry=r)
        self.queue_depth = Gauge("edgellm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("edgellm_active_sequences", "Sequences in the running batch", registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("edgellm_inter_token_latency_seconds", "Time between a stream's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edgellm_decode_batch_size", "Sequences decoded together per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("edgellm_cached_tokens", "Prompt tokens served from KV memory (not prefilled)",
                                     registry=r)
        self.generated_tokens = Counter("edgellm_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("edgellm_cache_hits", "Requests that reused at least one cached token", registry=r)
        self.restored_tokens = Counter("edgellm_restored_tokens", "Agent KV tokens restored from disk", registry=r)
        self.cancelled = Counter("edgellm_cancelled", "Sequences cancelled because the client went away", registry=r)
        self.kv_bytes = Gauge("edgellm_kv_bytes", "KV memory held in RAM (live agents + anonymous caches), "
                              "blocks shared between caches counted once", registry=r)
        self.kv_logical_bytes = Gauge("edgellm_kv_logical_bytes", "KV memory the same caches would hold without "
                                      "sharing blocks", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_by_replica(texts: dict[str, str]) -> str:
    """Several servers' expositions as one, each sample labelled `replica`: the text format wants a family's
    samples together under one HELP/TYPE, so they are regrouped rather than concatenated. Sum across the cluster
    with `sum without (replica) (...)`."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) > 2 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if line not in headers.setdefault(family, []):
                        headers[family].append(line)
                continue
            if not line:
                continue
            end = min(i for i in (line.find("{"), line.find(" ")) if i >= 0)  # a metric name holds neither
            if line[end] == "{":
                rest = line[end + 1:]
                line = f'{line[:end]}{{replica="{replica}"{"" if rest.startswith("}") else ","}{rest}'
            else:
                line = f'{line[:end]}{{replica="{replica}"}}{line[end:]}'
            samples.setdefault(family, []).append(line)
    return "".join(f"{line}\n" for family in {**headers, **samples}
                   for line in [*headers.get(family, []), *samples.get(family, [])])
