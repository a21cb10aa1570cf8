"""Where one decode step's time goes, by kind of op: weight GEMVs, attention, norms, RoPE + KV write, the rest.

A decode step that is slower than llama.cpp's can then be pinned on a kind of op instead of guessed at. Each op
is wrapped with a perf_counter timer (CPU ops are synchronous: the clock brackets the work itself). Times are
exclusive: an op called inside another (the key norm inside the KV placement) counts once, under its own kind, so
the kinds never overlap and "other" (embedding, residual adds, SiLU, casts, sampling, Python) is the measured
step minus their sum. The timers cost about a microsecond per op; `step_ms` includes them. The split runs the step
op at a time (EDGELLM_FUSED_STEP=0): the fused native step has no ops to wrap, so its time is set beside it.

An MoE model adds kinds of its own: the router (gate GEMV, softmax/top-k, Qwen2-MoE's shared-expert gate), the
routed experts' GEMVs, and their dispatch (sorting tokens by expert, the weighted scatter-add, SiLU). A shared
expert is an always-on MLP, so it counts as mlp_gate_up / mlp_down.
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

from edgellm.bench.common import env_var

OP_KINDS = ("attn_qkv", "attn_o", "mlp_gate_up", "mlp_down", "lm_head", "attention", "rms_norm", "rope_kv_write",
            "other")
MOE_OP_KINDS = ("moe_router", "expert_gate_up", "expert_down", "expert_dispatch")
PROJECTIONS = {"q_proj": "attn_qkv", "k_proj": "attn_qkv", "v_proj": "attn_qkv", "o_proj": "attn_o",
               "gate_proj": "mlp_gate_up", "up_proj": "mlp_gate_up", "down_proj": "mlp_down", "lm_head": "lm_head"}
ROUTERS = ("gate", "shared_expert_gate")  # an MoE block's Linear children that score experts
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


def op_kinds(model: nn.Module) -> tuple[str, ...]:
    """The kinds a step of `model` is split into: OP_KINDS, with MOE_OP_KINDS before lm_head for an MoE model."""
    from edgellm.models import moe

    if not any(isinstance(m, moe.SparseMoeBlock) for m in model.modules()):
        return OP_KINDS
    return OP_KINDS[:4] + MOE_OP_KINDS + OP_KINDS[4:]


def projection_kind(name: str) -> str | None:
    """The op kind of the projection module called `name`: a routed expert's GEMVs apart from the dense MLP's."""
    kind = PROJECTIONS.get(name.rsplit(".", 1)[-1])
    if kind is not None and ".experts." in name:
        return kind.replace("mlp_", "expert_")
    return kind


@contextmanager
def instrumented(model: nn.Module, caches: list[Any], timer: OpTimer) -> Iterator[None]:
    """Time every op of a Llama-family or MoE `model`'s forward and its `caches`' attention with `timer`, until exit.

    Modules and caches get an instance attribute shadowing their method; the fused q/k/v and gate/up GEMVs are
    calls of the model module's `linear`, told apart by their weight tensor.
    """
    from edgellm.models import llama, moe

    undo: list[Callable[[], None]] = []

    def patch(owner: Any, name: str, kind: str) -> None:
        original, own = getattr(owner, name), name in vars(owner)
        setattr(owner, name, timer.wrap(kind, original))
        undo.append(lambda: setattr(owner, name, original) if own else delattr(owner, name))

    fused: dict[int, str] = {}  # fused weight → kind
    for name, module in model.named_modules():
        if (kind := projection_kind(name)) is not None:
            patch(module, "forward", kind)
        elif isinstance(module, llama.RMSNorm):
            patch(module, "forward", "rms_norm")
        elif isinstance(module, llama.Attention):
            patch(module, "place_kv", "rope_kv_write")
        elif isinstance(module, moe.SparseMoeBlock):
            for router in ROUTERS:
                if hasattr(module, router):
                    patch(getattr(module, router), "forward", "moe_router")
        if getattr(module, "qkv", None) is not None:
            fused[id(module.qkv[0])] = "attn_qkv"
        if getattr(module, "gate_up", None) is not None:
            fused[id(module.gate_up[0])] = projection_kind(f"{name}.gate_proj")
    patch(model.rope, "cos_sin", "rope_kv_write")
    patch(llama, "apply_rope", "rope_kv_write")
    patch(moe, "topk_softmax", "moe_router")
    patch(moe, "mix_experts", "expert_dispatch")
    for cache in caches:
        patch(cache, "attend", "attention")
        for name in ("update_and_fetch", "_store"):  # a dense cache's write, a quantized one's
            if hasattr(cache, name):
                patch(cache, name, "rope_kv_write")
    original_linear = llama.linear
    timed = {kind: timer.wrap(kind, original_linear) for kind in set(fused.values())}

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
    with instrumented(model, cache.layers, timer), env_var("EDGELLM_FUSED_STEP", "0"):
        for _ in range(warmup):
            runner.decode(model, [seq])
        timer.reset()
        done, t0 = 0, time.perf_counter()
        while done < steps and not seq.finished:  # the context window may end the sequence early
            runner.decode(model, [seq])
            done += 1
        step_ms = 1000 * (time.perf_counter() - t0) / done
    ops = {kind: {"ms": 1000 * timer.seconds[kind] / done, "calls": timer.calls[kind] / done}
           for kind in op_kinds(model)[:-1]}
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
    kinds = [kind for kind in OP_KINDS[:4] + MOE_OP_KINDS + OP_KINDS[4:]
             if any(kind in s["ops"] for s in splits.values())]
    for kind in kinds:
        table.add_row(kind, *[f"{s['ops'][kind]['ms']:.3f} ({s['ops'][kind]['pct']:.1f}%)" if kind in s["ops"]
                              else "-" for s in splits.values()])
    table.add_row("step, timed", *[f"{s['step_ms']:.3f}" for s in splits.values()], end_section=True)
    rows = [("step, untimed", {c: s["untimed_step_ms"] for c, s in splits.items() if "untimed_step_ms" in s}),
            ("llama.cpp step", reference_ms)]
    for label, values in rows:
        if values:
            table.add_row(label, *[f"{values[c]:.3f}" if c in values else "-" for c in splits])
    Console(width=220).print(table)
