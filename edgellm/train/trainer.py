"""Language-model training for edgellm's built-in models, exported as Hugging Face Llama checkpoints.

Everything that shapes the weights (init, data order, LR schedule) is a function of the seed and the step
number, so runs are reproducible (bitwise, at a fixed thread count) and a run stopped at a checkpoint resumes
exactly where it left off: the checkpoint holds the model, the AdamW moments and the step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from edgellm.errors import EdgeLLMError
from edgellm.kernels.runtime import default_dtype
from edgellm.models import family_for
from edgellm.models.llama import Model
from edgellm.models.moe import load_balancing_loss
from edgellm.train.corpus import CorpusError, load_corpus, token_stream
from edgellm.train.tokenizer import (
    BOS,
    EOS,
    PAD,
    encode_batch,
    load_tokenizer_file,
    save_tokenizer,
    train_tokenizer,
)

CHECKPOINT = "checkpoint.pt"
LOSS_WINDOW = 20  # the reported train loss is the mean of the last this-many steps


class TrainingError(EdgeLLMError):
    """Training arguments are out of range or an output directory does not fit the requested run."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; a checkpoint resumes only under the same recipe."""

    preset: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # of a trained tokenizer; a reused tokenizer brings its own
    max_position_embeddings: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    heldout_percent: float = 2.0
    corpus: str | None = None  # None: the running interpreter's stdlib
    tokenizer: str | None = None  # None: train one on the corpus
    experts: int = 0  # > 0: a Qwen3-MoE-shaped model with this many experts of width `expert_size` per layer
    experts_per_tok: int = 0
    expert_size: int = 0
    moe_routing: str = "topk"  # or "moge": top experts_per_tok/moe_groups inside each of moe_groups groups
    moe_groups: int = 1
    aux_loss: float = 0.01  # weight of the load-balancing loss, per MoE layer

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch


PRESETS: dict[str, Recipe] = {
    # The built-in model: 20.5M params (41 MB in bf16). 320 one-sequence steps (328K tokens) took 21 min of
    # training on the busy shared 2-core CPU it was built on; small batches make the most of few tokens.
    "default": Recipe("default", hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=1536, vocab_size=8192, max_position_embeddings=2048, seq_len=1024, batch=1,
                      steps=1500, lr=1e-3, warmup_steps=50),
    # The base model for KV Prediction benchmarks: 51M params, 12 layers, sharing the built-in model's tokenizer
    # (pass --tokenizer edgellm/assets/default-model) so the built-in and `small` models can serve as its aux.
    # 12.3M tokens (4 epochs of the stdlib): 87 s on one H200, ~12 h on one Zen 4 core (28 s a step). A base
    # trained on fewer tokens than its predictors' aux models see is no upper bound: at 1 epoch the fine-tuned aux
    # beat it.
    "base": Recipe("base", hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=2048, vocab_size=8192, max_position_embeddings=2048, seq_len=1024, batch=8,
                   steps=1500, lr=8e-4, warmup_steps=50),
    # A draft/predictor model meant to share the default model's tokenizer (pass --tokenizer).
    "small": Recipe("small", hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=1024, vocab_size=8192, max_position_embeddings=2048, seq_len=1024, batch=2,
                    steps=500, lr=2e-3, warmup_steps=30),
    # Small MoEs on the stdlib at equal active parameters (4 of 16 experts of width 256 per token): top-k
    # routing, and MoGE (Pangu Pro MoE) with 4 groups of 4 experts, one chosen per group.
    "moe": Recipe("moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=8192, max_position_embeddings=1024, seq_len=256, batch=4,
                  steps=400, lr=2e-3, warmup_steps=30, experts=16, experts_per_tok=4, expert_size=256),
    "moge": Recipe("moge", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=1024, vocab_size=8192, max_position_embeddings=1024, seq_len=256, batch=4,
                   steps=400, lr=2e-3, warmup_steps=30, experts=16, experts_per_tok=4, expert_size=256,
                   moe_routing="moge", moe_groups=4),
    # The sparsity of released MoEs (Qwen3-30B-A3B: 8 of 128 experts; here 4 of 64, 6.25% per token) at the moe
    # preset's active size: a trained model whose routing makes expert offload a real question.
    "moe-sparse": Recipe("moe-sparse", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=1024, vocab_size=8192, max_position_embeddings=1024,
                         seq_len=256, batch=4, steps=400, lr=2e-3, warmup_steps=30, experts=64, experts_per_tok=4,
                         expert_size=256),
    "tiny": Recipe("tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, max_position_embeddings=256, seq_len=64, batch=4,
                   steps=30, lr=3e-3, warmup_steps=3),
}


def make_recipe(preset: str, **overrides: object) -> Recipe:
    """A preset with the non-None `overrides` applied, validated."""
    if preset not in PRESETS:
        raise TrainingError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    for name in ("steps", "seq_len", "batch"):
        if getattr(recipe, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(recipe, name)}")
    if recipe.lr <= 0:
        raise TrainingError(f"--lr must be positive, got {recipe.lr}")
    if recipe.seq_len > recipe.max_position_embeddings:
        raise TrainingError(f"--seq-len {recipe.seq_len} exceeds the preset's context of "
                            f"{recipe.max_position_embeddings} tokens")
    return replace(recipe, warmup_steps=min(recipe.warmup_steps, recipe.steps // 2))


def hf_config(recipe: Recipe, tokenizer: Tokenizer) -> dict:
    """config.json of a tied-embedding Llama, or with `experts` a Qwen3-MoE (transformers reads it too, unless it
    routes by MoGE, which only edgellm runs)."""
    config = _llama_config(recipe, tokenizer)
    if not recipe.experts:
        return config
    return {**config, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": recipe.experts, "num_experts_per_tok": recipe.experts_per_tok,
            "moe_intermediate_size": recipe.expert_size, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "router_aux_loss_coef": recipe.aux_loss,
            **({"moe_routing": "moge", "moe_groups": recipe.moe_groups} if recipe.moe_routing == "moge" else {})}


def _llama_config(recipe: Recipe, tokenizer: Tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "head_dim": recipe.hidden_size // recipe.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": recipe.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def init_model(config: dict, seed: int) -> Model:
    """A freshly initialised fp32 model: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2·layers)."""
    torch.manual_seed(seed)
    family = family_for(config)
    model = family.Model(family.ModelArgs.from_config(config))
    std = config["initializer_range"]
    residual_std = std / math.sqrt(2 * config["num_hidden_layers"])
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "expert_scale")):  # as constructed: ones, and MoGE's E/K
            continue
        # GPT-2's scaling keeps the residual stream's variance flat in depth, which matters in short runs.
        nn.init.normal_(p, 0.0, residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std)
    model.tie_weights()
    return model


def autocast(device: str) -> AbstractContextManager:
    """bf16 autocast only where bf16 runs in hardware; emulated bf16 GEMMs on other CPUs are ~4x slower than fp32."""
    if default_dtype(device) == torch.bfloat16:
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at the planned last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class PackedBatches:
    """Fixed-length windows of the token stream, reshuffled each epoch; batch `step` depends on nothing else."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch: int, seed: int) -> None:
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.seq_len, self.batch, self.seed = seq_len, batch, seed
        self.windows = (len(stream) - 1) // seq_len
        if self.windows < batch:
            raise CorpusError(f"the training stream holds {len(stream)} tokens: fewer than one batch of "
                              f"{batch}×{seq_len}")
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.windows)}
        return self._orders[epoch]

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch, seq_len)."""
        rows = []
        for i in range(step * self.batch, (step + 1) * self.batch):
            start = int(self._order(i // self.windows)[i % self.windows]) * self.seq_len
            rows.append(self.stream[start:start + self.seq_len + 1])
        block = torch.stack(rows)
        return block[:, :-1], block[:, 1:]


def heldout_windows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping (seq_len + 1)-token windows, so each held-out token is scored once."""
    n = max(1, (len(stream) - 1) // seq_len)
    seq_len = min(seq_len, len(stream) - 1)
    tokens = torch.from_numpy(stream.astype(np.int64))
    return torch.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def evaluate(model: Model, windows: torch.Tensor, device: str, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over `windows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        block = windows[i:i + batch].to(device)
        with autocast(device):
            logits = model(block[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten(), reduction="sum").item()
        count += block[:, 1:].numel()
    model.train(was_training)
    return total / count


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _optimizer(model: Model, recipe: Recipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a crash mid-save leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """The state `save_checkpoint` wrote (recipe, step, model, optimizer, rng, evals)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises assorted errors on truncated or foreign files
        raise TrainingError(f"{path} is not a readable edgellm checkpoint ({e}); delete it to start over") from e


def _tokenizer_for(recipe: Recipe, train_texts: list[str]) -> Tokenizer:
    if recipe.tokenizer is not None:
        return load_tokenizer_file(Path(recipe.tokenizer))
    return train_tokenizer(train_texts, recipe.vocab_size)


def export(model: Model, tokenizer: Tokenizer, config: dict, out: Path, summary: dict) -> None:
    """The HF checkpoint: config.json, bf16 model.safetensors (tied lm_head left out), tokenizer files,
    generation_config.json and training.json with the recipe and results."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = {name: t.detach().to("cpu", torch.bfloat16).contiguous()
               for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tokenizer, out, config["max_position_embeddings"])
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _summary(state: dict, corpus: str, model: Model, heldout_loss: float) -> dict:
    recipe = state["recipe"]
    losses = state["recent_losses"]
    return {
        "recipe": recipe,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": state["step"],
        "planned_steps": recipe["steps"],
        "stopped_early": state["step"] < recipe["steps"],
        "tokens_seen": state["tokens_seen"],
        "wall_time_s": round(state["wall_time"], 1),
        "train_tokens_per_s": round(state["tokens_seen"] / max(state["wall_time"], 1e-9), 1),
        "final_train_loss": round(sum(losses) / len(losses), 4) if losses else None,
        "heldout_loss": round(heldout_loss, 4),
        "heldout_perplexity": round(math.exp(heldout_loss), 3),
        "evals": state["evals"],
        "corpus": corpus,
        "torch": torch.__version__,
    }


def _finish(model: Model, tokenizer: Tokenizer, state: dict, heldout: np.ndarray, corpus: str, out: Path,
            device: str) -> dict:
    recipe = Recipe(**state["recipe"])
    heldout_loss = evaluate(model, heldout_windows(heldout, recipe.seq_len), device)
    config = hf_config(recipe, tokenizer)
    summary = _summary(state, corpus, model, heldout_loss)
    export(model, tokenizer, config, out, summary)
    return summary


def train(recipe: Recipe, out: Path, minutes: float | None = None, progress: bool = True) -> dict:
    """Train (resuming from `out`/checkpoint.pt when its recipe matches), then export to `out`; returns the
    training.json summary. Stops at the planned steps or after `minutes`, whichever comes first."""
    start = time.monotonic()
    device = _device()
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(Path(recipe.corpus) if recipe.corpus else None, recipe.heldout_percent)
    train_texts = corpus.read(corpus.train)
    tokenizer = _tokenizer_for(recipe, train_texts)
    config = hf_config(recipe, tokenizer)
    encode = lambda texts: encode_batch(tokenizer, texts)  # noqa: E731
    eos = tokenizer.token_to_id(EOS)
    batches = PackedBatches(token_stream(train_texts, encode, eos), recipe.seq_len, recipe.batch, recipe.seed)
    heldout = token_stream(corpus.read(corpus.heldout), encode, eos)
    eval_windows = heldout_windows(heldout, recipe.seq_len)[:16]

    model = init_model(config, recipe.seed).to(device)
    optimizer = _optimizer(model, recipe)
    state = {"recipe": asdict(recipe), "step": 0, "tokens_seen": 0, "wall_time": 0.0, "recent_losses": [],
             "evals": []}
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        if asdict(Recipe(**saved["recipe"])) != state["recipe"]:  # fields added since take their defaults
            raise TrainingError(f"{ckpt} was made with a different recipe; use another --out or delete it")
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        torch.set_rng_state(saved.pop("rng"))
        state = saved
    save_tokenizer(tokenizer, out, recipe.max_position_embeddings)

    eval_every = max(1, recipe.steps // 4)
    checkpoint_every = max(1, recipe.steps // 20)
    deadline = start + minutes * 60 if minutes is not None else math.inf
    recent = deque(state["recent_losses"], maxlen=LOSS_WINDOW)
    session_start, session_tokens = time.monotonic(), 0
    wall_base = state["wall_time"]

    def checkpoint() -> None:
        state.update(recent_losses=list(recent), wall_time=wall_base + time.monotonic() - session_start)
        save_checkpoint(ckpt, {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": torch.get_rng_state()})

    model.train()
    bar = tqdm(total=recipe.steps, initial=state["step"], disable=not progress, dynamic_ncols=True, unit="step")
    while state["step"] < recipe.steps and time.monotonic() < deadline:
        step = state["step"]
        lr = lr_at(step, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in batches.get(step))
        with autocast(device):
            logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        routed = [layer.mlp.routed for layer in model.model.layers if getattr(layer.mlp, "routed", None)]
        loss = ce + recipe.aux_loss * sum(load_balancing_loss(*r) for r in routed) if routed else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        state["step"] = step + 1
        state["tokens_seen"] += recipe.tokens_per_step
        session_tokens += recipe.tokens_per_step
        recent.append(ce.item())  # the language-model loss, comparable across routings
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{session_tokens / (time.monotonic() - session_start):.0f}")
        if state["step"] % eval_every == 0 and state["step"] < recipe.steps:
            heldout_loss = evaluate(model, eval_windows, device)
            state["evals"].append({"step": state["step"], "heldout_loss": round(heldout_loss, 4),
                                   "train_loss": round(sum(recent) / len(recent), 4)})
            bar.write(f"step {state['step']}: held-out loss {heldout_loss:.3f} (ppl {math.exp(heldout_loss):.1f})")
        if state["step"] % checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    return _finish(model, tokenizer, state, heldout, str(corpus.root), out, device)


def export_checkpoint(out: Path) -> dict:
    """Re-export `out`/checkpoint.pt as an HF checkpoint in `out` (e.g. after stopping a run early)."""
    ckpt = out / CHECKPOINT
    if not ckpt.exists():
        raise TrainingError(f"no {CHECKPOINT} in {out}; train there first with `edgellm train --out {out}`")
    state = load_checkpoint(ckpt)
    recipe = Recipe(**state["recipe"])
    device = _device()
    corpus = load_corpus(Path(recipe.corpus) if recipe.corpus else None, recipe.heldout_percent)
    tokenizer = load_tokenizer_file(out)
    config = hf_config(recipe, tokenizer)
    model = init_model(config, recipe.seed)
    model.load_state_dict(state.pop("model"))
    heldout = token_stream(corpus.read(corpus.heldout), lambda t: encode_batch(tokenizer, t),
                           tokenizer.token_to_id(EOS))
    return _finish(model.to(device), tokenizer, state, heldout, str(corpus.root), out, device)
