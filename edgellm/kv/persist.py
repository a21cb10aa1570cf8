"""KV memory on disk: one safetensors file per cache, validated completely before it touches a live cache.

A restore is all-or-nothing: a SHA-256 over every metadata entry (token ids, messages, fingerprints, format), the
format version, model and tokenizer fingerprints, KV format, a CRC32 per tensor over its dtype, shape and bytes, and
the token count are checked, and the tensors are loaded into fresh cache objects; on any mismatch `RestoreError`
says why, so a stale, damaged or edited file costs a prefill but never gives a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
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

FORMAT_VERSION = 2  # 2: metadata checksummed, tensor CRCs cover dtype and shape
HEADER_CHECKSUM = "header_sha256"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a save takes seconds: a temp file this old outlived its writer whatever its PID says
DEAD_WRITER_GRACE_S = 60.0  # a dead local PID plus this age: the writer is gone, not a namesake in another namespace


class RestoreError(EdgeLLMError):
    """A saved KV memory cannot be used for this model, tokenizer or KV format, or is damaged."""


def tensor_crc32(t: torch.Tensor) -> str:
    """CRC32 of a tensor's dtype, shape and bytes: a header edit that reinterprets intact bytes is caught too."""
    layout = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    return f"{zlib.crc32(t.contiguous().view(torch.uint8).reshape(-1).numpy(), layout):08x}"


def header_checksum(meta: dict[str, str]) -> str:
    """SHA-256 over every metadata entry but itself, in a canonical order."""
    body = {k: v for k, v in meta.items() if k != HEADER_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temp files left by writers that died mid-save: their PID is gone and the file is over a minute old,
    or it is over an hour old whatever its name says (a PID means nothing to another host or PID namespace).

    Temp names carry the writer's PID (`.<name>.<pid>.<random>.tmp`); they never end in `.safetensors`, so a
    restore could not pick one up anyway, but each holds a whole cache's bytes.
    """
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        parts = tmp.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        try:
            age = time.time() - tmp.stat().st_mtime
            if age > STALE_TMP_S or (age > DEAD_WRITER_GRACE_S and pid is not None and not _pid_alive(pid)):
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


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
    metadata[HEADER_CHECKSUM] = header_checksum(metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
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
    """The file's metadata, verified against its header checksum (no tensor is read)."""
    try:
        with pinned(path) as name, safe_open(name, framework="pt") as f:
            return verified_metadata(path.name, f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RestoreError(f"{path.name}: memory file is damaged or truncated ({e})") from e


def verified_metadata(label: str, meta: dict[str, str]) -> dict[str, str]:
    """`meta` if it is an edgellm memory header of this version whose checksum holds; else RestoreError."""
    version = meta.get("edgellm_format", "0")
    version = int(version) if version.isdigit() else 0
    if version != FORMAT_VERSION:
        why = ("written by a newer edgellm; upgrade" if version > FORMAT_VERSION else
               "written by an older edgellm; it will be prefilled again" if version else "not an edgellm memory file")
        raise RestoreError(f"{label}: memory file format {version}, expected {FORMAT_VERSION} ({why})")
    if meta.get(HEADER_CHECKSUM) != header_checksum(meta):
        raise RestoreError(f"{label}: header checksum mismatch; the file's metadata is damaged or was edited")
    return meta


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
    meta = verified_metadata(label, f.metadata() or {})
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
