"""The memory-store interface: errors, leases with fencing tokens, versions, and a replica's LeasedMemory."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.kv.persist import remove_stale_temp_files

MEMORY_SUFFIX = ".safetensors"
POLL_S = 0.05  # how often a waiting acquire looks again
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RENEWALS_PER_TTL = 3  # a pinned agent's lease is renewed this often per lease period: two renewals may fail in a row

log = logging.getLogger("edgellm.kv.store")


class MemoryStoreError(EdgeLLMError):
    """A shared memory store refused or could not carry out an operation."""


class StaleLeaseError(MemoryStoreError):
    """A put or delete under a lease whose fencing token is no longer the newest granted for that agent."""


class LeaseHeldError(MemoryStoreError):
    """Another holder's lease on the agent is live."""


class StoreUnavailableError(MemoryStoreError):
    """The store cannot be reached or opened."""


@dataclass(frozen=True)
class Lease:
    """The right to write one agent's memory: valid while `token` is the newest granted for it."""
    name: str
    fingerprint: str  # of the model whose store granted it: worthless in another model's
    holder: str
    token: int
    expires: float  # time.time() on the holder's clock, at the latest; the store's own expiry is no earlier
    ttl_s: float


@dataclass(frozen=True)
class MemoryVersion:
    name: str
    version: int
    size: int
    modified: float


def check_store_name(kind: str, name: str) -> str:
    """Names become file names and key parts: letters, digits, '.', '_', '-' only."""
    if SAFE_NAME.fullmatch(name) is None or ".." in name:
        raise InvalidRequestError(f"invalid {kind} {name!r} for a memory store")
    return name


def stale(name: str, lease: Lease, newest: int) -> StaleLeaseError:
    why = "a newer one was granted since" if lease.token < newest else "it was never granted"
    return StaleLeaseError(f"agent {name!r}: lease token {lease.token} of {lease.holder!r} is stale ({why}; newest "
                           f"is {newest}); the write is rejected")


class MemoryStore(ABC):
    """Agent memories of one model: atomic versioned puts, fenced by per-agent leases."""

    fingerprint: str
    directory: Path  # a local directory on the store's filesystem (or its cache): where memories are staged

    def check_lease(self, name: str, lease: Lease) -> None:
        """StaleLeaseError for a lease granted on another agent or by another model's store."""
        if lease.name != name or lease.fingerprint != self.fingerprint:
            raise StaleLeaseError(f"agent {name!r}: the lease of {lease.holder!r} was granted for agent "
                                  f"{lease.name!r} of model {lease.fingerprint[:12]}; the write is rejected")

    @abstractmethod
    def get(self, name: str) -> tuple[Path, MemoryVersion] | None:
        """A local file holding the agent's newest memory and its version; None when there is none."""

    @abstractmethod
    def put(self, name: str, data: bytes | Path, lease: Lease) -> MemoryVersion:
        """Replace the agent's memory atomically with `data` (bytes, or a finished file's contents); returns the new
        version. StaleLeaseError, and nothing written, unless `lease.token` is the newest granted."""

    @abstractmethod
    def delete(self, name: str, lease: Lease) -> bool:
        """Remove the agent's memory under a lease (fenced like put); True if there was one. Counters survive."""

    @abstractmethod
    def list(self) -> list[MemoryVersion]:
        """Every stored memory, by name."""

    @abstractmethod
    def _try_acquire(self, name: str, holder: str, ttl_s: float) -> Lease | tuple[str, float]:
        """A new lease with the next fencing token, or (other holder, seconds left) while theirs is live."""

    @abstractmethod
    def renew(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        """The lease extended by `ttl_s` (default: its own) from now; StaleLeaseError if a newer one was granted."""

    @abstractmethod
    def release(self, lease: Lease) -> bool:
        """Give the lease up so another holder need not wait for it to expire; False if it was already superseded."""

    def acquire_lease(self, name: str, holder: str, ttl_s: float, wait_s: float = 0.0) -> Lease:
        """Lease the agent for `ttl_s` seconds. Free, expired or already `holder`'s: granted with a new, higher
        fencing token. Another holder's live lease: wait up to `wait_s` for it to end, then LeaseHeldError."""
        check_store_name("agent name", name)
        if ttl_s <= 0:
            raise InvalidRequestError(f"lease ttl must be positive, got {ttl_s}")
        deadline = time.monotonic() + wait_s
        while True:
            got = self._try_acquire(name, holder, ttl_s)
            if isinstance(got, Lease):
                return got
            other, left = got
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise LeaseHeldError(f"agent {name!r} is leased by {other!r} for another {left:.1f} s")
            time.sleep(max(min(POLL_S, left, wait), 0.001))


def default_holder() -> str:
    """A new lease holder name: host, process and a random part (two stores in one process are two holders)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LeasedMemory:
    """A replica's hold on the agents it serves: leased when restored, renewed on every use and save, released
    when written back. While an agent is pinned (a turn is running on it) a background thread renews its lease
    every ttl/3, so a turn longer than the lease keeps it; an idle agent's lease lapses, and another replica may
    take the agent over. A lease lost to another replica (expired, then taken over) surfaces as StaleLeaseError
    on the next use or save, never as a silently lost or overwritten memory."""

    def __init__(self, store: MemoryStore, holder: str | None = None, ttl_s: float = 60.0,
                 wait_s: float = 0.0) -> None:
        self.store, self.holder = store, holder or default_holder()
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.leases: dict[str, Lease] = {}
        self.pinned: set[str] = set()
        # the engine thread and the renewal thread both update `leases`; held only for quick lease calls, so a
        # renewal never waits behind a long acquire or a memory's upload
        self.lock = threading.RLock()
        self.renewer: threading.Thread | None = None  # runs while any agent is pinned
        # per host: the stale-file sweep judges writers by PID, which means nothing for another host's files
        self.staging = store.directory / ".staging" / socket.gethostname()
        self.staging.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.staging)

    @property
    def directory(self) -> Path:
        return self.store.directory

    def checkout(self, name: str) -> Path | None:
        """Lease the agent (a new token), then a local file of its newest memory, or None when it has none."""
        lease = self.store.acquire_lease(name, self.holder, self.ttl_s, self.wait_s)
        with self.lock:
            self.leases[name] = lease
        found = self.store.get(name)
        return None if found is None else found[0]

    def hold(self, name: str) -> bool:
        """Renew the lease on a live agent; False (and the lease dropped) when another replica took it over, so
        its copy in RAM may be stale. An agent never checked out (new, forked) is leased now."""
        try:
            self._lease(name)
            return True
        except StaleLeaseError:
            return False

    def holds(self, name: str) -> bool:
        """Whether this replica's lease on the agent is unexpired (by its own clock), without asking the store."""
        lease = self.leases.get(name)
        return lease is not None and lease.expires > time.time()

    def pin(self, name: str) -> None:
        """Keep renewing the agent's lease in the background until `unpin`: for the length of a turn."""
        with self.lock:
            self.pinned.add(name)
            if self.renewer is None:
                self.renewer = threading.Thread(target=self._renew_pinned, name="edgellm-lease-renewal", daemon=True)
                self.renewer.start()

    def unpin(self, name: str) -> None:
        with self.lock:
            self.pinned.discard(name)

    def _renew_pinned(self) -> None:
        """Renew the pinned agents' leases every ttl/3 until none is pinned. A lease taken over is left as it is
        (not dropped): the turn's save must be rejected, not granted a fresh lease that overwrites the newer
        memory."""
        while True:
            time.sleep(self.ttl_s / RENEWALS_PER_TTL)
            with self.lock:
                if not self.pinned:
                    self.renewer = None
                    return
                for name in sorted(self.pinned & self.leases.keys()):
                    try:
                        self.leases[name] = self.store.renew(self.leases[name])
                    except StaleLeaseError:
                        self.pinned.discard(name)
                        log.warning("agent %s: its lease was taken over by another replica mid-turn", name)
                    except MemoryStoreError as e:  # unreachable for now: the next renewal tries again
                        log.warning("agent %s: could not renew its lease: %s", name, e)

    def commit(self, name: str, write: Callable[[Path], object]) -> Path:
        """Renew the lease, have `write` produce the memory file at a staging path, put it under the lease; returns
        the store's local file of it."""
        lease = self._lease(name)
        staged = self.staging / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            write(staged)
            self.store.put(name, staged, lease)
        except StaleLeaseError:
            with self.lock:
                self.leases.pop(name, None)
            raise
        finally:
            staged.unlink(missing_ok=True)
        found = self.store.get(name)  # the file just put (Redis: already linked into the cache, nothing to fetch)
        if found is None:
            raise StoreUnavailableError(f"agent {name!r}: its memory vanished right after it was saved")
        return found[0]

    def release(self, name: str) -> None:
        with self.lock:  # not renewed meanwhile: a renewal after the release would lease the agent again
            lease = self.leases.pop(name, None)
            self.pinned.discard(name)
            if lease is not None:
                self.store.release(lease)

    def release_all(self) -> None:
        for name in list(self.leases):
            self.release(name)

    def delete(self, name: str) -> bool:
        removed = self.store.delete(name, self._lease(name))
        self.release(name)
        return removed

    def exists(self, name: str) -> bool:
        return any(m.name == name for m in self.store.list())

    def _lease(self, name: str) -> Lease:
        """The held lease, renewed; a new one when none is held. StaleLeaseError when it was taken over."""
        with self.lock:
            lease = self.leases.get(name)
            if lease is not None:
                try:
                    lease = self.leases[name] = self.store.renew(lease)
                except StaleLeaseError:
                    del self.leases[name]
                    raise
                return lease
        lease = self.store.acquire_lease(name, self.holder, self.ttl_s, self.wait_s)  # may wait: not under the lock
        with self.lock:
            self.leases[name] = lease
        return lease
