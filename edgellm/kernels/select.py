"""Which low-bit GEMV to run for a shape: table lookup, VNNI on GGUF blocks, or dequantize + GEMM.

The crossovers come from `edgellm bench kernels --write-select` on this project's reference machine and ship as
select_table.json, so choosing costs a dict lookup; without the native kernels everything goes to dequant + GEMM.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from edgellm.kernels.ggml_blocks import vnni_available
from edgellm.kernels.lut import lut_available

SELECT_TABLE = Path(__file__).with_name("select_table.json")
DEFAULT_MAX_ROWS = 32  # used where the table has no entry: the LUT's reuse of tables per row fades past this


@cache
def _table() -> dict[str, Any]:
    try:
        return json.loads(SELECT_TABLE.read_text())
    except (OSError, ValueError):
        return {}


def choose_kernel(bits: int, n: int, k: int, m: int) -> str:
    """'lut', 'vnni' or 'dequant' for y (m, n) = x (m, k) @ W.T with W at `bits` bits (8 = Q8_0 blocks)."""
    table = _table()
    if bits == 8:
        rows = table.get("vnni_max_rows", DEFAULT_MAX_ROWS)
        return "vnni" if k % 32 == 0 and m <= rows and vnni_available() else "dequant"
    if 1 <= bits <= 4:
        rows = table.get("lut_max_rows", {}).get(str(bits), DEFAULT_MAX_ROWS)
        return "lut" if m <= rows and lut_available() else "dequant"
    return "dequant"


def crossover_table(run: dict[str, Any]) -> dict[str, Any]:
    """From one thread count's results: per bit width the most rows up to which the LUT beat dequant + GEMM on every
    shape measured (likewise Q8_0 VNNI); 1 bit takes 2 bits' figure, as it does strictly less work."""
    def max_rows(results: list[dict], bits_key: int | None, ratio: str) -> int:
        by_rows: dict[int, float] = {}
        for r in results:
            if bits_key is None or r["bits"] == bits_key:
                by_rows[r["rows"]] = min(by_rows.get(r["rows"], float("inf")), r[ratio])
        best = 0
        for m, worst in sorted(by_rows.items()):
            if worst <= 1.0:
                break
            best = m
        return best

    table: dict[str, Any] = {"lut_max_rows": {}}
    for bits in sorted({r["bits"] for r in run.get("lowbit", [])}):
        table["lut_max_rows"][str(bits)] = max_rows(run["lowbit"], bits, "lut_vs_dequant")
    if "2" in table["lut_max_rows"]:
        table["lut_max_rows"]["1"] = table["lut_max_rows"]["2"]
    if run.get("ggml"):
        table["vnni_max_rows"] = max_rows(run["ggml"], None, "q8_0_vs_dequant")
    return table
