"""KV Prediction: an auxiliary model predicts the base model's prompt KV cache to cut time to first token.

    model, tokenizer = edgellm.load("runs/base")
    predictor = load_predictor("runs/kvp-half", model, tokenizer.fingerprint)  # validated against both
    edgellm.generate(model, tokenizer, prompt, kv_predictor=predictor)  # also stream_generate, Agent.stream
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgellm.kvpred.predictor import (
    KVPredictor,
    KVPredictorError,
    default_layer_map,
    load_predictor,
    pruned_layers,
)

__all__ = ["KVPredictor", "KVPredictorError", "add_kvpred_arguments", "default_layer_map", "load_predictor",
           "pruned_layers", "run_kvpred"]


def add_kvpred_arguments(parser: argparse.ArgumentParser) -> None:
    """`edgellm kvpred train`: its options; unset ones keep the recipe defaults."""
    sub = parser.add_subparsers(dest="kvpred_command", required=True)
    p = sub.add_parser("train", help="train an aux model and K/V maps that predict a base model's prompt KV cache")
    p.add_argument("--base", required=True, help="the base model directory (kept frozen)")
    aux = p.add_mutually_exclusive_group(required=True)
    aux.add_argument("--aux", help="a smaller model directory sharing the base's tokenizer")
    aux.add_argument("--aux-prune", type=float, help="use the base itself with only this fraction of its layers "
                                                     "(e.g. 0.25, 0.5, 0.75), initialised from its weights")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: checkpoint.pt while training, then kv_predictor.safetensors")
    p.add_argument("--data", help="directory of .py files or one text file (default: the Python stdlib)")
    p.add_argument("--layer-map", help="aux layer per base layer, comma-separated (default: even blocks, early "
                                       "aux layers taking the extra base layers)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--aux-loss-weight", type=float, default=1.0, help="weight of the aux's own cross-entropy")
    p.add_argument("--kv-loss-weight", type=float, default=1.0, help="weight of the summed K/V L1 terms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, help="stop after this much wall time (resume later with the same args)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_kvpred(args: argparse.Namespace) -> None:
    """Train a predictor as `args` asks and print the summary."""
    from edgellm.kvpred.train import KVPredRecipe, train_predictor
    from edgellm.train import apply_run_limits

    apply_run_limits(args.threads, args.minutes, KVPredictorError)
    resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    recipe = KVPredRecipe(base=resolve(args.base), aux=resolve(args.aux), aux_prune=args.aux_prune,
                          layer_map=args.layer_map, data=resolve(args.data), steps=args.steps, seq_len=args.seq_len,
                          batch=args.batch, lr=args.lr, warmup_steps=min(args.warmup_steps, args.steps // 2),
                          seed=args.seed, aux_loss_weight=args.aux_loss_weight, kv_loss_weight=args.kv_loss_weight)
    summary = train_predictor(recipe, args.out, args.minutes, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
