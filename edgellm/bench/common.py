"""Pieces every benchmark shares: argument types and writing the report."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",") if t.strip()]


def write_report(report: dict[str, Any], json_path: Path | None, plot_path: Path | None = None,
                 plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """Write the figures as JSON and, where asked, the PNG plot."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    if plot_path and plot:
        plot(report, plot_path)
