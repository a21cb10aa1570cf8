"""Expert offload (models/offload.py): the same tokens and logits as fully resident experts, the resident bytes
within the budget (checked with mincore on the real file mapping), pinning by router counts, and bad budgets."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import edgellm
from edgellm.errors import InvalidRequestError
from edgellm.models import offload
from edgellm.quant.gguf_write import export_gguf
from edgellm.quant.linear import QuantizedLinear
from tests.test_errors import assert_one_line_error, run_cli
from tests.test_moe import moe_checkpoint  # noqa: F401  (fixture)

# experts of 3 x 256 x 128 fp32 (384 KiB): many pages each, so page-granular residency is measurable
SHAPE = {"hidden_size": 128, "moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def prompt() -> list[int]:
    return torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()


def run(model, tok, fused: str, monkeypatch) -> tuple[torch.Tensor, list[int]]:
    monkeypatch.setenv("EDGELLM_FUSED_STEP", fused)
    with torch.no_grad():
        logits = model(torch.tensor([prompt()]))
    return logits, edgellm.generate(model, tok, prompt(), 12).tokens


@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.parametrize("source", ["safetensors", "q8_0", "q4_0"])
def test_offloaded_experts_compute_the_same(moe_checkpoint, tmp_path, monkeypatch, source, fused):  # noqa: F811
    """Op at a time the policy runs in the MoE block; in the fused decode step, through the step's routing hook."""
    path = moe_checkpoint("qwen3_moe", **SHAPE)
    if source != "safetensors":
        path = export_gguf(path, tmp_path / f"{source}.gguf", source)
    model, tok = edgellm.load(path, "fp32")
    for layer in model.model.layers:  # offloaded experts read Q4_0 blocks in place, not through a lookup-table copy
        for m in layer.mlp.experts.modules():
            if isinstance(m, QuantizedLinear):
                m.lut, m.lut_due = None, False
    want_logits, want_tokens = run(model, tok, fused, monkeypatch)
    store = offload.enable(model, "50%", cache_tokens=1)  # a cold cache of one token's experts, the rest pinned
    got_logits, got_tokens = run(model, tok, fused, monkeypatch)
    assert torch.equal(got_logits, want_logits) and got_tokens == want_tokens
    plan = model.__dict__.get("_fused")
    assert plan is None if fused == "0" else bool(plan)  # decode ran op at a time / through the fused step
    stats = store.stats()
    assert stats["tokens"] == 40 + 40 + 11 and 0 < stats["hit_rate"] < 1
    assert 0 < stats["pinned_experts"] < stats["experts"]  # pinned by the first forward's counts
    pinned = sum(x.nbytes for x in store.experts.values() if x.pinned)
    assert pinned <= store.budget - store.cache_budget


def test_eviction_drops_a_file_written_a_moment_ago(tmp_path):
    """Pages of a file just written are dirty and cannot leave the page cache until written back: locating the
    file writes them back, so an evicted expert of a model converted a moment ago really is on disk only."""
    path = tmp_path / "experts.bin"
    path.write_bytes(torch.randint(0, 256, (64 * offload.PAGE,), dtype=torch.uint8).numpy().tobytes())
    mapped = torch.from_file(str(path), shared=True, size=64 * offload.PAGE, dtype=torch.uint8)
    expert = offload.Expert([(None, "weight", mapped)], mapped.numel())
    expert.ranges = [offload._Mappings().locate(*offload._pages(mapped))]
    expert.evict()
    assert expert.resident_bytes() == 0


def test_a_file_system_that_refuses_to_sync_still_offloads(moe_checkpoint, monkeypatch):  # noqa: F811
    """A read-only or network file system may refuse fdatasync: it has nothing to write back, and the budget
    still applies."""
    model, tok = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")

    def refuse(fd: int) -> None:
        raise OSError(errno.EROFS, "read-only file system")

    monkeypatch.setattr(offload.os, "fdatasync", refuse)
    store = offload.enable(model, "50%")
    edgellm.generate(model, tok, prompt(), 4)
    assert store.stats()["tokens"] > 0 and store.resident_bytes() < store.total


def test_resident_expert_bytes_stay_within_the_budget(moe_checkpoint, monkeypatch):  # noqa: F811
    model, tok = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    store = offload.enable(model, "40%", repin_every=16)
    edgellm.generate(model, tok, prompt(), 24)
    slack = sum(len(x.ranges) for x in store.experts.values()) * 2 * offload.PAGE  # shared boundary pages
    assert store.resident_bytes() <= store.budget + slack
    assert store.resident_bytes() < 0.75 * store.total  # what loading and running left in RAM was paged out
    assert store.stats()["disk_bytes_per_token"] > 0


def test_the_cold_cache_keeps_the_last_tokens_experts(moe_checkpoint):  # noqa: F811
    """A token coming back to the experts of two tokens before finds them resident (mincore), not re-read from disk:
    the cold cache holds a few tokens' experts, where one of a layer pair's size had dropped them."""
    model, _ = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    store = offload.enable(model, "50%", prefetch=False)
    store.repins = 1  # no re-pin: the cold cache alone
    layers = len(store.blocks)
    x = torch.zeros(1, SHAPE["hidden_size"])

    def token(experts: list[int]) -> int:
        hits = store.hits
        for i in range(layers):
            store.before(i, x, torch.tensor([experts]))
            for e in experts:  # the experts run: their pages are read
                [float(t.float().sum()) for _, _, t in store.experts[i, e].slots]
        return store.hits - hits

    assert token([0, 1]) == 0 and token([2, 3]) == 0  # first uses: read from disk
    assert token([0, 1]) == 2 * layers  # two tokens later, still resident
    assert not any(x.pinned for x in store.experts.values())


def test_repin_keeps_the_most_routed_experts(moe_checkpoint):  # noqa: F811
    model, _ = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    store = offload.enable(model, "50%", cache_tokens=1)
    store.counts.zero_()
    store.counts[0, 5] = store.counts[1, 2] = 100.0
    store.counts[1, 7] = 50.0
    store.repin()
    pinned = {key for key, x in store.experts.items() if x.pinned}
    assert {(0, 5), (1, 2), (1, 7)} <= pinned
    assert sum(store.experts[k].nbytes for k in pinned) <= store.budget - store.cache_budget
    store.counts.zero_()
    store.counts[0, 0] = 1000.0
    store.repin()  # demoted experts point back at the mapping; the forward still computes the same
    assert store.experts[0, 0].pinned
    with torch.no_grad():
        model(torch.tensor([prompt()]))


def test_full_budget_pins_every_expert(moe_checkpoint, monkeypatch):  # noqa: F811
    model, tok = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    want = run(model, tok, "0", monkeypatch)[1]
    store = offload.enable(model, "100%")
    assert all(x.pinned for x in store.experts.values())
    assert run(model, tok, "0", monkeypatch)[1] == want and store.stats()["hit_rate"] == 1


def test_bad_budgets_are_refused(moe_checkpoint, checkpoint):  # noqa: F811
    model, _ = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    for text, message in (("lots", "as a size"), ("120%", "0% to 100%"), ("1KiB", "below two layers")):
        with pytest.raises(InvalidRequestError, match=message):
            offload.enable(model, text)
    dense, _ = edgellm.load(checkpoint("llama"), "fp32")
    with pytest.raises(InvalidRequestError, match="no experts"):
        offload.enable(dense, "1GiB")
    assert offload.parse_budget("2GiB", 0) == 2 * 2**30 and offload.parse_budget("25%", 400) == 100


def test_cli_generates_within_an_expert_budget(moe_checkpoint, tmp_path):  # noqa: F811
    path = export_gguf(moe_checkpoint("qwen3_moe", **SHAPE), tmp_path / "m.gguf", "q8_0")
    plain = run_cli("generate", "--model", str(path), "--prompt", "def f(x):", "--max-tokens", "8", "--json",
                    "--threads", "1")
    held = run_cli("generate", "--model", str(path), "--prompt", "def f(x):", "--max-tokens", "8", "--json",
                   "--threads", "1", "--expert-budget", "60%")
    assert plain.returncode == held.returncode == 0, held.stderr
    out = json.loads(held.stdout)
    assert out["tokens"] == json.loads(plain.stdout)["tokens"]
    assert out["experts"]["tokens"] > 0 and out["experts"]["budget_bytes"] < out["experts"]["expert_bytes"]
    assert_one_line_error(run_cli("generate", "--model", str(path), "--prompt", "x", "--expert-budget", "2 lots"),
                          "2 lots")


def test_an_error_in_the_policy_surfaces_from_the_fused_step(moe_checkpoint, monkeypatch):  # noqa: F811
    model, tok = edgellm.load(moe_checkpoint("qwen3_moe", **SHAPE), "fp32")
    store = offload.enable(model, "50%")
    edgellm.generate(model, tok, prompt(), 2)

    real = store.before

    def broken(layer, x, index, in_step=False):  # the prefill runs op at a time: only the fused step's calls fail
        if in_step:
            raise RuntimeError(f"policy failed at layer {layer}")
        real(layer, x, index)

    monkeypatch.setattr(store, "before", broken)
    model.__dict__.pop("_fused", None)  # re-plan: the hook looks the policy up when called
    with pytest.raises(RuntimeError, match="policy failed at layer 0"):
        edgellm.generate(model, tok, prompt(), 4)


def test_bf16_experts_stay_mapped_and_offload(moe_checkpoint, monkeypatch):  # noqa: F811
    """A bf16 checkpoint loaded in bf16: the experts' gate/up are not fused into a copy, so they stay mapped from
    the file and an expert budget applies (the fused step runs bf16 weights as stored)."""
    model, tok = edgellm.load(moe_checkpoint("qwen3_moe", dtype=torch.bfloat16, **SHAPE), "bf16")
    expert = model.model.layers[0].mlp.experts[0]
    assert expert.gate_up is None
    want = run(model, tok, "1", monkeypatch)[1]
    store = offload.enable(model, "50%", cache_tokens=1)
    assert run(model, tok, "1", monkeypatch)[1] == want
    assert 0 < store.stats()["pinned_experts"] < store.stats()["experts"]
