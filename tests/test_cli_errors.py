"""Every subcommand answers bad arguments in the house format: exit 2, one `edgellm: error:` line, no traceback."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgellm.cli import SEED_MAX, build_parser, main

# (command line, text the error line must contain); {model}, {truncated}, {bad_config}, {busy_port} and {tmp}
# are filled in by the test. Each case is a fresh `python -m edgellm` (~2.5 CPU-s, mostly importing torch), so
# this table keeps one case per subcommand plus the failures issue 19 found at run time; the in-process
# test_parse_errors_are_one_house_line covers many more argument values through the same main().
CASES: list[tuple[list[str], str]] = [
    (["generate", "--model", "{model}", "--prompt", "x", "--seed", "1180591620717411303424"], "--seed"),
    (["generate", "--model", "{model}", "--prompt", "x", "--temp", "inf"], "--temp"),
    (["generate", "--model", "{bad_config}", "--prompt", "x"], "hidden_size"),
    (["chat", "--model", "{model}", "--seed", str(SEED_MAX + 1)], "--seed"),
    (["agents", "show", "a\n", "--store", "{tmp}"], "invalid agent name"),
    (["info", "{truncated}"], "damaged or truncated"),
    (["quantize", "{model}", "{tmp}/q"], "--format"),
    (["export-gguf", "{model}", "{tmp}/m.gguf", "--type", "q9"], "q9"),
    (["train", "--out", "{tmp}/t", "--preset", "huge"], "invalid choice"),
    (["serve", "--model", "{model}", "--port", "70000"], "--port"),
    (["serve", "--model", "{model}", "--port", "{busy_port}"], "in use"),
    (["kvpred", "train", "--base", "{model}", "--aux-prune", "half", "--out", "{tmp}/k"], "--aux-prune"),
    (["lora", "train", "--model", "{model}", "--data", "{tmp}/none.txt", "--out", "{tmp}/l"], "does not exist"),
    (["bench", "kernels", "--reps", "0"], "--reps"),
    (["plan", "--model", "no-such-model"], "no-such-model"),
]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def house_error(returncode: int, stderr: str, needle: str) -> str | None:
    """Why this exit is not a house-format error mentioning `needle`, or None when it is one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode != 2 or "Traceback" in stderr or len(lines) != 1:
        return f"exit {returncode}, stderr:\n{stderr[-2000:]}"
    if not lines[0].startswith("edgellm: error: ") or needle not in lines[0]:
        return f"expected 'edgellm: error: ...{needle}...', got {lines[0]!r}"
    return None


@pytest.mark.slow
def test_every_subcommand_reports_bad_arguments_in_one_line(llama_dir: Path, tmp_path: Path):
    truncated = Path(shutil.copytree(llama_dir, tmp_path / "truncated"))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    bad_config = Path(shutil.copytree(llama_dir, tmp_path / "bad_config"))
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"model": str(llama_dir), "truncated": str(truncated), "bad_config": str(bad_config),
                "busy_port": str(busy.getsockname()[1]), "tmp": str(tmp_path)}
        commands = [[arg.format(**fill) for arg in args] for args, _ in CASES]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, commands))
    subcommands = set(re.search(r"\{([\w,-]+)\}", build_parser().format_help()).group(1).split(","))
    assert subcommands <= {args[0] for args, _ in CASES if args}, "every subcommand needs bad-argument cases"
    failures = [f"edgellm {' '.join(map(repr, cmd))}: {why}"
                for cmd, r, (_, needle) in zip(commands, results, CASES, strict=True)
                if (why := house_error(r.returncode, r.stderr, needle))]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("argv, needle", [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["generate", "--prompt", "x", "--seed", "-9999999999999999999999"], "--seed"),
    (["generate", "--prompt", "x", "--temp", "abc"], "--temp"),
    (["generate", "--prompt", "x", "--agent", "a\n"], "invalid agent name"),
    (["generate", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["generate", "--prompt", "x", "--seed", str(SEED_MAX + 1)], "--seed"),
    (["generate", "--prompt", "x", "--seed", "1e3"], "--seed"),
    (["generate", "--prompt", "x", "--temp", "nan"], "--temp"),
    (["generate", "--prompt", "x", "--top-p", "inf"], "--top-p"),
    (["generate", "--prompt", "x", "--repetition-penalty", "-inf"], "--repetition-penalty"),
    (["generate", "--prompt", "x", "--agent", "../evil"], "invalid agent name"),
    (["generate"], "--prompt"),
    (["chat", "--top-k", "abc"], "--top-k"),
    (["agents", "frobnicate"], "invalid choice"),
    (["agents", "rm", "x\n"], "invalid agent name"),
    (["info", "--bogus"], "--bogus"),
    (["quantize", "in"], "out_dir"),
    (["export-gguf"], "required"),
    (["train"], "--out"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["kvpred"], "required"),
    (["lora"], "required"),
    (["lora", "train", "--model", "m", "--out", "o"], "--data"),
    (["lora", "train", "--model", "m", "--data", "d", "--out", "o", "--rank", "two"], "--rank"),
    (["bench", "frobnicate"], "invalid choice"),
    (["bench", "kv", "--formats", "q5"], "--formats"),
])
def test_parse_errors_are_one_house_line(capsys, argv: list[str], needle: str):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert house_error(exit_info.value.code, capsys.readouterr().err, needle) is None, capsys.readouterr().err


@pytest.mark.parametrize("seed", ["0", str(SEED_MAX)])
def test_seed_range_ends_are_accepted(seed: str):
    assert build_parser().parse_args(["generate", "--prompt", "x", "--seed", seed]).seed == int(seed)
