"""The native-kernel build: an interrupted first build never blocks later runs; forked children never hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A tiny extension: compiling it still takes ~15 s (torch's headers), long enough to be killed midway.
TINY_SOURCE = """
#include <torch/extension.h>
torch::Tensor twice(torch::Tensor x) { return x * 2; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
"""

BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from edgellm.kernels import native
    native.CSRC = Path(sys.argv[1])
    ext = native.load_extension("tiny")
    print("loaded" if ext is not None and ext.twice(torch.ones(2)).tolist() == [2.0, 2.0] else "fallback")
""")


def run_build(src: Path, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(src)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_killed_build_does_not_block_the_next_process(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "tiny.cpp").write_text(TINY_SOURCE)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("EDGELLM_NO_NATIVE", None)
    first = run_build(src, env, start_new_session=True)
    deadline = time.monotonic() + 120
    locks: list[Path] = []
    while not locks and first.poll() is None and time.monotonic() < deadline:
        locks = list((tmp_path / "cache").glob("edgellm/kernels/*/lock"))  # torch's lock: the compiler is running
        time.sleep(0.05)
    assert locks, f"the first build never started compiling: {first.communicate()}"
    os.killpg(first.pid, signal.SIGKILL)  # as Ctrl-C or a container stop would: the whole process group
    first.wait()
    assert locks[0].exists()  # the dead build's lock is left behind, as it was when later runs hung forever

    second = run_build(src, env)
    try:
        out, err = second.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        second.kill()
        pytest.fail("the next process waited on the dead build's lock")
    assert second.returncode == 0, err
    assert out.strip() == "loaded"
    assert "compiling native kernels 'tiny'" in err  # says what it is doing, once
    assert "built in" in err


def test_fork_after_load_generates(llama_dir):
    """GNU OpenMP hangs a child forked after a parallel region; edgellm's children run on one thread instead."""
    script = textwrap.dedent(f"""
        import os
        import edgellm
        model, tok = edgellm.load({str(llama_dir)!r}, "fp32")
        parent = edgellm.generate(model, tok, "def f(x):", max_tokens=6).tokens
        pid = os.fork()
        if pid == 0:
            child = edgellm.generate(model, tok, "def f(x):", max_tokens=6).tokens
            os._exit(0 if child == parent else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"
