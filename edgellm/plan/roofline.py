"""The roofline PNG: the device's memory and compute roofs, and each op of the plan placed at its arithmetic
intensity and the FLOP/s the cost model gives it (an op below both roofs is paying overhead or dequantization)."""

from __future__ import annotations

from pathlib import Path


def plot_roofline(plan: dict, device, threads: int | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = device.rates(threads)
    peak = max(rates.gemm_gflops.values())
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [2.0**i for i in range(-4, 13)]
    ax.plot(xs, [min(peak, x * rates.dram_gbs) for x in xs], "k-", label=f"DRAM {rates.dram_gbs:.0f} GB/s, "
            f"best GEMM {peak:.0f} GFLOP/s")
    for fmt, gbs in rates.weight_gbs.items():
        ax.plot(xs, [min(rates.gemm_gflops.get(fmt, peak), x * gbs) for x in xs], ":", lw=1,
                label=f"{fmt}: decode {gbs:.1f} GB/s, prefill {rates.gemm_gflops.get(fmt, peak):.0f} GFLOP/s")
    for phase, marker in (("decode_ops", "o"), ("prefill_ops", "s")):
        for op in plan[phase]:
            if op["gflop"] and op["mbytes"] and op["ms"]:
                x, y = op["intensity_flop_per_byte"], op["gflop"] / (op["ms"] / 1000)
                ax.scatter([x], [y], marker=marker)
                ax.annotate(f"{phase[:-4]}: {op['op']}", (x, y), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"{plan['model']} {plan['format']} on {device.name} ({device.kind})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
