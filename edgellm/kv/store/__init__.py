"""Shared agent-memory stores: atomic, versioned saves guarded by per-agent leases with fencing tokens.

One interface (`MemoryStore`), two backends: `FileMemoryStore`, a directory (local disk or a network mount) in the
single-machine layout, and `RedisMemoryStore` (edgellm/kv/store/redis_backend.py). Every store is scoped to one model
fingerprint, so two models never share an agent's memory.

Fencing (Kleppmann's scheme): each lease grant increments a per-agent counter and hands its value out as the lease's
token; a put or delete is accepted only while its token is still the newest one granted. A replica that paused past
its lease's expiry, while another took the agent over, has its save rejected with `StaleLeaseError` instead of
overwriting the newer memory. An expired lease nobody took over stays valid for writes (no newer token exists), so
a slow writer loses nothing unless someone else actually took the agent.

`LeasedMemory` is a replica's view of a store: it leases agents as it restores them, renews on every use and save
(and in the background while a turn runs), and releases them when it writes them back; `AgentStore` uses it when
given one.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgellm.errors import InvalidRequestError
from edgellm.kv.store.base import (
    Lease,
    LeasedMemory,
    LeaseHeldError,
    MemoryStore,
    MemoryStoreError,
    MemoryVersion,
    StaleLeaseError,
    StoreUnavailableError,
)
from edgellm.kv.store.files import FileMemoryStore

URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
__all__ = ["FileMemoryStore", "Lease", "LeaseHeldError", "LeasedMemory", "MemoryStore", "MemoryStoreError",
           "MemoryVersion", "StaleLeaseError", "StoreUnavailableError", "check_store_url", "is_store_url",
           "open_store"]


def is_store_url(text: str) -> bool:
    """Whether `--store` names a shared store (`file://…`, `redis://…`) rather than a plain directory."""
    return URL_SCHEME.match(text) is not None


def check_store_url(url: str | Path) -> str:
    """The store's scheme ('file' for a plain path); one-line InvalidRequestError for one edgellm cannot open."""
    text = str(url)
    match = URL_SCHEME.match(text)
    scheme = match.group(1).lower() if match else "file"
    if scheme == "file" and match and not text.startswith("file:///"):
        raise InvalidRequestError(f"memory store {text!r}: a file URL needs an absolute path (file:///dir)")
    if scheme not in ("file", "redis", "rediss", "unix"):
        raise InvalidRequestError(f"unknown memory store scheme {scheme!r} in {text!r}: use a directory, "
                                  "file:///dir or redis://host:port/db")
    return scheme


def open_store(url: str | Path, fingerprint: str, cache_dir: str | Path | None = None) -> MemoryStore:
    """`file:///path` or a plain path: FileMemoryStore; `redis://host:port/db` (or rediss://, unix://): a
    RedisMemoryStore caching fetched memories in `cache_dir`. Unknown schemes and unreachable servers raise one
    line."""
    text = str(url)
    if check_store_url(text) == "file":
        return FileMemoryStore(text.removeprefix("file://"), fingerprint)
    from edgellm.kv.store.redis_backend import RedisMemoryStore
    return RedisMemoryStore(text, fingerprint, cache_dir)
