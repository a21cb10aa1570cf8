"""Where one decode step's time goes, by kind of op: weight GEMVs, attention, norms, RoPE + KV write, the rest.

A decode step that is slower than llama.cpp's can then be pinned on a kind of op instead of guessed at. Each op
is wrapped with a perf_counter timer (CPU ops are synchronous: the clock brackets the work itself). Times are
exclusive: an op called inside another (the key norm inside the KV placement) counts once, under its own kind, so
the kinds never overlap and "other" (embedding, residual adds, SiLU, casts, sampling, Python) is the measured
step minus their sum. The timers cost about a microsecond per op; `step_ms` includes them.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

OP_KINDS = ("attn_qkv", "attn_o", "mlp_gate_up", "mlp_down", "lm_head", "attention", "rms_norm", "rope_kv_write",
            "other")
PROJECTIONS = {"q_proj": "attn_qkv", "k_proj": "attn_qkv", "v_proj": "attn_qkv", "o_proj": "attn_o",
               "gate_proj": "mlp_gate_up", "up_proj": "mlp_gate_up", "down_proj": "mlp_down", "lm_head": "lm_head"}
WARMUP_STEPS = 4


class OpTimer:
    """Exclusive seconds and call counts per op kind, summed over the wrapped calls since the last reset."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self._nested: list[float] = []  # per open call: seconds spent in wrapped calls inside it

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._nested.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                self.seconds[kind] += elapsed - self._nested.pop()
                self.calls[kind] += 1
                if self._nested:
                    self._nested[-1] += elapsed
        return timed


@contextmanager
def instrumented(model: nn.Module, caches: list[Any], timer: OpTimer) -> Iterator[None]:
    """Time every op of a Llama-family `model`'s forward and its `caches`' attention with `timer`, until exit.

    Modules and caches get an instance attribute shadowing their method; the fused q/k/v and gate/up GEMVs are
    calls of the model module's `linear`, told apart by their weight tensor.
    """
    from edgellm.models import llama

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, kind: str) -> None:
        original, own = getattr(owner, name), name in vars(owner)
        setattr(owner, name, timer.wrap(kind, original))
        undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))

    for name, module in model.named_modules():
        if (kind := PROJECTIONS.get(name.rsplit(".", 1)[-1])) is not None:
            patch(module, "forward", kind)
        elif isinstance(module, llama.RMSNorm):
            patch(module, "forward", "rms_norm")
        elif isinstance(module, llama.Attention):
            patch(module, "place_kv", "rope_kv_write")
    patch(model.rope, "cos_sin", "rope_kv_write")
    patch(llama, "apply_rope", "rope_kv_write")
    for cache in caches:
        patch(cache, "attend", "attention")
        for name in ("update_and_fetch", "_store"):  # a dense cache's write, a quantized one's
            if hasattr(cache, name):
                patch(cache, name, "rope_kv_write")
    fused = {id(layer.self_attn.qkv[0]): "attn_qkv" for layer in model.model.layers if layer.self_attn.qkv} | \
            {id(layer.mlp.gate_up[0]): "mlp_gate_up" for layer in model.model.layers if layer.mlp.gate_up}
    original_linear = llama.linear
    timed = {kind: timer.wrap(kind, original_linear) for kind in ("attn_qkv", "mlp_gate_up")}

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        kind = fused.get(id(weight))
        return (timed[kind] if kind else original_linear)(x, weight, bias)

    llama.linear = linear
    undo.append(lambda: setattr(llama, "linear", original_linear))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def measure_op_split(model: nn.Module, prompt: list[int], steps: int, warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Mean exclusive ms, % of the step and calls per op kind over `steps` greedy decode steps after `warmup`,
    each step run exactly as generation runs it (runner.decode) after a `prompt` prefill."""
    from edgellm import runner
    from edgellm.kv.prompt_cache import PromptCache
    from edgellm.sequence import Sequence

    cache = PromptCache(model, capacity=len(prompt) + warmup + steps + 1)
    seq = Sequence(model, None, prompt, cache, warmup + steps + 1)  # greedy, token ids only: no EOS stop
    runner.prefill(model, [seq])
    timer = OpTimer()
    with instrumented(model, cache.layers, timer):
        for _ in range(warmup):
            runner.decode(model, [seq])
        timer.reset()
        done, t0 = 0, time.perf_counter()
        while done < steps and not seq.finished:  # the context window may end the sequence early
            runner.decode(model, [seq])
            done += 1
        step_ms = 1000 * (time.perf_counter() - t0) / done
    ops = {kind: {"ms": 1000 * timer.seconds[kind] / done, "calls": timer.calls[kind] / done}
           for kind in OP_KINDS[:-1]}
    ops["other"] = {"ms": step_ms - sum(op["ms"] for op in ops.values())}
    for op in ops.values():
        op["pct"] = 100 * op["ms"] / step_ms
    return {"steps": done, "context": len(prompt), "step_ms": step_ms, "ops": ops}


def print_op_split(title: str, splits: dict[str, dict[str, Any]], reference_ms: dict[str, float]) -> None:
    """One row per op kind, one column per measured configuration, each cell "ms (% of the step)"; `reference_ms`
    (column → another engine's step, e.g. llama.cpp's) is the last row, so the gap sits under the ops to close it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("op")
    for column in splits:
        table.add_column(column, justify="right")
    for kind in OP_KINDS:
        table.add_row(kind, *[f"{s['ops'][kind]['ms']:.3f} ({s['ops'][kind]['pct']:.1f}%)" for s in splits.values()])
    table.add_row("step, timed", *[f"{s['step_ms']:.3f}" for s in splits.values()], end_section=True)
    rows = [("step, untimed", {c: s["untimed_step_ms"] for c, s in splits.items() if "untimed_step_ms" in s}),
            ("llama.cpp step", reference_ms)]
    for label, values in rows:
        if values:
            table.add_row(label, *[f"{values[c]:.3f}" if c in values else "-" for c in splits])
    Console(width=220).print(table)
