"""`edgellm train`: build the built-in models (tokenizer + Llama) from the Python stdlib, offline; `edgellm lora
train`: fine-tune a PEFT LoRA adapter on a frozen base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError
from edgellm.train.trainer import PRESETS, TrainingError, export_checkpoint, make_recipe, train

__all__ = ["PRESETS", "TrainingError", "add_lora_train_arguments", "add_train_arguments", "apply_run_limits",
           "export_checkpoint", "make_recipe", "run_lora_train", "run_train", "train"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `edgellm train` options; overrides left unset keep the preset's values."""
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: checkpoint.pt while training, then the HF-format model")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: the built-in model; small: a draft model; base: a 51M KV-Prediction base "
                             "(pair small and base with --tokenizer); tiny: tests")
    parser.add_argument("--tokenizer", help="reuse this tokenizer.json (or a directory holding one) instead of "
                                            "training a new one, so two models share a vocabulary")
    parser.add_argument("--corpus", help="directory of .py files to train on (default: the Python stdlib)")
    parser.add_argument("--steps", type=int, help="planned optimizer steps; the LR schedule is defined on these")
    parser.add_argument("--seq-len", type=int, help="tokens per training sequence")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    parser.add_argument("--minutes", type=float,
                        help="stop after this much wall time even if the planned steps are not done")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default: all cores); 1 is often faster when other work shares the cores")
    parser.add_argument("--export-only", action="store_true",
                        help="skip training: export OUT/checkpoint.pt as an HF model in OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def apply_run_limits(threads: int | None, minutes: float | None, error: type[EdgeLLMError]) -> None:
    """Check a training command's --threads and --minutes (raising `error`) and set torch's thread count."""
    if threads is not None:
        if threads < 1:
            raise error(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if minutes is not None and minutes <= 0:
        raise error(f"--minutes must be positive, got {minutes}")


def run_train(args: argparse.Namespace) -> None:
    """Train (or resume, or only export) as `args` asks and print the training.json summary."""
    apply_run_limits(args.threads, None if args.export_only else args.minutes, TrainingError)
    if args.export_only:
        summary = export_checkpoint(args.out)
    else:
        tokenizer = str(Path(args.tokenizer).resolve()) if args.tokenizer else None
        corpus = str(Path(args.corpus).resolve()) if args.corpus else None
        recipe = make_recipe(args.preset, steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr,
                             seed=args.seed, tokenizer=tokenizer, corpus=corpus)
        summary = train(recipe, args.out, minutes=args.minutes, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("recipe", "evals")}, indent=2))


def add_lora_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `edgellm lora train` options."""
    from edgellm.train.lora import TARGETS, LoraRecipe
    parser.add_argument("--model", required=True, help="the base: an fp32 or bf16 HF model directory (kept frozen)")
    parser.add_argument("--data", required=True, help="a UTF-8 text file to train on (its end is held out)")
    parser.add_argument("--out", type=Path, required=True, help="the adapter directory to write (PEFT format)")
    parser.add_argument("--rank", type=int, default=LoraRecipe.rank, help="LoRA rank r (default %(default)s)")
    parser.add_argument("--alpha", type=float, help="lora_alpha: the update is scaled by alpha/r (default 2·rank)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated projection names to adapt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=LoraRecipe.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=LoraRecipe.seq_len,
                        help="tokens per training window (default %(default)s)")
    parser.add_argument("--batch", type=int, default=LoraRecipe.batch, help="windows per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=LoraRecipe.lr,
                        help="peak learning rate, cosine decay to 10%% (default %(default)s)")
    parser.add_argument("--seed", type=int, default=LoraRecipe.seed, help="seed for A's init and the data order")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_lora_train(args: argparse.Namespace) -> None:
    """Train an adapter as `args` asks and print its training_summary.json."""
    from edgellm.train.lora import LoraRecipe, train_lora
    apply_run_limits(args.threads, None, TrainingError)
    recipe = LoraRecipe(model=str(Path(args.model).resolve()), data=str(Path(args.data).resolve()), rank=args.rank,
                        alpha=args.alpha, targets=tuple(t.strip() for t in args.targets.split(",")),
                        steps=args.steps, seq_len=args.seq_len, batch=args.batch, lr=args.lr, seed=args.seed)
    summary = train_lora(recipe, args.out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "recipe"}, indent=2))
