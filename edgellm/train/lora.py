"""`edgellm lora train`: fine-tune a PEFT LoRA adapter on a text file, the base model frozen and left unmerged.

Only each targeted projection's A and B train, initialised as PEFT does (A: nn.Linear's kaiming-uniform, B: zeros,
so step 0 computes the base exactly). The base runs in fp32 through differentiable torch ops (`linear` falls back to
F.linear when a gradient is needed; no cache, so no fused native decode step). The output directory holds what
PEFT's `save_pretrained` writes, so `peft.PeftModel.from_pretrained` and edgellm's `load_adapter` both read it, and
the adapter then loads onto the base's quantized versions too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from edgellm.checkpoint import quant_format, read_config
from edgellm.loader import load
from edgellm.train.trainer import LOSS_WINDOW, PackedBatches, TrainingError, heldout_windows, lr_at

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_WINDOWS = 16  # held-out windows scored before and after training


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that determines the trained adapter (with the base and the data file's contents)."""

    model: str
    data: str
    rank: int = 8
    alpha: float | None = None  # None: 2·rank, a scale of 2
    targets: tuple[str, ...] = TARGETS
    steps: int = 100
    seq_len: int = 128
    batch: int = 4
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    heldout_percent: float = 10.0

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2 * self.rank

    def check(self) -> LoraRecipe:
        """The recipe with out-of-range values refused, targets deduplicated and the warmup capped at half the
        steps."""
        for name in ("rank", "steps", "batch"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TrainingError(f"--seq-len must be at least 2, got {self.seq_len}")
        for name, value in (("alpha", self.lora_alpha), ("lr", self.lr)):
            if not 0 < value < math.inf:
                raise TrainingError(f"--{name} must be a positive number, got {value}")
        if not self.targets or not all(self.targets):
            raise TrainingError(f"--targets must name projections, e.g. {','.join(TARGETS)}")
        return replace(self, targets=tuple(dict.fromkeys(self.targets)),
                       warmup_steps=min(self.warmup_steps, self.steps // 2))


class TrainableLora(nn.Module):
    """A frozen projection plus a trainable low-rank path, PEFT's LoRA layer: base(x) + (x Aᵀ) Bᵀ · scale."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear, as PEFT
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


@contextmanager
def attached(model: nn.Module, recipe: LoraRecipe) -> Iterator[dict[str, TrainableLora]]:
    """Within the block every targeted projection (by its last name, as PEFT matches a list) is a `TrainableLora`;
    after it the model has its own modules back."""
    if model.dtype != torch.float32:
        raise TrainingError(f"LoRA training needs the base in fp32, got {model.dtype}; load it with dtype fp32")
    names = [name for name, m in model.named_modules()
             if name.rpartition(".")[2] in recipe.targets and ".experts." not in f"{name}."]
    missing = sorted(set(recipe.targets) - {name.rpartition(".")[2] for name in names})
    if missing:
        raise TrainingError(f"this model has no projection named {', '.join(missing)}; --targets takes the "
                            f"module names of its checkpoint, e.g. {','.join(TARGETS)}")
    generator = torch.Generator().manual_seed(recipe.seed)
    wrapped: dict[str, TrainableLora] = {}
    try:
        for name in names:
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise TrainingError(f"{name} is a {type(base).__name__}, not a dense linear layer; an adapter "
                                    "trains on dense projections only")
            wrapped[name] = TrainableLora(base, recipe.rank, recipe.lora_alpha / recipe.rank, generator)
            _replace(model, name, wrapped[name])
        yield wrapped
    finally:
        for name, module in wrapped.items():
            _replace(model, name, module.base)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next tokens `y` after inputs `x`, both (batch, seq_len)."""
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over `windows`, each token counted once."""
    blocks = windows.split(batch)
    total = sum(next_token_loss(model, b[:, :-1], b[:, 1:]).item() * len(b) for b in blocks)
    return total / len(windows)


def split_tokens(tokens: np.ndarray, recipe: LoraRecipe) -> tuple[PackedBatches, torch.Tensor]:
    """Training batches from the stream's first windows and up to EVAL_WINDOWS held-out ones from its last."""
    windows = (len(tokens) - 1) // recipe.seq_len
    held = max(1, round(windows * recipe.heldout_percent / 100))
    if windows - held < recipe.batch:
        raise TrainingError(f"--data holds {len(tokens)} tokens: too few for {recipe.batch} training "
                            f"windows of {recipe.seq_len} tokens plus held-out text; add text or lower --seq-len "
                            "or --batch")
    cut = (windows - held) * recipe.seq_len
    batches = PackedBatches(tokens[:cut + 1], recipe.seq_len, recipe.batch, recipe.seed)
    return batches, heldout_windows(tokens[cut:], recipe.seq_len)[:EVAL_WINDOWS]


def fit(model: nn.Module, tokens: np.ndarray, recipe: LoraRecipe,
        progress: bool = True) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Train an adapter on `model` (fp32, left as it was) over the token stream; returns each module's (A, B) on the
    CPU and the run's numbers."""
    start = time.monotonic()
    batches, eval_windows = split_tokens(tokens, recipe)
    device = model.device
    eval_windows = eval_windows.to(device)
    with attached(model, recipe) as wrapped, torch.enable_grad():
        params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
        before = heldout_loss(model, eval_windows, recipe.batch)
        losses: list[float] = []
        bar = tqdm(total=recipe.steps, disable=not progress, dynamic_ncols=True, unit="step")
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe)
            x, y = (t.to(device) for t in batches.get(step))
            loss = next_token_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if step == 0 and progress:
                bar.write(f"step 1: loss {losses[0]:.4f}, held-out loss {before:.4f}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]):.3f}")
        bar.close()
        after = heldout_loss(model, eval_windows, recipe.batch)
        if progress:
            tqdm.write(f"step {recipe.steps}: loss {losses[-1]:.4f}, held-out loss {after:.4f}", file=sys.stderr)
        pairs = {name: (m.lora_A.detach().cpu(), m.lora_B.detach().cpu()) for name, m in wrapped.items()}
    summary = {"steps": recipe.steps, "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
               "heldout_loss_before": round(before, 4), "heldout_loss_after": round(after, 4),
               "tokens": len(tokens), "train_windows": batches.windows, "heldout_windows": len(eval_windows),
               "trainable_parameters": sum(p.numel() for p in params),
               "wall_time_s": round(time.monotonic() - start, 1)}
    return pairs, summary


def save_adapter(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], recipe: LoraRecipe, out: Path) -> None:
    """adapter_config.json and adapter_model.safetensors as PEFT writes them (fp32, PEFT's tensor names)."""
    out.mkdir(parents=True, exist_ok=True)
    alpha = recipe.lora_alpha
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": recipe.model,
              "revision": None, "inference_mode": True, "r": recipe.rank,
              "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": 0.0,
              "target_modules": sorted(recipe.targets), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
              "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = {f"base_model.model.{name}.lora_{half}.weight": t.float().contiguous()
               for name, pair in pairs.items() for half, t in zip("AB", pair, strict=True)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_text(path: Path) -> str:
    """The training text, or why it cannot be used."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise TrainingError(f"--data {path} {what}; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainingError(f"--data {path} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise TrainingError(f"--data {path} is empty; pass a text file to train on")
    return text


def check_base(model: str) -> Path:
    """The base checkpoint directory, refused if it is quantized: gradients need its dense weights."""
    path = Path(model)
    hint = "train on the unquantized checkpoint (the adapter then loads onto its quantized versions)"
    if path.suffix.lower() == ".gguf":
        raise TrainingError(f"--model {path} is a GGUF file; {hint}")
    if quant_format(read_config(path), path) is not None:
        raise TrainingError(f"--model {path} is quantized; {hint}")
    return path


def train_lora(recipe: LoraRecipe, out: Path, progress: bool = True) -> dict:
    """Train an adapter as `recipe` says and write it to `out` with training_summary.json; returns the summary."""
    recipe = recipe.check()
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; pass a directory")
    path = check_base(recipe.model)
    text = read_text(Path(recipe.data))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(path, "fp32", device)
    if recipe.seq_len > model.args.max_position_embeddings:
        raise TrainingError(f"--seq-len {recipe.seq_len} exceeds the model's context of "
                            f"{model.args.max_position_embeddings} tokens")
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    pairs, summary = fit(model, tokens, recipe, progress)
    save_adapter(pairs, recipe, out)
    summary = {**summary, "recipe": asdict(recipe)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
