"""`edgellm bench lmeval`: lm-evaluation-harness's `local-completions` model against a real `edgellm serve`, every
request also scored directly through edgellm's Python API on the same tokens.

lm-eval's own tasks load their data from the Hugging Face hub, which is unreachable here, so the two tasks are
built offline from held-out stdlib files (the split the built-in model never trained on), in lm-eval's local
JSON task format:
- `stdlib_next_line` (multiple choice, scored by loglikelihood): after `--context-lines` lines of a file, which of
  four lines comes next; the three distractors are lines of other held-out files with the same indentation, so
  layout alone does not give the answer away.
- `stdlib_complete_line` (generation): the same kind of context plus the first third of the next line; the
  model completes it greedily until the newline, scored by exact match.
lm-eval sends the loglikelihood requests as token ids with `echo` and `logprobs` (the prompt's logprobs) and the
generations with `stop`; the bench then computes each continuation's loglikelihood from one forward pass over
context + continuation, and each generation with `generate`, on the server's own model object, and reports both
scores and the largest per-request difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import edgellm
from edgellm.bench.common import add_threads_argument, free_port, positive_int, torch_threads, write_report
from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import cpu_model_name
from edgellm.train.corpus import load_corpus

MC_TASK, GEN_TASK = "stdlib_next_line", "stdlib_complete_line"
CHOICES = 4
MIN_LINE, MAX_LINE = 12, 100  # characters of a candidate line once stripped: not a lone `else:`, not a wall of data
TASKS = {
    MC_TASK: {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
              "doc_to_target": "{{answer}}", "target_delimiter": "",
              "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    GEN_TASK: {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
               "target_delimiter": "", "generation_kwargs": {"until": ["\n"], "do_sample": False},
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 or auto (fp32: scores comparable to 1e-4)")
    p.add_argument("--limit", type=positive_int, default=100, help="examples per task")
    p.add_argument("--context-lines", type=positive_int, default=12, help="lines of the file before the question")
    p.add_argument("--max-gen-toks", type=positive_int, default=32, help="tokens generated per completion at most")
    p.add_argument("--seed", type=int, default=0, help="which held-out lines are drawn")
    add_threads_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write every figure, the CPU and versions here")


def _candidates(text: str, context_lines: int) -> Iterator[tuple[str, str]]:
    """(context, line) for every line of `text` that makes a fair question: long enough to say something, not
    a comment, and not a repeat of a line in its own context (which a model could copy)."""
    lines = text.splitlines()
    for i in range(context_lines, len(lines)):
        line, stripped = lines[i], lines[i].strip()
        if MIN_LINE <= len(stripped) <= MAX_LINE and not stripped.startswith("#") and line.isascii() \
                and line not in lines[i - context_lines:i]:
            yield "\n".join(lines[i - context_lines:i]) + "\n", line.rstrip()


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _cut(line: str) -> int:
    """Where a completion question cuts `line`: at its last space past the indentation (the space stays with the
    answer, as a tokenizer's word-initial space does), else at half of it: the answer is the line's last word."""
    start = len(_indent(line))
    space = line.rfind(" ", start + 1)
    return space if space > 0 else start + (len(line) - start) // 2


def build_docs(limit: int, context_lines: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`limit` multiple-choice and `limit` completion documents drawn (seeded) from the held-out stdlib files."""
    corpus = load_corpus()
    by_file = [list(_candidates(text, context_lines)) for text in corpus.read(corpus.heldout)]
    pool = [(f, c, line) for f, items in enumerate(by_file) for c, line in items]
    if len(pool) < 2 * limit:
        raise InvalidRequestError(f"the held-out stdlib files give {len(pool)} questions; lower --limit "
                                  f"below {len(pool) // 2}")
    by_indent: dict[str, list[tuple[int, str]]] = {}
    for f, _, line in pool:
        by_indent.setdefault(_indent(line), []).append((f, line))
    rng = random.Random(seed)
    picked = rng.sample(pool, len(pool))
    mc: list[dict] = []
    gen: list[dict] = []
    for f, context, line in picked:
        if len(gen) < limit and len(mc) >= limit:
            cut = _cut(line)
            gen.append({"context": context + line[:cut], "target": line[cut:]})
            continue
        others = sorted({other for g, other in by_indent[_indent(line)] if g != f and other != line})
        if len(mc) < limit and len(others) >= CHOICES - 1:
            choices = [line, *rng.sample(others, CHOICES - 1)]
            rng.shuffle(choices)
            mc.append({"context": context, "choices": choices, "answer": choices.index(line)})
        if len(mc) >= limit and len(gen) >= limit:
            break
    if len(mc) < limit or len(gen) < limit:
        raise InvalidRequestError(f"only {len(mc)} + {len(gen)} questions could be built; lower --limit")
    return mc, gen


def write_tasks(root: Path, mc: list[dict], gen: list[dict], max_gen_toks: int) -> None:
    """lm-eval task files over local JSON lines (YAML is a superset of JSON, so each config is written as JSON)."""
    for name, docs in ((MC_TASK, mc), (GEN_TASK, gen)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        config = json.loads(json.dumps(TASKS[name]))
        if name == GEN_TASK:
            config["generation_kwargs"]["max_gen_toks"] = max_gen_toks
        (root / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}))


@contextmanager
def running_server(model: str, dtype: str, store_dir: Path) -> Iterator[tuple[str, Any]]:
    """`edgellm serve`'s app on a free loopback port in a background thread: (base URL, app)."""
    import uvicorn

    from edgellm.serve import ShutdownNotifyingServer, build_app

    app = build_app(model, str(store_dir), dtype=dtype)
    port = free_port()
    server = ShutdownNotifyingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                                     app.state.begin_shutdown)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_lm_eval(url: str, model_name: str, tokenizer_dir: str, task_dir: Path) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` with `local-completions` on the two tasks, samples kept."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the data is local
        os.environ[name] = "1"
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise InvalidRequestError(f"bench lmeval needs lm-evaluation-harness: pip install 'lm-eval[api]' ({e})") \
            from e
    return lm_eval.simple_evaluate(
        model="local-completions", tasks=[MC_TASK, GEN_TASK], task_manager=TaskManager(include_path=str(task_dir)),
        model_args={"model": model_name, "base_url": f"{url}/v1/completions", "tokenizer": tokenizer_dir,
                    "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
        log_samples=True)


def loglikelihood(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Sum of the continuation's logprobs from one forward pass over context + continuation."""
    from edgellm.kv.prompt_cache import PromptCache

    tokens = context + continuation
    logits = model(torch.tensor([tokens]), PromptCache(model, capacity=len(tokens)).layers)[0].float()
    logprobs = logits[len(context) - 1:-1].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


@torch.inference_mode()
def score_directly(results: dict[str, Any], model: torch.nn.Module, tokenizer: Any,
                   max_gen_toks: int) -> dict[str, Any]:
    """Every request lm-eval made, answered again through the Python API: each choice's loglikelihood and each
    greedy completion. Returns the direct scores and how far lm-eval's answers are from them.

    Tokens are split as lm-eval splits them: the context's trailing whitespace (here its last newline) moves to
    the continuation, and the continuation is the whole string's ids past the context's."""
    from edgellm.generate import generate
    from edgellm.sampling import SamplingParams

    correct = correct_norm = 0
    deltas: list[float] = []
    mc_samples = results["samples"][MC_TASK]
    for sample in mc_samples:
        lls = []
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            stripped = context.rstrip()
            ids = tokenizer.encode(stripped, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            ll = loglikelihood(model, ids, whole[len(ids):])
            deltas.append(abs(ll - float(response[0][0])))
            lls.append(ll)
        choices = sample["doc"]["choices"]
        answer = sample["doc"]["answer"]
        correct += max(range(len(lls)), key=lls.__getitem__) == answer
        correct_norm += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == answer
    same = matched = 0
    gen_samples = results["samples"][GEN_TASK]
    for sample in gen_samples:
        ids = tokenizer.encode(sample["arguments"][0][0], add_special_tokens=False)
        text = generate(model, tokenizer, ids, max_gen_toks, SamplingParams(), stop=["\n"]).text
        same += text == sample["resps"][0][0]
        matched += text == sample["doc"]["target"]
    return {"mc_acc": correct / len(mc_samples), "mc_acc_norm": correct_norm / len(mc_samples),
            "loglikelihoods": len(deltas), "max_abs_loglikelihood_diff": max(deltas),
            "gen_exact_match": matched / len(gen_samples), "gen_identical": same, "generations": len(gen_samples)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the tasks, serve the model, run lm-eval against it, score the same requests directly, report."""
    from edgellm.assets import default_model_path

    model_dir = Path(args.model) if args.model else default_model_path()
    if not (model_dir / "tokenizer.json").is_file():
        raise InvalidRequestError(f"bench lmeval needs an HF model directory with tokenizer.json (lm-eval loads the "
                                  f"tokenizer from it); {model_dir} has none")
    mc, gen = build_docs(args.limit, args.context_lines, args.seed)
    with tempfile.TemporaryDirectory(prefix="edgellm-lmeval-") as tmp, torch_threads(args.threads):
        root = Path(tmp)
        write_tasks(root, mc, gen, args.max_gen_toks)
        with running_server(str(model_dir), args.dtype, root / "agents") as (url, app):
            engine = app.state.engine
            model, tokenizer = engine.model, engine.tokenizer
            start = time.perf_counter()
            results = run_lm_eval(url, model.name, str(model_dir), root)
            lm_eval_s = time.perf_counter() - start
        start = time.perf_counter()
        direct = score_directly(results, model, tokenizer, args.max_gen_toks)
        direct_s = time.perf_counter() - start
    scores = results["results"]
    report = {
        "benchmark": "lmeval", "model": model.name, "dtype": args.dtype, "limit": args.limit,
        "context_lines": args.context_lines, "seed": args.seed, "threads": args.threads,
        "lm_eval": {"mc_acc": scores[MC_TASK]["acc,none"], "mc_acc_norm": scores[MC_TASK]["acc_norm,none"],
                    "gen_exact_match": scores[GEN_TASK]["exact_match,none"], "seconds": round(lm_eval_s, 1)},
        "direct": {**direct, "seconds": round(direct_s, 1)},
        "chance_mc_acc": 1 / CHOICES,
        "cpu": cpu_model_name(), "platform": platform.platform(), "torch": torch.__version__,
        "edgellm": edgellm.__version__, "lm_eval_version": _version("lm_eval"),
        "command": f"edgellm bench lmeval --dtype {args.dtype} --limit {args.limit} --context-lines "
                   f"{args.context_lines} --max-gen-toks {args.max_gen_toks} --seed {args.seed} "
                   f"--threads {args.threads}",
    }
    print_report(report)
    write_report(report, args.json)
    return report


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def print_report(report: dict[str, Any]) -> None:
    le, d = report["lm_eval"], report["direct"]
    print(f"{report['model']} ({report['dtype']}), {report['limit']} questions per task, {report['cpu']}")
    print(f"{'':24} {'lm-eval via server':>20} {'Python API':>12}")
    print(f"{MC_TASK + ' acc':24} {le['mc_acc']:>20.3f} {d['mc_acc']:>12.3f}   (chance {report['chance_mc_acc']:.2f})")
    print(f"{MC_TASK + ' acc_norm':24} {le['mc_acc_norm']:>20.3f} {d['mc_acc_norm']:>12.3f}")
    print(f"{GEN_TASK + ' exact':24} {le['gen_exact_match']:>20.3f} {d['gen_exact_match']:>12.3f}")
    print(f"largest loglikelihood difference over {d['loglikelihoods']} requests: "
          f"{d['max_abs_loglikelihood_diff']:.2e}; identical generations: {d['gen_identical']}/{d['generations']}")
    print(f"lm-eval run {le['seconds']} s, direct scoring {d['seconds']} s")
