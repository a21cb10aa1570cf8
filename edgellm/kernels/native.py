"""Native CPU kernels: a torch C++ extension compiled on first use and cached on disk.

Any build failure (no compiler, no ninja, EDGELLM_NO_NATIVE=1) leaves the pure-PyTorch paths in charge. Builds are
serialised across processes by an `flock` that the kernel releases when its holder dies, so a build killed midway
(Ctrl-C, `kill -9`, a container stop) never blocks the next process: that one takes the lock, clears the stale
torch lock file and builds again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -march=native unlocks AVX-512; the plainer builds are for compilers or CPUs that refuse it. -fopenmp is what makes
# at::parallel_for parallel: ATen defines INTRA_OP_PARALLEL only under _OPENMP, so without it every kernel ran
# on one thread whatever torch.set_num_threads said. The extension then needs libgomp.so.1, which torch has
# already loaded: the same soname, so one OpenMP runtime and one thread count. The last set (one thread) is for
# a toolchain without OpenMP.
CFLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
_BUILD_LOCK = threading.Lock()
BUILD_SECONDS = {"gemv": 30, "decode": 30, "ggml_blocks": 45, "kquants": 45, "lut": 40, "softmax": 25,
                 "kvattn": 40, "kvcodec": 30, "step": 90}  # 2 cores


def _single_thread_after_fork() -> None:
    """GNU OpenMP cannot start a parallel region in a child forked after the parent ran one: it hangs forever.

    A forked child (multiprocessing's default on Linux) therefore runs its kernels on one thread; a worker that
    wants more threads should be started with the 'spawn' method.
    """
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_single_thread_after_fork)


@cache
def cpu_flags() -> str:
    """The CPU's feature flags from /proc/cpuinfo ('' where unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); otherwise bf16 GEMMs are emulated."""
    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@cache
def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles: there oneDNN's bf16 GEMM outruns any AVX-512 int8 dot-product kernel."""
    return "amx_bf16" in cpu_flags().split()


def cache_dir(source: Path, cflags: list[str]) -> Path:
    """Build directory keyed by everything the binary depends on, so a stale build is never loaded."""
    key = hashlib.sha256()
    # torch's install path and the source's own: two environments (or checkouts) sharing a directory made each
    # rebuild the other's binary, their include paths and ninja's header records differing
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what the sources #include
    for part in (source.read_bytes(), headers, str(source.resolve()).encode(), torch.__version__.encode(),
                 str(Path(torch.__file__).parent).encode(),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), sys.version.encode(),
                 " ".join(cflags).encode(), cpu_flags().encode()):
        key.update(part)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgellm" / "kernels" / key.hexdigest()[:16]


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a venv's ninja sits next to its python but not always on PATH."""
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build directory exclusively; the lock dies with its holder, unlike torch's lock file."""
    with open(build_dir / "edgellm.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"edgellm: waiting for another process that is building native kernels in {build_dir}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        # No live edgellm builder holds the directory now: a torch lock file left there belongs to a dead one, and
        # torch would wait on it forever.
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def _compile(name: str, source: Path, cflags: list[str], build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    built = (build_dir / f"edgellm_{name}.so").exists()
    if not built:  # a new user's first command would otherwise look frozen for a minute or more
        print(f"edgellm: compiling native kernels '{name}' (once per machine and environment, about "
              f"{BUILD_SECONDS.get(name, 40)} s on 2 cores; cached in {build_dir.parent})",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = cpp_extension.load(name=f"edgellm_{name}", sources=[str(source)], extra_cflags=cflags,
                                extra_ldflags=[f for f in cflags if f == "-fopenmp"],
                                build_directory=str(build_dir), verbose=False)
    if not built:
        print(f"edgellm: native kernels '{name}' built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return module


@cache
def _build(name: str) -> ModuleType | None:
    if os.environ.get("EDGELLM_NO_NATIVE") == "1":
        log.info("EDGELLM_NO_NATIVE=1: using PyTorch kernels")
        return None
    _ensure_ninja_on_path()
    source = CSRC / f"{name}.cpp"
    errors = []
    for cflags in CFLAG_SETS:
        build_dir = cache_dir(source, cflags)
        try:
            build_dir.mkdir(parents=True, exist_ok=True)  # a read-only HOME means no native kernel, not a crash
            with build_lock(build_dir):
                return _compile(name, source, cflags, build_dir)
        except Exception as e:  # the build fails through many exception types; all mean "no native kernel"
            lines = str(e).strip().splitlines()
            errors.append(f"{' '.join(cflags)}: {lines[0] if lines else type(e).__name__}")
            log.debug("native kernel build with %s failed:\n%s", cflags, e)
    log.warning("native kernels %s unavailable, using the PyTorch fallback (%s)", name, "; ".join(errors))
    return None


def load_extension(name: str) -> ModuleType | None:
    """The extension built from csrc/<name>.cpp, compiled on first call; None when it cannot be built."""
    with _BUILD_LOCK:  # concurrent first calls wait for one build; later calls hit the cache without the lock
        return _build(name)


def build_all() -> dict[str, bool]:
    """Build (or load from the cache) every native kernel now, so no later call pays a build; name → available."""
    return {source.stem: load_extension(source.stem) is not None for source in sorted(CSRC.glob("*.cpp"))}


@cache
def gemv_bf16_op() -> Callable[..., torch.Tensor] | None:
    """The native `gemv_bf16(x, weight, bias=None)` op, built on first call; None when it cannot be built."""
    ext = load_extension("gemv")
    return None if ext is None else ext.gemv_bf16


def native_available() -> bool:
    """True when the native kernels built and loaded."""
    return gemv_bf16_op() is not None
