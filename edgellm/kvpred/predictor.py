"""KV Prediction: a small auxiliary model and per-layer linear maps predict the base model's prompt KV cache.

The aux model runs over the prompt; for every base layer j a linear map with bias (one for K, one for V, applied
per token over the flattened KV heads) turns the K/V of aux layer `layer_map[j]` into base layer j's K/V. Keys
are predicted before the base's key norm and RoPE, which the base applies itself at the cache positions
(`write_kv`). The base then runs only the last prompt token on top of the predicted cache.

Layer map (default): the base layers are cut into `n_aux` contiguous blocks, one per aux layer in order; when
`n_aux` does not divide `n_base`, the first `n_base % n_aux` blocks are one layer longer, so early aux layers
feed the extra base layers (e.g. 3 aux → 8 base: [0,0,0,1,1,1,2,2]; 4 → 8: [0,0,1,1,2,2,3,3]).
A pruned aux keeps the first base layer of each block, so aux layer i starts as a copy of the base layer it
predicts first (and its maps start as the identity).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from edgellm.errors import EdgeLLMError
from edgellm.kernels import Linear
from edgellm.kv import KVCache
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models.llama import KVTap, Model, ModelArgs

FORMAT_VERSION = 1
ARTIFACT = "kv_predictor.safetensors"
AUX_CHUNK = 2048  # aux prompt tokens per forward pass, bounding attention scratch memory on long prompts


class KVPredictorError(EdgeLLMError):
    """A KV predictor does not fit this base model or tokenizer, is damaged, or was asked for something invalid."""


def default_layer_map(n_aux: int, n_base: int) -> list[int]:
    """Aux layer feeding each base layer: contiguous blocks, the first `n_base % n_aux` one layer longer."""
    if not 1 <= n_aux <= n_base:
        raise KVPredictorError(f"the aux model has {n_aux} layers but the base has {n_base}; an aux needs between "
                               f"1 and {n_base} layers (a deeper aux would save no time)")
    size, extra = divmod(n_base, n_aux)
    return [i for i in range(n_aux) for _ in range(size + (i < extra))]


def check_layer_map(layer_map: list[int], n_aux: int, n_base: int) -> list[int]:
    """`layer_map` as a list of ints, with one entry per base layer, each naming an aux layer."""
    if len(layer_map) != n_base or any(not 0 <= int(i) < n_aux for i in layer_map):
        raise KVPredictorError(f"layer map {layer_map} must give one aux layer in [0, {n_aux}) for each of the "
                               f"{n_base} base layers")
    return [int(i) for i in layer_map]


def parse_layer_map(text: str | None, n_aux: int, n_base: int) -> list[int]:
    """A comma-separated layer map from the command line, or the default one."""
    if not text:
        return default_layer_map(n_aux, n_base)
    try:
        return check_layer_map([int(t) for t in text.split(",")], n_aux, n_base)
    except ValueError as e:
        raise KVPredictorError(f"--layer-map {text!r} is not a comma-separated list of aux layer numbers") from e


def model_config(args: ModelArgs) -> dict:
    """A config.json-style dict that `ModelArgs.from_config` turns back into `args`."""
    config = {k: v for k, v in asdict(args).items() if k != "extra"}
    return {**args.extra, **config}


def pruned_layers(n_base: int, keep_fraction: float) -> list[int]:
    """Base layers a pruned aux keeps: the first of each default layer-map block (layer 0 always)."""
    if not 0 < keep_fraction <= 1:
        raise KVPredictorError(f"--aux-prune must be in (0, 1] (the fraction of base layers kept), got {keep_fraction}")
    n_keep = max(1, round(n_base * keep_fraction))
    layer_map = default_layer_map(n_keep, n_base)
    return [layer_map.index(i) for i in range(n_keep)]


def prune_model(base: Model, keep_fraction: float) -> tuple[Model, list[int]]:
    """A new fp32 model made of some of the base's layers (see `pruned_layers`), with its embedding, final norm
    and lm_head copied; returns it and the kept base layer indices."""
    kept = pruned_layers(base.args.num_hidden_layers, keep_fraction)
    config = {**model_config(base.args), "num_hidden_layers": len(kept)}
    aux = Model(ModelArgs.from_config(config))
    state = {}
    for name, tensor in base.state_dict().items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in kept:
                continue
            name = f"model.layers.{kept.index(int(index))}.{rest}"
        state[name] = tensor.detach().float().clone()
    aux.load_state_dict(state)
    aux.tie_weights()
    return aux, kept


def kv_recorder(store: list[tuple[torch.Tensor, torch.Tensor]]) -> KVTap:
    """A K/V tap that appends every layer's pre-RoPE (k, v) to `store` and lets them through unchanged."""
    def tap(_layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store.append((k, v))
        return k, v
    return tap


def kv_dim(args: ModelArgs) -> int:
    return args.num_key_value_heads * args.head_dim


class KVPredictor(nn.Module):
    """The aux model plus, for every base layer, linear maps (K and V) from its mapped aux layer's K/V.

    `meta` records what the predictor is valid for: the base and tokenizer fingerprints, a description of the
    aux and the training recipe; `load_predictor` checks it against the model it is used with.
    """

    def __init__(self, aux: Model, base_args: ModelArgs, layer_map: list[int], meta: dict | None = None) -> None:
        super().__init__()
        self.aux = aux
        self.base_args = base_args
        self.layer_map = check_layer_map(layer_map, aux.args.num_hidden_layers, base_args.num_hidden_layers)
        n, d_in, d_out = base_args.num_hidden_layers, kv_dim(aux.args), kv_dim(base_args)
        self.k_proj = nn.ModuleList(Linear(d_in, d_out) for _ in range(n))
        self.v_proj = nn.ModuleList(Linear(d_in, d_out) for _ in range(n))
        self.meta = dict(meta or {})

    def init_identity(self) -> None:
        """Identity maps with zero bias (aux and base K/V of the same width): the right start for a pruned aux."""
        with torch.no_grad():
            for proj in (*self.k_proj, *self.v_proj):
                if proj.weight.shape[0] != proj.weight.shape[1]:
                    raise KVPredictorError("identity maps need aux and base K/V of the same width")
                proj.weight.copy_(torch.eye(proj.weight.shape[0]))
                proj.bias.zero_()

    def aux_forward(self, tokens: torch.Tensor,
                    logits: bool = True) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The aux's logits (None unless asked) and every aux layer's pre-RoPE K/V, in one pass over `tokens`."""
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self.aux(tokens, kv_tap=kv_recorder(kv), num_layers=None if logits else self.aux.args.num_hidden_layers)
        return (out if logits else None), kv

    def project(self, aux_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
        """Predicted pre-RoPE keys and values (batch, seq, base kv dim), one pair per base layer."""
        keys = [proj(aux_kv[i][0]) for proj, i in zip(self.k_proj, self.layer_map, strict=True)]
        values = [proj(aux_kv[i][1]) for proj, i in zip(self.v_proj, self.layer_map, strict=True)]
        return keys, values

    @torch.no_grad()
    def predict(self, tokens: list[int], aux_cache: PromptCache | None = None) -> tuple[list[torch.Tensor],
                                                                                      list[torch.Tensor]]:
        """Predicted pre-RoPE K/V of the base for `tokens` (1, len, kv dim), the aux run in chunks with its cache
        (`aux_cache`, emptied first, when given: it then holds `tokens`, e.g. for the aux to draft from)."""
        if aux_cache is None:
            cache = self.aux.make_cache(len(tokens))
        else:
            aux_cache.reuse([])
            cache = aux_cache.layers
            aux_cache.tokens.extend(tokens)
        parts: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        for start in range(0, len(tokens), AUX_CHUNK):
            piece = torch.tensor([tokens[start:start + AUX_CHUNK]], dtype=torch.long)
            kv: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.aux(piece, cache, kv_tap=kv_recorder(kv), num_layers=self.aux.args.num_hidden_layers)
            parts.append(self.project(kv))
        if len(parts) == 1:
            return parts[0]
        n = len(self.layer_map)
        return ([torch.cat([p[0][j] for p in parts], 1) for j in range(n)],
                [torch.cat([p[1][j] for p in parts], 1) for j in range(n)])

    @torch.no_grad()
    def prefill(self, base: Model, tokens: list[int], cache: PromptCache, start: int = 0,
                aux_cache: PromptCache | None = None) -> None:
        """Fill `cache` (a PromptCache holding `start` tokens) with predicted K/V for `tokens[start:]`.

        The aux reads all of `tokens` (it keeps no cache between requests, but leaves them in `aux_cache` when
        given); only positions from `start` on are written. The caller runs the base on the next (last prompt)
        token to get the first token's logits.
        """
        if start >= len(tokens):
            return
        keys, values = self.predict(tokens, aux_cache)
        write_kv(base, [k[:, start:] for k in keys], [v[:, start:] for v in values], cache.layers)
        cache.tokens.extend(tokens[start:])

    def to_safetensors(self, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors (maps, aux weights; tied lm_head left out) in `dtype` and string metadata of the artifact."""
        tensors = {}
        for j, (kp, vp) in enumerate(zip(self.k_proj, self.v_proj, strict=True)):
            tensors |= {f"k_proj.{j}.weight": kp.weight, f"k_proj.{j}.bias": kp.bias,
                        f"v_proj.{j}.weight": vp.weight, f"v_proj.{j}.bias": vp.bias}
        for name, t in self.aux.state_dict().items():
            if not (name == "lm_head.weight" and self.aux.args.tie_word_embeddings):
                tensors[f"aux.{name}"] = t
        tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in tensors.items()}
        metadata = {"edgellm_kv_predictor": str(FORMAT_VERSION),
                    "aux_config": json.dumps(model_config(self.aux.args)),
                    "base_layers": str(self.base_args.num_hidden_layers),
                    "base_kv_dim": str(kv_dim(self.base_args)),
                    "layer_map": json.dumps(self.layer_map),
                    **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}}
        return tensors, metadata

    def save(self, path: Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write the artifact (safetensors + metadata, tensors in `dtype`) atomically."""
        tensors, metadata = self.to_safetensors(dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path


def artifact_path(path: str | Path) -> Path:
    """The artifact file: `path` itself, or the one inside a `edgellm kvpred train --out` directory."""
    path = Path(path)
    return path / ARTIFACT if path.is_dir() else path


def read_predictor_metadata(path: str | Path) -> dict[str, str]:
    file = artifact_path(path)
    if not file.exists():
        raise KVPredictorError(f"no KV predictor at {file}; train one with `edgellm kvpred train`")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise KVPredictorError(f"{file} is not a readable KV predictor ({e})") from e
    if meta.get("edgellm_kv_predictor") != str(FORMAT_VERSION):
        raise KVPredictorError(f"{file} is not an edgellm KV predictor (format {FORMAT_VERSION})")
    return meta


def load_predictor(path: str | Path, base: Model, tokenizer_fingerprint: str | None = None) -> KVPredictor:
    """Load and validate a predictor for `base` (and its tokenizer): fingerprints, depths, widths, layer map."""
    file = artifact_path(path)
    meta = read_predictor_metadata(file)
    fingerprint = getattr(base, "fingerprint", None)
    if meta.get("base_fingerprint") != fingerprint:
        raise KVPredictorError(f"{file.name} was trained for another base model (fingerprint "
                               f"{meta.get('base_fingerprint')}, this model {fingerprint}); train one for this model")
    if tokenizer_fingerprint is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise KVPredictorError(f"{file.name} was trained with a different tokenizer than this model's")
    try:
        aux_args = ModelArgs.from_config(json.loads(meta["aux_config"]))
        layer_map = json.loads(meta["layer_map"])
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, ValueError, TypeError, SafetensorError, OSError) as e:
        raise KVPredictorError(f"{file.name}: predictor metadata or tensors are damaged ({e})") from e
    if int(meta.get("base_layers", -1)) != base.args.num_hidden_layers or \
            int(meta.get("base_kv_dim", -1)) != kv_dim(base.args):
        raise KVPredictorError(f"{file.name} predicts {meta.get('base_layers')} layers of K/V width "
                               f"{meta.get('base_kv_dim')}; this model has {base.args.num_hidden_layers} of "
                               f"{kv_dim(base.args)}")
    if aux_args.num_hidden_layers > base.args.num_hidden_layers:
        raise KVPredictorError(f"{file.name}: its aux has {aux_args.num_hidden_layers} layers, more than the base's "
                               f"{base.args.num_hidden_layers}")
    if aux_args.vocab_size != base.args.vocab_size:
        raise KVPredictorError(f"{file.name}: its aux has a vocabulary of {aux_args.vocab_size}, the base "
                               f"{base.args.vocab_size}; both must share one tokenizer")
    with torch.device("meta"):
        predictor = KVPredictor(Model(aux_args), base.args, layer_map, meta)
    dtype = base.dtype
    device = base.device
    state = tensors
    expected = dict(predictor.state_dict())
    if aux_args.tie_word_embeddings:
        expected.pop("aux.lm_head.weight", None)
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise KVPredictorError(f"{file.name}: its tensors do not match its own metadata; the file is damaged")
    predictor.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, assign=True,
                              strict=False)
    predictor.aux.tie_weights()
    predictor.aux.rope.inv_freq = predictor.aux.rope.inv_freq.to(device)
    predictor.aux.fuse()
    predictor.path = file
    return predictor.eval().requires_grad_(False)


def write_kv(base: Model, keys: list[torch.Tensor], values: list[torch.Tensor], cache: list[KVCache]) -> None:
    """Append predicted pre-RoPE K/V, one (batch, seq, kv_heads*head_dim) pair per layer, to `cache` at its offset:
    the base's own key norm and RoPE are applied at those positions, as its forward would."""
    b, t, _ = keys[0].shape
    offset = cache[0].offset
    positions = torch.arange(offset, offset + t, device=keys[0].device).unsqueeze(0).expand(b, t)
    dtype = base.dtype
    cos, sin = base.rope.cos_sin(positions, dtype)
    for layer, k, v, layer_cache in zip(base.model.layers, keys, values, cache, strict=True):
        layer_cache.update_and_fetch(*layer.self_attn.place_kv(k.to(dtype), v.to(dtype), cos, sin))
