"""KV memory on disk: one safetensors file per cache, validated completely before it touches a live cache.

A restore is all-or-nothing: format version, model and tokenizer fingerprints, KV format, per-tensor CRC32 and
token count are checked, and the tensors are loaded into fresh cache objects; on any mismatch `RestoreError`
says why, so a stale or damaged file costs a prefill but never gives a wrong answer.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from edgellm.errors import EdgeLLMError
from edgellm.kv.formats import KVFormat, dense_format
from edgellm.kv.prompt_cache import PromptCache

FORMAT_VERSION = 1


class RestoreError(EdgeLLMError):
    """A saved KV memory cannot be used for this model, tokenizer or KV format, or is damaged."""


def tensor_crc32(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.contiguous().view(torch.uint8).reshape(-1).numpy()):08x}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_memory(path: Path, cache: PromptCache, model: nn.Module, tokenizer_fingerprint: str,
                messages: list[dict] | None = None, predicted: bool = False) -> Path:
    """Write `cache` exactly as held in memory (quantized stays quantized); atomic via temp file, fsync, rename."""
    tensors = {f"layers.{i}.{key}": t.contiguous()
               for i, layer in enumerate(cache.layers) for key, t in layer.state().items()}
    args = model.args
    fmt = cache.kv_format or dense_format(model.model.embed_tokens.weight.dtype)
    metadata = {
        "edgellm_format": str(FORMAT_VERSION),
        "model_fingerprint": model.fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "model_dtype": str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "kv_format": json.dumps(fmt.to_metadata(), sort_keys=True),
        "rope": json.dumps({"theta": args.rope_theta, "scaling": args.rope_scaling, "head_dim": args.head_dim}),
        "layers": str(len(cache.layers)),
        "num_tokens": str(len(cache.tokens)),
        "tokens": json.dumps(cache.tokens),
        "messages": json.dumps(messages or [], ensure_ascii=False),
        "predicted": "1" if predicted else "0",
        "checksums": json.dumps({k: tensor_crc32(t) for k, t in tensors.items()}, sort_keys=True),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a torn one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


@contextmanager
def pinned(path: Path) -> Iterator[str]:
    """A name for the file's current inode, so a concurrent atomic replace cannot swap it mid-read.

    safe_open re-opens the file by name to mmap it; going through /proc/self/fd keeps every read on one version.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        proc = f"/proc/self/fd/{fd}"
        yield proc if os.path.exists(proc) else str(path)
    finally:
        os.close(fd)


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with pinned(path) as name, safe_open(name, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RestoreError(f"{path.name}: memory file is damaged or truncated ({e})") from e


def restore_memory(path: Path, model: nn.Module, tokenizer_fingerprint: str,
                   kv_format: KVFormat) -> tuple[PromptCache, dict]:
    """Validate the saved memory, then build a fresh cache from it; returns (cache, metadata)."""
    if not path.exists():
        raise RestoreError(f"no saved memory at {path}")
    try:
        with pinned(path) as name, safe_open(name, framework="pt") as f:
            return _restore(path.name, f, model, tokenizer_fingerprint, kv_format)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise RestoreError(f"{path.name}: memory file is damaged or inconsistent ({e})") from e


def _restore(label: str, f, model: nn.Module, tokenizer_fingerprint: str,
             kv_format: KVFormat) -> tuple[PromptCache, dict]:
    meta = f.metadata() or {}
    version = int(meta.get("edgellm_format", "0") or 0)
    if version != FORMAT_VERSION:
        why = "written by a newer edgellm; upgrade" if version > FORMAT_VERSION else "not an edgellm memory file"
        raise RestoreError(f"{label}: memory file format {version}, expected {FORMAT_VERSION} ({why})")
    if meta.get("model_fingerprint") != model.fingerprint:
        raise RestoreError(f"{label}: memory was saved for a different model")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise RestoreError(f"{label}: memory was saved with a different tokenizer")
    try:
        saved_format = KVFormat.from_metadata(json.loads(meta["kv_format"]))
        tokens = json.loads(meta["tokens"])
        checksums = json.loads(meta["checksums"])
        layers = int(meta["layers"])
        num_tokens = int(meta["num_tokens"])
    except (KeyError, ValueError, EdgeLLMError) as e:
        raise RestoreError(f"{label}: memory metadata is incomplete ({e})") from e
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    if meta.get("model_dtype") != dtype:  # K/V computed in another precision are not this model's K/V
        raise RestoreError(f"{label}: memory was computed by the model in {meta.get('model_dtype')}, not {dtype}")
    if saved_format != kv_format:
        raise RestoreError(f"{label}: memory is in KV format {saved_format}, this store uses {kv_format}")
    if layers != model.args.num_hidden_layers or len(tokens) != num_tokens:
        raise RestoreError(f"{label}: memory shape does not match the model")
    if set(f.keys()) != set(checksums):
        raise RestoreError(f"{label}: the file's tensors do not match its checksum list")
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(layers)]
    tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, t in tensors.items():
        _, i, field = key.split(".", 2)
        if not i.isdigit() or int(i) >= layers:
            raise RestoreError(f"{label}: tensor {key} names no layer of this model")
        states[int(i)][field] = t
    cache = PromptCache(model, capacity=num_tokens + 256, kv_format=kv_format)
    # zlib releases the GIL: checksums run on a second core while the tensors are copied into the fresh cache,
    # which stays private until every checksum has passed.
    with ThreadPoolExecutor(max_workers=2) as pool:
        crcs = {key: pool.submit(tensor_crc32, t) for key, t in tensors.items()}
        try:
            for layer, state in zip(cache.layers, states, strict=True):
                layer.load_state(state)
        except EdgeLLMError as e:
            raise RestoreError(f"{label}: memory tensors do not fit this KV format ({e})") from e
        for key, crc in crcs.items():
            if crc.result() != checksums[key]:
                raise RestoreError(f"{label}: checksum mismatch in {key}; the file is damaged")
    if any(layer.offset != num_tokens for layer in cache.layers):
        raise RestoreError(f"{label}: memory holds a different number of tokens than it claims")
    cache.tokens = list(tokens)
    return cache, meta
