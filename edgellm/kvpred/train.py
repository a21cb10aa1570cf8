"""Training a KV predictor: the base stays frozen; the aux model and the per-layer K/V maps learn.

Loss (as in the KV Prediction paper) = cross-entropy of the base attending only to predicted K/V at every
position + cross-entropy of the aux on its own + Σ over base layers of mean |ΔK| + mean |ΔV| against the base's
true pre-RoPE K/V. Runs resume from `out`/checkpoint.pt under the same recipe, like `edgellm train`.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgellm.kvpred.predictor import (
    ARTIFACT,
    KVPredictor,
    KVPredictorError,
    kv_recorder,
    model_config,
    parse_layer_map,
    prune_model,
)
from edgellm.loader import load_model
from edgellm.models.llama import Model, ModelArgs
from edgellm.tokenizer import Tokenizer
from edgellm.train.corpus import load_corpus, token_stream
from edgellm.train.trainer import (
    CHECKPOINT,
    PackedBatches,
    autocast,
    heldout_windows,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)

LOSS_WINDOW = 20
EVAL_WINDOWS = 4


@dataclass(frozen=True)
class KVPredRecipe:
    """Everything that determines the trained predictor; a checkpoint resumes only under the same recipe."""

    base: str
    aux: str | None  # a separate aux model directory, or None with aux_prune
    aux_prune: float | None  # fraction of base layers the pruned aux keeps
    layer_map: str | None  # comma-separated aux layer per base layer; None: the default map
    data: str | None  # directory of .py files or one text file; None: the stdlib
    steps: int = 200
    seq_len: int = 512
    batch: int = 2
    lr: float = 5e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    heldout_percent: float = 2.0
    aux_loss_weight: float = 1.0  # the paper's loss weighs all three terms 1
    kv_loss_weight: float = 1.0

    def check(self) -> KVPredRecipe:
        if (self.aux is None) == (self.aux_prune is None):
            raise KVPredictorError("give exactly one of --aux PATH (a smaller model) or --aux-prune FRACTION")
        for name in ("steps", "seq_len", "batch"):
            if getattr(self, name) < 1:
                raise KVPredictorError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise KVPredictorError("--seq-len must be at least 2")
        if self.lr <= 0:
            raise KVPredictorError(f"--lr must be positive, got {self.lr}")
        if self.aux_loss_weight < 0 or self.kv_loss_weight < 0:
            raise KVPredictorError("loss weights must be >= 0")
        return self


def training_texts(data: str | Path | None, heldout_percent: float = 2.0) -> tuple[list[str], list[str], str]:
    """Train and held-out texts: a directory's .py files split as `edgellm train` splits them (the stdlib by
    default), or one text file whose last `heldout_percent` of lines are held out."""
    path = Path(data) if data is not None else None
    if path is not None and path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if len(lines) < 2:
            raise KVPredictorError(f"{path} has fewer than 2 lines: nothing to hold out")
        cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - heldout_percent / 100))))
        return ["".join(lines[:cut])], ["".join(lines[cut:])], str(path)
    if path is not None and not path.exists():
        raise KVPredictorError(f"--data {path} does not exist; pass a directory of .py files or a text file")
    corpus = load_corpus(path, heldout_percent)
    return corpus.read(corpus.train), corpus.read(corpus.heldout), str(corpus.root)


def eos_id(tokenizer: Tokenizer) -> int:
    return min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0


def encode_stream(tokenizer: Tokenizer, texts: list[str]):
    return token_stream(texts, lambda t: [e.ids for e in tokenizer.backend.encode_batch(t)], eos_id(tokenizer))


def trainable_copy(model: Model) -> Model:
    """A fresh fp32 model with `model`'s weights, detached from the (memory-mapped, frozen) loaded tensors."""
    copy = Model(ModelArgs.from_config(model_config(model.args)))
    copy.load_state_dict({k: v.detach().float().clone() for k, v in model.state_dict().items()})
    copy.tie_weights()
    return copy


def build_predictor(base: Model, base_tokenizer: Tokenizer, recipe: KVPredRecipe) -> KVPredictor:
    """A fresh predictor for `base`: a pruned copy with identity maps, or a separate aux model with fresh maps."""
    n_base = base.args.num_hidden_layers
    if recipe.aux_prune is not None:
        aux, kept = prune_model(base, recipe.aux_prune)
        description = {"kind": "pruned-base", "keep_fraction": recipe.aux_prune, "kept_layers": kept}
    else:
        aux_path = Path(recipe.aux)
        aux_tokenizer = Tokenizer(aux_path)
        if aux_tokenizer.backend.get_vocab(with_added_tokens=True) != \
                base_tokenizer.backend.get_vocab(with_added_tokens=True):
            raise KVPredictorError(f"the aux model {aux_path} has a different tokenizer than the base; KV Prediction "
                                   "needs one shared vocabulary (train the aux with --tokenizer BASE_DIR)")
        loaded = load_model(aux_path, "fp32")
        if loaded.args.num_hidden_layers > n_base:
            raise KVPredictorError(f"the aux model has {loaded.args.num_hidden_layers} layers but the base has "
                                   f"{n_base}; the aux must not be deeper than the base")
        aux = trainable_copy(loaded)
        description = {"kind": "model", "path": str(aux_path), "fingerprint": loaded.fingerprint,
                       "layers": aux.args.num_hidden_layers}
    layer_map = parse_layer_map(recipe.layer_map, aux.args.num_hidden_layers, n_base)
    meta = {"base_fingerprint": base.fingerprint, "tokenizer_fingerprint": base_tokenizer.fingerprint,
            "aux": description, "recipe": asdict(recipe)}
    predictor = KVPredictor(aux, base.args, layer_map, meta)
    if recipe.aux_prune is not None:
        predictor.init_identity()
    return predictor


def true_kv(base: Model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The base's own pre-RoPE K/V for every layer (no logits computed)."""
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        base(tokens, kv_tap=kv_recorder(kv), num_layers=base.args.num_hidden_layers)
    return kv


def base_logits_on_predicted(base: Model, tokens: torch.Tensor, keys: list[torch.Tensor],
                             values: list[torch.Tensor]) -> torch.Tensor:
    """The base's logits when every layer attends only to the predicted K/V (differentiable w.r.t. them)."""
    return base(tokens, kv_tap=lambda i, k, v: (keys[i].to(k.dtype), values[i].to(v.dtype)))


def kvpred_losses(base: Model, predictor: KVPredictor, x: torch.Tensor, y: torch.Tensor, aux_weight: float = 1.0,
                  kv_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The three loss terms and their weighted sum ('loss') for inputs `x` and next-token targets `y` (batch, seq).

    kv_l1 sums, over base layers, the mean absolute error of the predicted keys and of the values.
    """
    aux_logits, aux_kv = predictor.aux_forward(x)
    keys, values = predictor.project(aux_kv)
    target = true_kv(base, x)
    logits = base_logits_on_predicted(base, x, keys, values)
    base_ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    aux_ce = F.cross_entropy(aux_logits.float().flatten(0, 1), y.flatten())
    l1 = sum((k.float() - tk.float()).abs().mean() + (v.float() - tv.float()).abs().mean()
             for k, v, (tk, tv) in zip(keys, values, target, strict=True))
    return {"loss": base_ce + aux_weight * aux_ce + kv_weight * l1, "base_ce": base_ce, "aux_ce": aux_ce, "kv_l1": l1}


def _optimizer(predictor: KVPredictor, recipe: KVPredRecipe) -> torch.optim.AdamW:
    params = [p for p in predictor.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(base: Model, predictor: KVPredictor, windows: torch.Tensor, device: str,
             recipe: KVPredRecipe) -> dict[str, float]:
    """Mean loss terms over held-out windows (one window per pass)."""
    totals: dict[str, float] = {}
    for window in windows:
        block = window.unsqueeze(0).to(device)
        with autocast(device):
            losses = kvpred_losses(base, predictor, block[:, :-1], block[:, 1:], recipe.aux_loss_weight,
                                   recipe.kv_loss_weight)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v.item() / len(windows)
    return {k: round(v, 4) for k, v in totals.items()}


def train_predictor(recipe: KVPredRecipe, out: Path, minutes: float | None = None,
                    progress: bool = True) -> dict:
    """Train (resuming from `out`/checkpoint.pt under the same recipe) and write `out`/kv_predictor.safetensors
    and `out`/training.json; returns the summary."""
    recipe.check()
    start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if out.exists() and not out.is_dir():
        raise KVPredictorError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    base = load_model(recipe.base, "fp32", device)
    tokenizer = Tokenizer(recipe.base)
    torch.manual_seed(recipe.seed)
    predictor = build_predictor(base, tokenizer, recipe).to(device).train()
    base.rope.inv_freq = base.rope.inv_freq.to(device)
    train_texts, heldout_texts, corpus = training_texts(recipe.data, recipe.heldout_percent)
    batches = PackedBatches(encode_stream(tokenizer, train_texts), recipe.seq_len, recipe.batch, recipe.seed)
    eval_windows = heldout_windows(encode_stream(tokenizer, heldout_texts), recipe.seq_len)[:EVAL_WINDOWS]
    optimizer = _optimizer(predictor, recipe)
    state = {"recipe": asdict(recipe), "step": 0, "wall_time": 0.0, "recent": [], "tokens_seen": 0}
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        if saved.get("recipe") != state["recipe"]:
            raise KVPredictorError(f"{ckpt} was made with a different recipe; use another --out or delete it")
        predictor.load_state_dict(saved.pop("predictor"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        torch.set_rng_state(saved.pop("rng"))
        state = saved
    recent = deque(state["recent"], maxlen=LOSS_WINDOW)
    session_start, wall_base = time.monotonic(), state["wall_time"]
    deadline = start + minutes * 60 if minutes is not None else math.inf

    def checkpoint() -> None:
        state.update(recent=list(recent), wall_time=wall_base + time.monotonic() - session_start)
        save_checkpoint(ckpt, {**state, "predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": torch.get_rng_state()})

    bar = tqdm(total=recipe.steps, initial=state["step"], disable=not progress, dynamic_ncols=True, unit="step")
    checkpoint_every = max(1, recipe.steps // 20)
    while state["step"] < recipe.steps and time.monotonic() < deadline:
        lr = lr_at(state["step"], recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in batches.get(state["step"]))
        with autocast(device):
            losses = kvpred_losses(base, predictor, x, y, recipe.aux_loss_weight, recipe.kv_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(predictor.parameters(), recipe.grad_clip)
        optimizer.step()
        state["step"] += 1
        state["tokens_seen"] += recipe.seq_len * recipe.batch
        recent.append({k: v.item() for k, v in losses.items()})
        mean = {k: sum(r[k] for r in recent) / len(recent) for k in recent[-1]}
        bar.update(1)
        bar.set_postfix(base_ce=f"{mean['base_ce']:.3f}", aux_ce=f"{mean['aux_ce']:.3f}",
                        kv_l1=f"{mean['kv_l1']:.3f}", lr=f"{lr:.1e}")
        if state["step"] % checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    predictor.eval()
    heldout = evaluate(base, predictor, eval_windows, device, recipe)
    summary = {"steps": state["step"], "planned_steps": recipe.steps, "tokens_seen": state["tokens_seen"],
               "wall_time_s": round(state["wall_time"], 1),
               "final_train": {k: round(sum(r[k] for r in recent) / len(recent), 4) for k in recent[-1]}
               if recent else None,
               "heldout": heldout, "corpus": corpus, "aux": predictor.meta["aux"],
               "layer_map": predictor.layer_map}
    predictor.meta["training"] = {k: summary[k] for k in ("steps", "tokens_seen", "final_train", "heldout")}
    predictor.save(out / ARTIFACT, torch.bfloat16)  # bf16 like `edgellm train`'s export: half the bytes
    (out / "training.json").write_text(json.dumps({"recipe": asdict(recipe), **summary}, indent=2) + "\n",
                                       encoding="utf-8")
    return summary
