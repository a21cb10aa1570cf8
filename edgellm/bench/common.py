"""Pieces every benchmark (and the CLI's model commands) share: argument types and writing the report."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgellm.perf.hardware import physical_cores


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


def thread_count(text: str) -> int:
    """An argparse type: threads from 1 to the logical CPUs. More would oversubscribe them, and OpenMP's spinning
    workers then wait on each other: a decode step gets several times slower, never faster."""
    most = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"expected a thread count from 1 to {most} (this machine's logical CPUs), "
                                         f"got {text!r}")
    return value


def thread_counts(text: str) -> list[int]:
    """An argparse type: comma-separated thread counts, at least one."""
    values = [thread_count(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts, got {text!r}")
    return values


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """`--threads N`, llama.cpp's `-t`: the size of torch's intra-op pool, which the native kernels share."""
    p.add_argument("--threads", type=thread_count, default=physical_cores(),
                   help="threads running the model (default: %(default)s, one per physical core)")


def free_port() -> int:
    """A loopback port free now, for a server a benchmark starts itself."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc: mapped file pages it touched count, the page cache does not)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's pool at `threads` inside the block only: a benchmark run in-process (tests) must not resize it."""
    import torch  # here: the argument types above serve `edgellm plan`, which answers without torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_report(report: dict[str, Any], json_path: Path | None, plot_path: Path | None = None,
                 plot: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """Write the figures as JSON and, where asked, the PNG plot."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    if plot_path and plot:
        plot(report, plot_path)
@contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block (e.g. EDGELLM_FUSED_STEP=0)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
