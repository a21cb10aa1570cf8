"""KV memory on disk: one safetensors file per cache, validated completely before it touches a live cache.

A restore is all-or-nothing: a SHA-256 over every metadata entry (messages, fingerprints, format, token count), the
format version, model and tokenizer fingerprints, KV format, a CRC32 per tensor (the token ids' too) over its dtype,
shape and bytes, and the token count are checked, and the tensors are loaded into fresh cache objects; on any
mismatch `RestoreError` says why, so a stale, damaged or edited file costs a prefill but never gives a wrong answer.

A restore checks the header first (the safetensors layout itself: every tensor's offsets, dtype and shape, and that
the tensors tile the data exactly), then reads the file straight into a fresh cache's buffers in one native pass,
checksumming each chunk right after it lands (no memory map: a page fault per 4 KiB page cost more than the read;
no staging buffer: the second copy cost as much as the read). The file's data starts on a 64-byte boundary (the
header is padded with spaces, as the safetensors format allows) so that the kernel's copy into the 64-byte-aligned
cache is an aligned one: a misaligned source made a page-cache-warm read ~50% slower on a Zen 4 core. The token ids
are a tensor, checksummed like the K/V, instead of a JSON list the header would parse and hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from edgellm.errors import EdgeLLMError
from edgellm.kernels.kvattn import crc32, read_into
from edgellm.kv.cache import BlockTarget, Layout
from edgellm.kv.formats import KVFormat, dense_format
from edgellm.kv.pool import BlockPool, PoolExhausted
from edgellm.kv.prompt_cache import PromptCache

SAFETENSORS_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "I32": torch.int32}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on the JSON header
HEADERS_KEPT = 128  # parsed headers kept per process (~14 KB each plus its chat): an agent store's recent saves
DATA_ALIGN = 64  # the data section starts at a multiple of this: aligned copies into the cache's buffers
TOKENS = "tokens"  # the tensor of token ids the K/V belong to
# 2: metadata checksummed, tensor CRCs cover dtype and shape; 3: token ids as a tensor, data 64-byte aligned
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # an upgrade keeps every saved agent: format 2's token ids are a JSON list in the header
HEADER_CHECKSUM = "header_sha256"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a save takes seconds: a temp file this old outlived its writer whatever its PID says
DEAD_WRITER_GRACE_S = 60.0  # a dead local PID plus this age: the writer is gone, not a namesake in another namespace


class RestoreError(EdgeLLMError):
    """A saved KV memory cannot be used for this model, tokenizer or KV format, or is damaged."""


def layout_crc32(t: torch.Tensor | Layout) -> int:
    """The CRC32 a tensor's checksum starts from: of its dtype and shape."""
    return _layout_crc32(t.dtype, tuple(t.shape))


@functools.lru_cache(maxsize=256)
def _layout_crc32(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Memoised: a cache's ~100 tensors share a handful of layouts, and a restore asks for every one."""
    return zlib.crc32(f"{dtype}{shape}".encode())


def tensor_crc32(t: torch.Tensor) -> str:
    """CRC32 of a tensor's dtype, shape and bytes: a header edit that reinterprets intact bytes is caught too."""
    return f"{crc32(t.contiguous(), layout_crc32(t)):08x}"


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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_memory(path: Path, cache: PromptCache, model: nn.Module, tokenizer_fingerprint: str,
                messages: list[dict] | None = None, predicted: bool = False, adapter: str | None = None,
                adapter_fingerprint: str = "") -> Path:
    """Write `cache` exactly as held in memory (quantized stays quantized); atomic via temp file, fsync, rename.

    `adapter` / `adapter_fingerprint`: the LoRA adapter the K/V were computed under (none: ""), so a restore under
    another one can be refused; a file without them was made without an adapter.
    """
    tensors = {f"layers.{i}.{key}": t.contiguous()
               for i, layer in enumerate(cache.layers) for key, t in layer.state().items()}
    tensors[TOKENS] = torch.tensor(cache.tokens, dtype=torch.int32)
    args = model.args
    fmt = cache.kv_format or dense_format(model.dtype)
    metadata = {
        "edgellm_format": str(FORMAT_VERSION),
        "model_fingerprint": model.fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "kv_format": json.dumps(fmt.to_metadata(), sort_keys=True),
        "rope": json.dumps({"theta": args.rope_theta, "scaling": args.rope_scaling, "head_dim": args.head_dim}),
        "layers": str(len(cache.layers)),
        "num_tokens": str(len(cache.tokens)),
        "messages": json.dumps(messages or [], ensure_ascii=False),
        "predicted": "1" if predicted else "0",
        "adapter": adapter or "",
        "adapter_fingerprint": adapter_fingerprint,
        "checksums": json.dumps({k: tensor_crc32(t) for k, t in tensors.items()}, sort_keys=True),
    }
    metadata[HEADER_CHECKSUM] = header_checksum(metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        raw = write_safetensors(Path(tmp), tensors, metadata)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a torn one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    parse_header(raw, sum(t.nbytes for t in tensors.values()))  # its restore, in this process, parses nothing
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file (tensors in the given order) whose data starts at a multiple of DATA_ALIGN, written with
    one buffered pass over the tensors' own bytes and fsynced; returns its header's bytes.

    safetensors' writer aligns the data to 8 bytes only, and first builds the whole file in memory.
    """
    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        end = offset + t.nbytes
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    return raw


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
    """`meta` if it is an edgellm memory header of a readable version whose checksum holds; else RestoreError."""
    version = meta.get("edgellm_format", "0")
    version = int(version) if version.isdigit() else 0
    if version not in READABLE_VERSIONS:
        why = ("written by a newer edgellm; upgrade" if version > FORMAT_VERSION else
               "written by an older edgellm; it will be prefilled again" if version else "not an edgellm memory file")
        raise RestoreError(f"{label}: memory file format {version}, expected "
                           f"{' or '.join(map(str, READABLE_VERSIONS))} ({why})")
    if meta.get(HEADER_CHECKSUM) != header_checksum(meta):
        raise RestoreError(f"{label}: header checksum mismatch; the file's metadata is damaged or was edited")
    return meta


class Header(NamedTuple):
    """A memory file's header, parsed and checked; the same header bytes always give the same Header (never mutate
    one: it may be shared)."""

    meta: dict[str, str]
    shapes: dict[str, Layout]  # each tensor's layout
    spans: list[tuple[int, int, str]]  # (begin, end, name) in file order
    sealed: bool  # a readable format whose metadata checksum holds (`verified_metadata` passes)
    states: dict[int, dict[str, Layout]]  # each layer's tensors by field: "layers.3.keys" is states[3]["keys"]
    strays: list[str]  # tensors that are neither a layer's nor the token ids
    places: list[tuple[int, str]]  # each span's (layer, field); (-1, "") for the token ids
    seeds: list[int]  # each span's CRC seed: its layout's checksum
    checksums: dict[str, str] | None  # the metadata's checksum list (None: missing or not a JSON object)
    crcs: list[int | None]  # each span's CRC as that list gives it (None: not listed)


def read_header(f: BinaryIO) -> Header:
    """The header of an open safetensors file, which is left at the start of its data.

    Raises ValueError when the layout is not one safetensors writes: a header past the file, not JSON, a dtype a
    cache never holds, a shape that does not match its byte span, or spans that do not tile the data exactly.
    """
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < n <= min(size - 8, HEADER_LIMIT):
        raise ValueError(f"header length {n} does not fit a {size}-byte file")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"the file ends inside its {n}-byte header")
    return parse_header(raw, size - 8 - n)


@functools.lru_cache(maxsize=HEADERS_KEPT)
def parse_header(raw: bytes, data_bytes: int) -> Header:
    """The header `raw` describing `data_bytes` bytes of tensor data, parsed and checked (see `read_header`).

    Memoised on the header's exact bytes: an agent store restores the files it saved itself (their headers were
    parsed at save time), and a restore right after a decode step paid ~0.5 ms for this parse, its caches cold.
    """
    header = json.loads(raw.decode("utf-8"))
    meta = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("the header is not a safetensors header")
    shapes, spans = {}, []
    layouts: dict[tuple, tuple[Layout, int]] = {}  # a cache's ~100 tensors share a handful of layouts
    for name, info in header.items():
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name}: shape {shape} is not a list of sizes")
        key = (info["dtype"], *shape)
        if key not in layouts:
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has dtype {info['dtype']}, which no KV cache holds")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            layouts[key] = Layout(torch.Size(shape), dtype), math.prod(shape) * dtype.itemsize
        layout, nbytes = layouts[key]
        if not (type(begin) is type(end) is int) or end - begin != nbytes or not 0 <= begin <= end <= data_bytes:
            raise ValueError(f"tensor {name}: shape {shape} and bytes [{begin}, {end}) disagree")
        spans.append((begin, end, name))
        shapes[name] = layout
    spans.sort()
    if [b for b, _, _ in spans] != [0, *(e for _, e, _ in spans)][:len(spans)] or \
            (spans[-1][1] if spans else 0) != data_bytes:
        raise ValueError("the tensors do not tile the file's data exactly")
    try:
        sealed = verified_metadata("", meta) is meta
    except RestoreError:
        sealed = False
    states: dict[int, dict[str, Layout]] = {}
    strays, places = [], []
    for _, _, name in spans:
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
            states.setdefault(int(parts[1]), {})[parts[2]] = shapes[name]
            places.append((int(parts[1]), parts[2]))
        else:
            strays += [name] if name != TOKENS else []
            places.append((-1, ""))
    try:
        checksums = json.loads(meta["checksums"])
    except (KeyError, ValueError):
        checksums = None
    checksums = checksums if isinstance(checksums, dict) else None
    listed = {}
    for k, v in (checksums or {}).items():
        try:
            listed[k] = int(v, 16) if isinstance(v, str) and len(v) == 8 else None
        except ValueError:
            listed[k] = None
    return Header(meta, shapes, spans, sealed, states, strays, places,
                  [layout_crc32(shapes[name]) for _, _, name in spans], checksums,
                  [listed.get(name) for _, _, name in spans])


@functools.lru_cache(maxsize=64)
def _saved_format(text: str) -> KVFormat:
    """The KV format a header's `kv_format` entry names, parsed once per distinct text."""
    return KVFormat.from_metadata(json.loads(text))


def restore_memory(path: Path, model: nn.Module, tokenizer_fingerprint: str, kv_format: KVFormat,
                   pool: BlockPool | None = None) -> tuple[PromptCache, dict]:
    """Validate the saved memory and read it straight into a fresh cache; returns (cache, metadata).

    The header is checked before any tensor is read, the data goes into the cache's own buffers, and the cache
    stays private until every checksum has passed. With `pool` (of `kv_format`), the cache's blocks are taken from
    it and the file is read straight into them (PoolExhausted, no block taken, when too few are free).
    """
    label = path.name
    cache = None
    try:
        with open(path, "rb", buffering=0) as f:  # one open file: a concurrent atomic replace cannot swap it mid-read
            header = read_header(f)
            shapes, spans = header.shapes, header.spans
            meta, num_tokens, checksums = _check_metadata(label, header, model, tokenizer_fingerprint, kv_format)
            if shapes.keys() != checksums.keys():
                raise RestoreError(f"{label}: the file's tensors do not match its checksum list")
            listed = _listed_tokens(label, meta, num_tokens)
            if shapes.get(TOKENS) != (None if listed is not None else Layout(torch.Size([num_tokens]), torch.int32)):
                raise RestoreError(f"{label}: the token ids do not match the {num_tokens} tokens the header claims")
            layers = model.args.num_hidden_layers
            strays = header.strays + [f"layers.{i}.*" for i in header.states if i >= layers]
            if strays:
                raise RestoreError(f"{label}: tensor {strays[0]} names no layer of this model")
            cache = (PromptCache(model, capacity=num_tokens + 256, kv_format=kv_format) if pool is None else
                     PromptCache(model, pool=pool))
            try:  # each entry a view of the cache's buffers, or a pool field and block table, with the file's shape
                received = cache.receive([header.states.get(i, {}) for i in range(layers)])
            except PoolExhausted:
                raise
            except EdgeLLMError as e:
                raise RestoreError(f"{label}: memory tensors do not fit this KV format ({e})") from e
            ids = torch.empty(num_tokens, dtype=torch.int32) if listed is None else None
            order = [received[i][field] if i >= 0 else ids for i, field in header.places]
            crcs = read_into(f, [t.field if isinstance(t, BlockTarget) else t for t in order], header.seeds,
                             [(t.table, t.tokens) if isinstance(t, BlockTarget) else None for t in order])
            if crcs != header.crcs:
                bad = next(name for (_, _, name), crc in zip(spans, crcs, strict=True)
                           if f"{crc:08x}" != checksums[name])
                raise RestoreError(f"{label}: checksum mismatch in {bad}; the file is damaged")
    except FileNotFoundError as e:
        _give_back(cache)
        raise RestoreError(f"no saved memory at {path}") from e
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        _give_back(cache)
        raise RestoreError(f"{label}: memory file is damaged or inconsistent ({e})") from e
    except EdgeLLMError:
        _give_back(cache)
        raise
    if any(layer.offset != num_tokens for layer in cache.layers):
        _give_back(cache)
        raise RestoreError(f"{label}: memory holds a different number of tokens than it claims")
    cache.tokens = listed if listed is not None else ids.tolist()
    return cache, dict(meta)


def _give_back(cache: PromptCache | None) -> None:
    """Return a failed restore's pool blocks at once (a contiguous cache is simply dropped)."""
    if cache is not None:
        cache.release()


def _listed_tokens(label: str, meta: dict[str, str], num_tokens: int) -> list[int] | None:
    """A format-2 file's token ids (a JSON list its checksummed header holds); None for a later format."""
    if meta["edgellm_format"] != "2":
        return None
    try:
        tokens = json.loads(meta["tokens"])
    except (KeyError, ValueError) as e:
        raise RestoreError(f"{label}: memory metadata is incomplete ({e})") from e
    if not isinstance(tokens, list) or len(tokens) != num_tokens or not all(type(t) is int for t in tokens):
        raise RestoreError(f"{label}: the token ids do not match the {num_tokens} tokens the header claims")
    return tokens


def _check_metadata(label: str, header: Header, model: nn.Module, tokenizer_fingerprint: str,
                    kv_format: KVFormat) -> tuple[dict[str, str], int, dict[str, str]]:
    """(metadata, number of tokens, tensor checksums) when the header is intact and written for this model, tokenizer,
    dtype and KV format; else RestoreError."""
    meta = header.meta if header.sealed else verified_metadata(label, header.meta)
    if meta.get("model_fingerprint") != model.fingerprint:
        raise RestoreError(f"{label}: memory was saved for a different model")
    if meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise RestoreError(f"{label}: memory was saved with a different tokenizer")
    try:
        saved_format = _saved_format(meta["kv_format"])
        checksums = header.checksums
        if checksums is None:
            raise ValueError("its checksum list is missing or not a JSON object")
        layers = int(meta["layers"])
        num_tokens = int(meta["num_tokens"])
    except (KeyError, ValueError, EdgeLLMError) as e:
        raise RestoreError(f"{label}: memory metadata is incomplete ({e})") from e
    dtype = str(model.dtype).removeprefix("torch.")
    if meta.get("model_dtype") != dtype:  # K/V computed in another precision are not this model's K/V
        raise RestoreError(f"{label}: memory was computed by the model in {meta.get('model_dtype')}, not {dtype}")
    if saved_format != kv_format:
        raise RestoreError(f"{label}: memory is in KV format {saved_format}, this store uses {kv_format}")
    if layers != model.args.num_hidden_layers or num_tokens < 0:
        raise RestoreError(f"{label}: memory shape does not match the model")
    return meta, num_tokens, checksums
