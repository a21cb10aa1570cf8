"""`--threads`: the physical-core default, the one-line refusal of bad counts, and torch's pool set before the model
runs; and the op split of one decode step, whose accounting must cover the step exactly once."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from edgellm.bench import opsplit
from edgellm.bench.opsplit import MOE_OP_KINDS, OP_KINDS, OpTimer, measure_op_split
from edgellm.cli import main
from edgellm.kernels import linear
from edgellm.loader import load_model
from edgellm.models import llama, moe
from edgellm.models.moe import mix_experts, topk_softmax
from edgellm.models.rope import apply_rope
from edgellm.perf.hardware import physical_cores
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_cli_errors import house_error
from tests.test_moe import MOE_CONFIGS


def cpuinfo(*cpus: tuple[int, int]) -> str:
    """/proc/cpuinfo text with one block per logical CPU, given as (physical id, core id)."""
    return "\n\n".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nphysical id\t: {socket_id}\n"
                       f"siblings\t: {len(cpus)}\ncore id\t\t: {core}\nflags\t\t: fpu avx2"
                       for i, (socket_id, core) in enumerate(cpus)) + "\n\n"


@pytest.mark.parametrize("text, allowed, cores", [
    (cpuinfo((0, 0), (0, 1)), {0, 1}, 2),  # 2 cores, no SMT (this project's 2-vCPU VMs report this)
    (cpuinfo((0, 0), (0, 1), (0, 0), (0, 1)), {0, 1, 2, 3}, 2),  # 2 cores x 2 hyperthreads
    (cpuinfo((0, 0), (0, 0)), {0, 1}, 1),  # 1 core, 2 hyperthreads
    (cpuinfo((0, 0), (0, 1), (1, 0), (1, 1)), {0, 1, 2, 3}, 4),  # 2 sockets: core ids repeat per socket
    (cpuinfo((0, 0), (0, 1), (0, 0), (0, 1)), {0, 2}, 1),  # affinity: two hyperthreads of one core
    ("processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n", {0, 1}, 2),  # ARM: no core ids
    ("", {0, 1, 2}, 3),  # no /proc/cpuinfo: the allowed CPUs
])
def test_physical_cores_from_cpuinfo(text: str, allowed: set[int], cores: int):
    assert physical_cores(text, allowed) == cores


def test_physical_cores_here_is_a_default_thread_count():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x"], ["chat"], ["serve"], ["bench", "speed"], ["bench", "quant"]])
@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", str((os.cpu_count() or 1) + 1)])
def test_bad_thread_counts_are_one_house_line(capsys, argv: list[str], bad: str):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--threads", bad])
    assert house_error(exit_info.value.code, capsys.readouterr().err, "--threads") is None


def test_bench_quant_refuses_a_bad_count_in_its_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "quant", "--threads", "1,0"])
    assert house_error(exit_info.value.code, capsys.readouterr().err, "thread count from 1") is None


def test_serve_sizes_the_pool_before_the_engine_starts(monkeypatch):
    seen = []
    monkeypatch.setattr("edgellm.serve.serve", lambda *args, **kwargs: seen.append(torch.get_num_threads()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    previous = torch.get_num_threads()
    try:
        assert main(["serve", "--threads", "1", "--port", str(port)]) == 0
    finally:
        torch.set_num_threads(previous)
    assert seen == [1]


def test_op_timer_counts_nested_time_once(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(opsplit.time, "perf_counter", lambda: clock[0])
    timer = OpTimer()

    def tick(seconds: float) -> None:
        clock[0] += seconds

    inner = timer.wrap("inner", lambda: tick(3))
    outer = timer.wrap("outer", lambda: (tick(1), inner(), tick(1)))
    outer()
    assert timer.seconds == {"inner": 3, "outer": 2} and timer.calls == {"inner": 1, "outer": 1}


@pytest.mark.parametrize("dtype, fused", [("fp32", False), ("bf16", True)])
def test_op_split_covers_the_step_once(llama_dir, dtype: str, fused: bool):
    model = load_model(llama_dir, dtype)
    layers = model.args.num_hidden_layers
    assert (model.model.layers[0].self_attn.qkv is not None) == fused
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        before = model(ids)
    split = measure_op_split(model, list(range(3, 19)), steps=3, warmup=1)
    ops = split["ops"]
    assert tuple(ops) == OP_KINDS and split["steps"] == 3
    assert all(ops[kind]["ms"] > 0 for kind in OP_KINDS[:-1]) and ops["other"]["ms"] >= 0  # no time counted twice
    assert sum(op["ms"] for op in ops.values()) == pytest.approx(split["step_ms"], rel=1e-6)
    assert sum(op["pct"] for op in ops.values()) == pytest.approx(100)
    # every op of every layer was timed: calls per step follow the architecture
    calls = {kind: ops[kind]["calls"] for kind in OP_KINDS[:-1]}
    assert calls == {"attn_qkv": layers * (1 if fused else 3), "attn_o": layers,
                     "mlp_gate_up": layers * (1 if fused else 2), "mlp_down": layers, "lm_head": 1,
                     "attention": layers, "rms_norm": 2 * layers + 1,
                     "rope_kv_write": 4 * layers + 1}  # place_kv, 2 RoPEs and the cache write; cos/sin once
    # the timers are gone afterwards and the model computes what it did before
    assert llama.linear is linear and llama.apply_rope is apply_rope
    assert "forward" not in vars(model.lm_head) and "cos_sin" not in vars(model.rope)
    with torch.no_grad():
        assert torch.equal(model(ids), before)


@pytest.mark.parametrize("dtype, fused", [("fp32", False), ("bf16", True)])
def test_op_split_times_moe_layers(tmp_path, monkeypatch, dtype: str, fused: bool):
    """Qwen2-MoE: router, routed experts and their dispatch are kinds of their own; the shared expert is an MLP
    (fused in bf16; routed experts never are: they stay mapped from the file)."""
    monkeypatch.setitem(CONFIGS, "qwen2_moe", MOE_CONFIGS["qwen2_moe"])
    model = load_model(build_checkpoint(tmp_path / "moe", "qwen2_moe"), dtype)
    block = model.model.layers[0].mlp
    assert block.experts[0].gate_up is None and (block.shared_expert.gate_up is not None) == fused
    split = measure_op_split(model, list(range(3, 19)), steps=3, warmup=1)
    ops, layers, k = split["ops"], model.args.num_hidden_layers, model.args.num_experts_per_tok
    assert tuple(ops) == OP_KINDS[:4] + MOE_OP_KINDS + OP_KINDS[4:]
    assert all(ops[kind]["ms"] > 0 for kind in ops if kind != "other")
    assert sum(op["ms"] for op in ops.values()) == pytest.approx(split["step_ms"], rel=1e-6)
    calls = {kind: ops[kind]["calls"] for kind in ("mlp_gate_up", "mlp_down", "moe_router", "expert_gate_up",
                                                   "expert_down", "expert_dispatch")}
    assert calls == {"mlp_gate_up": layers * (1 if fused else 2), "mlp_down": layers,
                     "moe_router": 3 * layers,  # gate, softmax/top-k, shared-expert gate
                     "expert_gate_up": layers * k * 2, "expert_down": layers * k,
                     "expert_dispatch": layers}
    assert moe.mix_experts is mix_experts and moe.topk_softmax is topk_softmax  # the timers are gone afterwards
    assert "forward" not in vars(model.model.layers[0].mlp.gate)
