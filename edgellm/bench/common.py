"""Pieces every benchmark shares: argument types and writing the report."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


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
