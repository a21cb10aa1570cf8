"""The Redis backend of the shared agent-memory store (the `redis` client is imported only when one is opened).

Keys of one agent share the hash tag `{<fingerprint>/<agent>}` (one cluster slot, so its scripts touch one node):
- `…:state`, a hash: `fence` (the newest lease token granted) and `version` (of the newest put), kept forever so
  neither counter ever goes back; while a memory is stored, also its `etag`, `size`, `chunks` and `modified`;
- `…:data:<etag>`, a list of the memory file's bytes in CHUNK_BYTES pieces (a Redis string stops at 512 MiB, and
  one huge argument would stall the server while a script ran);
- `…:lease`, `"<token> <holder>"` with a PX expiry on the server's clock.

A put uploads its chunks to a staging key first, outside any lock, then one Lua script checks the fencing token and,
only if it is still the newest, renames the staging key into place and bumps the version: check and write are one
atomic step on the server. The replaced data key is not deleted but expires after READ_GRACE_MS, so a reader in the
middle of downloading it finishes (or, if slower, sees it gone and starts over on the new version).

Restore: `restore_memory` reads a file, so `get` downloads the chunks into a local cache file
(`<cache_dir>/<fingerprint>/<agent>/<version>-<etag>.safetensors`, temp file + fsync + rename) and returns its path.
Cost: the bytes cross the network once and are written once locally; the restore then reads them back, usually
from the page cache. A replica that put a memory links its staged file into the cache, so restoring what it saved
itself downloads nothing; a cached file is used only when its version and random etag match the store's.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edgellm.kv.store.base import (
    MEMORY_SUFFIX,
    Lease,
    MemoryStore,
    MemoryVersion,
    StaleLeaseError,
    StoreUnavailableError,
    check_store_name,
    stale,
)

CHUNK_BYTES = 8 * 2**20
PIPELINE_CHUNKS = 4  # chunks sent or fetched per round trip
STAGING_TTL_MS = 3_600_000  # a writer that died mid-upload leaves nothing behind for longer than this
READ_GRACE_MS = 600_000  # how long a replaced memory stays readable for downloads already under way
DOWNLOAD_TRIES = 3

# KEYS: state, staging, new data key; ARGV: token, etag, size, chunks, modified, grace ms, data key prefix
PUT = """
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) ~= fence then
  redis.call('DEL', KEYS[2])
  return {-1, fence}
end
local old = redis.call('HGET', KEYS[1], 'etag')
if old then redis.call('PEXPIRE', ARGV[7] .. old, ARGV[6]) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('PERSIST', KEYS[3])
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'etag', ARGV[2], 'size', ARGV[3], 'chunks', ARGV[4], 'modified', ARGV[5])
return {version, fence}
"""

# KEYS: state; ARGV: token, data key prefix
DELETE = """
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) ~= fence then return {-1, fence} end
local old = redis.call('HGET', KEYS[1], 'etag')
if not old then return {0, fence} end
redis.call('DEL', ARGV[2] .. old)
redis.call('HDEL', KEYS[1], 'etag', 'size', 'chunks', 'modified')
return {1, fence}
"""

# KEYS: lease, state; ARGV: holder, ttl ms. Returns {1, token} or {0, holder, ms left}.
ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local holder = string.sub(current, string.find(current, ' ') + 1)
  if holder ~= ARGV[1] then return {0, holder, redis.call('PTTL', KEYS[1])} end
end
local token = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {1, token}
"""

# KEYS: lease, state; ARGV: token, holder, ttl ms (0: release). Returns the newest token.
RENEW = """
local fence = tonumber(redis.call('HGET', KEYS[2], 'fence') or '0')
if tonumber(ARGV[1]) == fence then
  if ARGV[3] == '0' then redis.call('DEL', KEYS[1])
  else redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3]) end
end
return fence
"""


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisMemoryStore(MemoryStore):
    """Agent memories of one model in a Redis server (see the module docstring for the keys and scripts)."""

    def __init__(self, url: str, fingerprint: str, cache_dir: str | Path | None = None,
                 prefix: str = "edgellm") -> None:
        try:
            import redis
        except ImportError as e:
            raise StoreUnavailableError("redis:// memory stores need the redis client: pip install redis") from e
        self.url, self.fingerprint = url, check_store_name("model fingerprint", fingerprint)
        self.prefix, self.errors = prefix, redis.RedisError
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=60)
            self.client.ping()
        except (redis.RedisError, ValueError) as e:
            raise StoreUnavailableError(f"cannot reach Redis at {redacted(url)}: {str(e).splitlines()[0]}") from None
        self.scripts = {name: self.client.register_script(src)
                        for name, src in (("put", PUT), ("delete", DELETE), ("acquire", ACQUIRE), ("renew", RENEW))}
        root = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "edgellm-store-cache"
        self.directory = root / self.fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, name: str, part: str) -> str:
        return f"{self.prefix}:{{{self.fingerprint}/{check_store_name('agent name', name)}}}:{part}"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Redis failures as one-line StoreUnavailableError."""
        try:
            yield
        except self.errors as e:
            raise StoreUnavailableError(f"Redis at {redacted(self.url)}: {str(e).splitlines()[0]}") from None

    def _call(self, script: str, keys: list[str], args: list) -> list:
        with self._guard():
            return self.scripts[script](keys=keys, args=args)

    def get(self, name: str) -> tuple[Path, MemoryVersion] | None:
        with self._guard():
            return self._get(name)

    def _get(self, name: str) -> tuple[Path, MemoryVersion] | None:
        for _ in range(DOWNLOAD_TRIES):
            meta = self.client.hmget(self.key(name, "state"), "version", "etag", "size", "chunks", "modified")
            if meta[1] is None:
                return None
            version, etag, size, chunks = int(meta[0]), meta[1].decode(), int(meta[2]), int(meta[3])
            info = MemoryVersion(name, version, size, float(meta[4]))
            path = self._cached(name, version, etag)
            if path.exists() and path.stat().st_size == size:
                return path, info
            if self._download(self.key(name, f"data:{etag}"), chunks, size, path):
                self._prune(path)
                return path, info
        raise StoreUnavailableError(f"agent {name!r}: its memory kept being replaced while it was downloaded")

    def _download(self, key: str, chunks: int, size: int, path: Path) -> bool:
        """Fetch the chunks into `path` atomically; False when the data key vanished (replaced, then expired)."""
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                for start in range(0, chunks, PIPELINE_CHUNKS):
                    part = self.client.lrange(key, start, min(start + PIPELINE_CHUNKS, chunks) - 1)
                    if len(part) != min(PIPELINE_CHUNKS, chunks - start):
                        return False
                    for chunk in part:
                        f.write(chunk)
                f.flush()
                os.fsync(f.fileno())  # a torn cache file would fail its checksums and cost the agent its memory
            if tmp.stat().st_size != size:
                return False
            os.replace(tmp, path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _cached(self, name: str, version: int, etag: str) -> Path:
        folder = self.directory / check_store_name("agent name", name)
        folder.mkdir(exist_ok=True)
        return folder / f"{version}-{etag}{MEMORY_SUFFIX}"

    @staticmethod
    def _prune(keep: Path) -> None:
        """Drop the agent's older cached versions."""
        for old in keep.parent.glob(f"*{MEMORY_SUFFIX}"):
            if old != keep:
                old.unlink(missing_ok=True)

    def put(self, name: str, data: bytes | Path, lease: Lease) -> MemoryVersion:
        """Upload to a staging key, then commit it under the fencing check in one script."""
        etag, state = uuid.uuid4().hex, self.key(name, "state")
        staging = self.key(name, f"staging:{etag}")
        size = chunks = 0
        with self._guard(), (open(data, "rb") if isinstance(data, Path) else io.BytesIO(data)) as source:
            pipe = self.client.pipeline(transaction=False)
            while chunk := source.read(CHUNK_BYTES):
                pipe.rpush(staging, chunk)
                size, chunks = size + len(chunk), chunks + 1
                if chunks % PIPELINE_CHUNKS == 0:
                    pipe.pexpire(staging, STAGING_TTL_MS)
                    pipe.execute()
            pipe.pexpire(staging, STAGING_TTL_MS)
            pipe.execute()
        modified = time.time()
        try:
            self.check_lease(name, lease)
        except StaleLeaseError:
            self.client.delete(staging)
            raise
        version, fence = self._call("put", [state, staging, self.key(name, f"data:{etag}")],
                                    [lease.token, etag, size, chunks, repr(modified), READ_GRACE_MS,
                                     self.key(name, "data:")])
        if version < 0:
            raise stale(name, lease, fence)
        if isinstance(data, Path):  # what this replica saved it can restore without a download
            cached = self._cached(name, version, etag)
            try:
                os.link(data, cached)
                self._prune(cached)
            except OSError:
                pass
        return MemoryVersion(name, version, size, modified)

    def delete(self, name: str, lease: Lease) -> bool:
        self.check_lease(name, lease)
        removed, fence = self._call("delete", [self.key(name, "state")], [lease.token, self.key(name, "data:")])
        if removed < 0:
            raise stale(name, lease, fence)
        return bool(removed)

    def list(self) -> list[MemoryVersion]:
        with self._guard():
            return self._list()

    def _list(self) -> list[MemoryVersion]:
        pattern = re.compile(rf"{re.escape(self.prefix)}:\{{{re.escape(self.fingerprint)}/(.+)\}}:state")
        keys = sorted(self.client.scan_iter(match=f"{self.prefix}:{{{self.fingerprint}/*}}:state", count=1000))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "version", "etag", "size", "modified")
        out = []
        for key, (version, etag, size, modified) in zip(keys, pipe.execute(), strict=True):
            match = pattern.fullmatch(key.decode())
            if etag is not None and match:
                out.append(MemoryVersion(match.group(1), int(version), int(size), float(modified)))
        return sorted(out, key=lambda m: m.name)

    def _try_acquire(self, name: str, holder: str, ttl_s: float) -> Lease | tuple[str, float]:
        now = time.time()  # before the call: the server's expiry is no earlier than the one we report
        got = self._call("acquire", [self.key(name, "lease"), self.key(name, "state")], [holder, _ms(ttl_s)])
        if got[0] == 0:
            return got[1].decode(), max(int(got[2]), 0) / 1000
        return Lease(name, self.fingerprint, holder, int(got[1]), now + ttl_s, ttl_s)

    def renew(self, lease: Lease, ttl_s: float | None = None) -> Lease:
        ttl_s = lease.ttl_s if ttl_s is None else ttl_s
        self.check_lease(lease.name, lease)
        now = time.time()
        fence = self._call("renew", [self.key(lease.name, "lease"), self.key(lease.name, "state")],
                           [lease.token, lease.holder, _ms(ttl_s)])
        if fence != lease.token:
            raise stale(lease.name, lease, fence)
        return replace(lease, expires=now + ttl_s, ttl_s=ttl_s)

    def release(self, lease: Lease) -> bool:
        if lease.fingerprint != self.fingerprint:
            return False
        fence = self._call("renew", [self.key(lease.name, "lease"), self.key(lease.name, "state")],
                           [lease.token, lease.holder, 0])
        return fence == lease.token


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)

