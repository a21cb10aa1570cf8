"""What calibration and validation time with edgellm's own engine: random-init checkpoints of a given shape in a
given format, and the prefill, decode and batched decode of a loaded model.

Every timing is the best of a few repetitions (`best_seconds`): the host is shared, and only the fastest run is free
of a neighbour's interference. On one thread it reads the thread's CPU time, not the wall clock: a neighbour that
takes the core for a while shows in the wall clock but not in the time the engine ran, which is what the step takes
on an idle machine. On more threads only the wall clock tells, and a step counts only if every thread was on a CPU
all along (the process's CPU time is the thread count times the wall time): one thread preempted stalls the others
at the next barrier. A neighbour's memory traffic still shows either way (`plan validate`'s load factor covers it).
Memory is counted on the loaded tensors, not read from RSS, so one process can measure checkpoint after checkpoint
(a fresh process per checkpoint cost more than the measuring on 2 cores).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgellm.bench.common import torch_threads
from edgellm.bench.speed import import_transformers

MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
FLUSH_MIB = 96  # read between timed steps when `cold`: three times an L3 of 32 MiB


ON_CPU = 0.9  # share of the thread count × the wall time the process must have run for a multi-thread step to count
ATTEMPTS, PAUSE_S = 4, 0.5  # rounds of repetitions tried (pausing between) before a contended best is kept


def best_seconds(run: Callable[[], object], reps: int, threads: int,
                 before: Callable[[], object] | None = None, attempts: int = ATTEMPTS) -> float:
    """Fastest of `reps` timed calls of `run` (`before` runs untimed ahead of each) at `threads` threads, as the
    module docstring says; with no uncontended call in a round, up to `attempts` rounds, then the fastest of all."""
    return best_timing(run, reps, threads, before, attempts)[0]


def best_timing(run: Callable[[], object], reps: int, threads: int, before: Callable[[], object] | None = None,
                attempts: int = ATTEMPTS) -> tuple[float, bool]:
    """`best_seconds`, and whether every call was contended (the time kept is then no clean one)."""
    best = float("inf")
    for attempt in range(attempts):
        clean = float("inf")
        for _ in range(reps):
            if before is not None:
                before()
            wall, cpu = time.perf_counter(), time.thread_time() if threads == 1 else time.process_time()
            run()
            wall = time.perf_counter() - wall
            cpu = (time.thread_time() if threads == 1 else time.process_time()) - cpu
            if threads == 1:
                clean = min(clean, cpu)
            elif cpu >= ON_CPU * threads * wall:
                clean = min(clean, wall)
            best = min(best, wall)
        if clean < float("inf"):
            return clean, False
        if attempt + 1 < attempts:
            time.sleep(PAUSE_S)
    return best, True


class CacheFlush:
    """Evicts the last-level cache (reads a buffer three times its size) so a timed step reads its weights from DRAM,
    as any model larger than the cache does: a small calibration model would otherwise run from the cache."""

    def __init__(self, mib: int = FLUSH_MIB) -> None:
        self.buffer = torch.ones(mib * 2**20 // 4)

    def __call__(self) -> None:
        self.buffer.sum()


class WeightFlush:
    """Evicts only `model`'s weights (each cache line of them), so a timed decode step reads them from DRAM while its
    small state stays cached, as in a model larger than the cache: a whole-cache sweep also evicted the activations,
    the KV cache and the step's plan, whose misses a many-layer calibration model paid per layer and a real model
    does not. Falls back to the sweep where lines cannot be evicted one by one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = [t for t in weight_tensors(model) if t.is_cpu and t.is_contiguous()]
        self.sweep: CacheFlush | None = None

    def __call__(self) -> None:
        from edgellm.kernels.kvattn import evict_lines

        if not evict_lines(self.tensors):
            self.sweep = self.sweep or CacheFlush()
            self.sweep()


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer once, plus the table-lookup copies made at load: what a decode step streams."""
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append(t)
    for module in model.modules():
        lut = getattr(module, "lut", None)
        if lut is not None:
            out += [lut.packed, lut.scale, lut.bias]
    return out


def build_random(shape: dict, out: Path) -> Path:
    """A seeded random-init Llama (or Qwen3-MoE when `shape` names experts) saved by transformers in fp32."""
    transformers = import_transformers()
    torch.manual_seed(0)
    common = {"max_position_embeddings": 8192, "bos_token_id": 0, "eos_token_id": 1, **shape}
    if "num_experts" in shape:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(norm_topk_prob=True, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(out)
    return out


def checkpoint(base: Path, fmt: str, work: Path) -> tuple[Path, str | None]:
    """The checkpoint and load dtype for `fmt`: the base itself for fp32/bf16, else an `edgellm quantize` copy."""
    if fmt in ("fp32", "bf16"):
        return base, fmt
    out = work / f"{base.name}-{fmt}"
    if not out.exists():
        from edgellm.quant.convert import quantize_checkpoint
        quantize_checkpoint(base, out, fmt)
    return out, None


class Engine:
    """A loaded checkpoint and the three timings the planner predicts."""

    def __init__(self, path: Path, dtype: str | None) -> None:
        from edgellm.loader import load_model

        self.model = load_model(path, dtype)
        self.loaded_weight_bytes = self.weight_bytes()  # before any step: a first batched step adds Q4_0's copy
        self.vocab = int(self.model.args.vocab_size)
        self.contended = False  # the last timing had no run free of a neighbour (best_timing)

    def _prompt(self, n: int, seed: int = 0) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(2, self.vocab, (n,), generator=g).tolist()

    def _sequence(self, ids: list[int], steps: int, kv_format=None):
        from edgellm.kv.prompt_cache import PromptCache
        from edgellm.sequence import Sequence

        cache = PromptCache(self.model, capacity=len(ids) + steps + 1, kv_format=kv_format)
        return Sequence(self.model, None, ids, cache, steps + 1, ignore_eos=True)

    @torch.inference_mode()
    def prefill_s(self, tokens: int, reps: int, threads: int) -> float:
        """Best TTFT of a cold `tokens`-token prompt (cache allocation included, as in a real request).

        The `reps` prompts timed (each into a fresh cache, round after round) are each run once untimed first: kernels
        built, allocator warm, and every lazy table-lookup copy their calls need made. With one warm-up prompt of its
        own, a random MoE (whose router sends a prompt's tokens to few experts) made the copies of the experts the
        timed prompts reached first inside the timing: 2.3x the steady prefill time at the first call, every run."""
        from edgellm import runner

        prompts = [self._prompt(tokens, seed) for seed in range(1, reps + 1)]
        for ids in prompts:
            runner.prefill(self.model, [self._sequence(ids, 1)])
        pending = []

        def new_sequence() -> None:
            pending.append(self._sequence(prompts[len(pending) % reps], 1))

        seconds, self.contended = best_timing(lambda: runner.prefill(self.model, [pending[-1]]), reps, threads,
                                              new_sequence)
        return seconds

    @torch.inference_mode()
    def decode_step_s(self, context: int, steps: int, threads: int, batch: int = 1, kv_format=None,
                      flush: Callable[[], None] | None = None) -> float:
        """Fastest of `steps` individually timed decode steps of `batch` sequences after `context`-token prompts: on a
        shared host a neighbour preempts some steps by milliseconds, and the fastest is the one it left alone.
        `flush` runs before each timed step (CacheFlush: the weights come from DRAM)."""
        from edgellm import runner

        room = ATTEMPTS * steps + 2
        seqs = [self._sequence(self._prompt(context, i), room, kv_format) for i in range(batch)]
        runner.prefill(self.model, seqs)
        runner.decode(self.model, seqs)  # warm-up step
        seconds, self.contended = best_timing(lambda: runner.decode(self.model, seqs), steps, threads, flush)
        return seconds

    def decode_bytes(self) -> int:
        """Bytes one decode step reads, counted on the loaded model (bench quant's count)."""
        from edgellm.bench.quant import _decode_bytes
        return _decode_bytes(self.model)

    def weight_bytes(self) -> int:
        """Bytes the loaded weights hold: every parameter and buffer once, plus the table-lookup copies made at
        load (what RSS would show without the allocator's and the runtime's own share)."""
        return sum(t.numel() * t.element_size() for t in weight_tensors(self.model))

    def kv_bytes_per_token(self, tokens: int = 256) -> tuple[float, str]:
        """Bytes the default cache of `tokens` tokens allocates per token, and its dtype's name."""
        from edgellm.kv.prompt_cache import PromptCache
        from edgellm.perf.hardware import dtype_name
        layers = PromptCache(self.model, tokens).layers
        return sum(layer.nbytes for layer in layers) / tokens, dtype_name(layers[0].keys.dtype)


def measure_checkpoint(path: str, dtype: str | None, plan: list[dict]) -> list[dict]:
    """Run every timing in `plan` (dicts with kind prefill|decode, threads, tokens/context/batch/steps/reps) on one
    checkpoint; return a header (bytes a decode step reads, weight bytes held, KV bytes per token and dtype), then
    each item with its measured seconds."""
    from edgellm.kv.formats import KVFormat

    engine = Engine(Path(path), dtype)
    out = []
    for item in plan:
        t = item["threads"]
        with torch_threads(t):
            if item["kind"] == "prefill":
                seconds = engine.prefill_s(item["tokens"], item.get("reps", 2), t)
            else:
                kv = KVFormat.parse(item["kv"]) if item.get("kv") else None
                seconds = engine.decode_step_s(item["context"], item.get("steps", 8), t, item.get("batch", 1), kv)
        out.append({**item, "seconds": seconds, "contended": engine.contended})
    kv_bytes, kv_dtype = engine.kv_bytes_per_token()
    return [{"decode_bytes": engine.decode_bytes(), "weight_bytes": engine.loaded_weight_bytes,
             "kv_bytes_per_token": kv_bytes, "kv_dtype": kv_dtype}, *out]


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
