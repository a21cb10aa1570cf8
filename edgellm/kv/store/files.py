"""The directory backend of the shared agent-memory store: one model's memories in the single-machine layout."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from edgellm.kv.persist import fsync_dir
from edgellm.kv.store.base import MEMORY_SUFFIX, Lease, MemoryStore, MemoryVersion, check_store_name, stale


class FileMemoryStore(MemoryStore):
    """Memories as `<root>/<fingerprint>/<agent>.safetensors`: each model's directory is in the single-machine
    layout (written by temp file, fsync and atomic rename). Per agent, a sidecar `.<agent>.state` (JSON: fencing
    counter, version, lease holder and expiry, the memory file's inode, mtime and size) is read and rewritten
    (atomically) only under an exclusive `fcntl.flock` on `.<agent>.lock`, so check-and-write is atomic across
    threads and processes.

    On a local disk this is exact. On a network mount, flock is only as good as the mount's locking (NFSv4 and
    Linux NFSv3 with lockd map it to byte-range locks; some mounts fake it locally, and then two hosts can both
    pass the fencing check); lease expiry compares the hosts' wall clocks, so keep them synchronised. Renames stay
    atomic on the server either way; use Redis when the mount's locking is in doubt.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root, self.fingerprint = Path(root), check_store_name("model fingerprint", fingerprint)
        self.directory = self.root / self.fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    def memory_path(self, name: str) -> Path:
        return self.directory / f"{check_store_name('agent name', name)}{MEMORY_SUFFIX}"

    @contextmanager
    def _locked(self, name: str) -> Iterator[dict]:
        """The agent's state under its exclusive lock; written back (atomically) if the block changed it."""
        fd = os.open(self.directory / f".{check_store_name('agent name', name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = self._raw_state(name)
            state = self._reconcile(name, dict(raw))
            yield state
            if state != raw:
                self._write_state(name, state)
        finally:
            os.close(fd)  # closing drops the flock

    def _raw_state(self, name: str) -> dict:
        try:
            return json.loads((self.directory / f".{name}.state").read_text())
        except FileNotFoundError:
            return {"fence": 0, "version": 0, "holder": None, "expires": 0.0, "file": None}

    def _reconcile(self, name: str, state: dict) -> dict:
        """A memory file the state does not describe (a put that died between its rename and its state write, or
        a file copied in by hand) counts as one more version."""
        try:
            st = self.memory_path(name).stat()
            file = [st.st_ino, st.st_mtime_ns, st.st_size]  # an inode number alone can be reused
        except FileNotFoundError:
            file = None
        if file != state["file"]:
            state["version"] += file is not None
            state["file"] = file
        return state

    def _write_state(self, name: str, state: dict) -> None:
        tmp = self.directory / f".{name}.state.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / f".{name}.state")
        fsync_dir(self.directory)  # a granted token must survive a crash, or fencing could hand it out twice

    def get(self, name: str) -> tuple[Path, MemoryVersion] | None:
        """The store's own file (no copy). A later put replaces it atomically: a reader that already opened it keeps
        reading the version it opened."""
        with self._locked(name) as state:
            path = self.memory_path(name)
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return path, MemoryVersion(name, state["version"], st.st_size, st.st_mtime)

    def put(self, name: str, data: bytes | Path, lease: Lease) -> MemoryVersion:
        """A Path on this filesystem is hard-linked into place (no copy; never modify it in place afterwards), any
        other is copied; the fencing check and the rename happen under the agent's lock."""
        path = self.memory_path(name)
        tmp = self.directory / f".{name}{MEMORY_SUFFIX}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with self._locked(name) as state:
            self.check_lease(name, lease)
            if lease.token != state["fence"]:
                raise stale(name, lease, state["fence"])
            try:
                write_file(tmp, data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(self.directory)
            st = path.stat()
            state.update(version=state["version"] + 1, file=[st.st_ino, st.st_mtime_ns, st.st_size])
            return MemoryVersion(name, state["version"], st.st_size, st.st_mtime)

    def delete(self, name: str, lease: Lease) -> bool:
        with self._locked(name) as state:
            self.check_lease(name, lease)
            if lease.token != state["fence"]:
                raise stale(name, lease, state["fence"])
            if state["file"] is None:
                return False
            self.memory_path(name).unlink(missing_ok=True)
            state["file"] = None
            return True

    def list(self) -> list[MemoryVersion]:
        out = []
        for path in sorted(self.directory.glob(f"*{MEMORY_SUFFIX}")):
            name = path.name.removesuffix(MEMORY_SUFFIX)
            try:  # unlocked: a put may land meanwhile, and versions only grow
                st, state = path.stat(), self._reconcile(name, self._raw_state(name))
            except (FileNotFoundError, ValueError, KeyError):
                continue
            out.append(MemoryVersion(name, state["version"], st.st_size, st.st_mtime))
        return out

    def _try_acquire(self, name: str, holder: str, ttl_s: float) -> Lease | tuple[str, float]:
        with self._locked(name) as state:
            now = time.time()
            if state["holder"] not in (None, holder) and state["expires"] > now:
                return state["holder"], state["expires"] - now
            state.update(fence=state["fence"] + 1, holder=holder, expires=now + ttl_s)
            return Lease(name, self.fingerprint, holder, state["fence"], now + ttl_s, ttl_s)

    def renew(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        ttl_s = lease.ttl_s if ttl_s is None else ttl_s
        self.check_lease(lease.name, lease)
        with self._locked(lease.name) as state:
            if lease.token != state["fence"]:
                raise stale(lease.name, lease, state["fence"])
            now = time.time()
            state.update(holder=lease.holder, expires=now + ttl_s)
            return replace(lease, expires=now + ttl_s, ttl_s=ttl_s)

    def release(self, lease: Lease) -> bool:
        if lease.fingerprint != self.fingerprint:
            return False
        with self._locked(lease.name) as state:
            if lease.token != state["fence"]:
                return False
            state.update(holder=None, expires=0.0)
            return True


def write_file(path: Path, data: bytes | Path) -> None:
    """`data` as a durable file at `path`: a hard link to a source Path where possible, else a copy; fsynced."""
    if isinstance(data, Path):
        try:
            os.link(data, path)
            return  # the source was made durable by its writer (save_memory fsyncs)
        except OSError:
            shutil.copyfile(data, path)
    else:
        path.write_bytes(data)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
