"""Agents with persistent KV memory: generate with reuse, save, restore, list, delete, evict under a budget."""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.generate import GenerationResponse, GenerationResult, generate, stream_generate
from edgellm.kv.formats import KVFormat, dense_format
from edgellm.kv.persist import RestoreError, read_metadata, remove_stale_temp_files, restore_memory, save_memory
from edgellm.kv.pool import DEFAULT_BLOCK_TOKENS, BlockPool, PoolExhausted
from edgellm.kv.prompt_cache import PromptCache, common_prefix
from edgellm.kv.store import LeasedMemory, StaleLeaseError
from edgellm.models.lora import resident
from edgellm.sampling import SamplingParams
from edgellm.sequence import context_length, prepare_prompt
from edgellm.speculative import Speculation
from edgellm.tokenizer import Tokenizer

AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def is_agent_name(name: str) -> bool:
    """True for a name that is safe as a file name in the store (a full match: `$` would admit a trailing newline)."""
    return AGENT_NAME.fullmatch(name) is not None and ".." not in name


def check_agent_name(name: str) -> str:
    """Agent names become file names: refuse anything that could leave the store directory."""
    if not is_agent_name(name):
        raise InvalidRequestError(f"invalid agent name {name!r}: use letters, digits, '.', '_' or '-' "
                                  "(max 128 characters, no path separators or '..')")
    return name


@dataclass
class AgentInfo:
    name: str
    tokens: int
    file_bytes: int
    kv_format: str
    modified: float
    predicted: bool
    adapter: str | None  # the LoRA adapter its memory was made under

    def to_json(self) -> dict:
        return asdict(self)


def list_agents(root: Path) -> list[AgentInfo]:
    """Saved agents in `root`, read from file headers only (no model needed)."""
    infos = []
    for file in sorted(Path(root).glob("*.safetensors")):
        try:
            meta = read_metadata(file)
            fmt = str(KVFormat.from_metadata(json.loads(meta.get("kv_format", "{}"))))
            tokens, predicted = int(meta.get("num_tokens", 0)), meta.get("predicted") == "1"
            adapter = meta.get("adapter") or None
        except (EdgeLLMError, ValueError):
            fmt, tokens, predicted, adapter = "damaged", 0, False, None
        stat = file.stat()
        infos.append(AgentInfo(file.name.removesuffix(".safetensors"), tokens, stat.st_size, fmt, stat.st_mtime,
                               predicted, adapter))
    return infos


class Agent:
    """One agent's conversation state: its KV memory and, for chat, its messages; with a LoRA adapter (`adapter`,
    resident on the model), every turn runs under it, as its memory was made."""

    def __init__(self, store: AgentStore, name: str, cache: PromptCache, messages: list[dict] | None = None,
                 restore_note: str | None = None, adapter: tuple[str | None, str] = (None, "")) -> None:
        self.store, self.name, self.cache = store, name, cache
        self.messages: list[dict] = messages or []
        self.restore_note = restore_note  # why a saved memory was refused, if one was
        self.adapter, self.adapter_fingerprint = adapter  # (None, "") without one
        self.pinned = False
        self.predicted = False  # whether the memory holds K/V from a KV predictor (saved in its metadata)
        self.ttl_s: float | None = None
        self.last_used = time.monotonic()

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def stream(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: list[str] | None = None, kv_predictor: nn.Module | None = None,
               speculate: int | Speculation = 0, draft_model: nn.Module | None = None) -> Iterator[GenerationResponse]:
        """Generate reusing this agent's memory: only tokens past the cached prefix are prefilled (or predicted).

        `speculate` / `draft_model`: as `stream_generate`'s. Prompt lookup searches the whole memory (every
        earlier turn is in the prompt), so what it learns from survives a restart; rejected drafts are trimmed
        from the memory before it can be saved.
        """
        self.last_used = time.monotonic()
        prompt = self.store.reserve(self, prompt, max_tokens)
        try:
            for step in stream_generate(self.store.model, self.store.tokenizer, prompt, max_tokens, sampling, stop,
                                        self.cache, kv_predictor, speculate, draft_model, self.adapter):
                self.note_prediction(step.cached_tokens, step.predicted_tokens)
                yield step
        finally:  # also when the client stops reading early
            self.cache.trim_reservation()
            self.store.publish(self)
            self.store.enforce_budget(keep=self.name)

    def note_prediction(self, cached_tokens: int, predicted_tokens: int) -> None:
        """Track whether the memory holds predicted K/V: a turn adds some, or reuses none of the earlier ones."""
        self.predicted = predicted_tokens > 0 or (self.predicted and cached_tokens > 0)

    def generate(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: list[str] | None = None, kv_predictor: nn.Module | None = None) -> GenerationResult:
        self.last_used = time.monotonic()
        prompt = self.store.reserve(self, prompt, max_tokens)
        result = generate(self.store.model, self.store.tokenizer, prompt, max_tokens, sampling, stop, self.cache,
                          kv_predictor, adapter=self.adapter)
        self.note_prediction(result.cached_tokens, result.stats.get("predicted_tokens", 0))
        self.cache.trim_reservation()
        self.store.publish(self)
        self.store.enforce_budget(keep=self.name)
        return result

    def chat(self, message: str, max_tokens: int = 256, sampling: SamplingParams | None = None,
             stop: list[str] | None = None) -> GenerationResult:
        """Add a user turn, answer it, and remember both; the conversation survives save and restore."""
        messages = [*self.messages, {"role": "user", "content": message}]
        result = self.generate(self.store.tokenizer.encode_chat(messages), max_tokens, sampling, stop)
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        return result

    def save(self) -> Path:
        return self.store.save(self)


class AgentStore:
    """The agents of one model in one directory, kept in RAM under a byte budget, written back to disk (LRU).

    With `pool_bytes`, every agent's cache (and every cache of a request without an agent) draws blocks from one
    shared BlockPool of that size: agents starting with the same tokens share their full blocks (one physical copy),
    and when the pool is full idle anonymous caches are dropped, then idle unpinned agents are written back to disk
    (expired first, then least recently used) and their blocks reused.

    With `memory` (a LeasedMemory over a shared store), agents are leased as they are restored and saved through the
    store under their lease; `root` is then the store's local directory (memory.directory).
    """

    def __init__(self, root: str | Path, model: nn.Module, tokenizer: Tokenizer,
                 kv_format: str | KVFormat | None = None, budget_bytes: int | None = None,
                 pool_bytes: int | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 anonymous_caches: int = 8, memory: LeasedMemory | None = None) -> None:
        self.root, self.memory = Path(root), memory
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.root)
        self.model, self.tokenizer = model, tokenizer
        if isinstance(kv_format, str):
            kv_format = KVFormat.parse(kv_format)
        self.kv_format = kv_format or dense_format(model.dtype)
        self.budget_bytes = budget_bytes
        self.pool = None if pool_bytes is None else BlockPool(model.args, self.kv_format, pool_bytes, block_tokens,
                                                               model.dtype, model.device)
        self.live: OrderedDict[str, Agent] = OrderedDict()
        self.anonymous: list[PromptCache] = []  # idle caches of agent-less requests, least recently used first
        self.anonymous_caches = anonymous_caches
        self.evictions = 0

    def path(self, name: str) -> Path:
        return self.root / f"{check_agent_name(name)}.safetensors"

    def agent(self, name: str, adapter: str | None = None) -> Agent:
        """The live agent, else its memory restored from disk (or the shared store), else a new empty agent made
        under `adapter`.

        An agent runs under the LoRA adapter its memory was made with: `adapter` None means that one (its default);
        naming another is refused (InvalidRequestError) before anything is restored or changed on disk.
        """
        if name in self.live and self.memory is not None and not self.memory.hold(name):
            self.forget(self.live[name])  # another replica took the agent over: its copy in RAM may be stale
        chosen = self.agent_adapter(name, adapter)
        if name in self.live:
            agent = self.live[name]
            agent.adapter, agent.adapter_fingerprint = chosen
            self.live.move_to_end(name)
            return agent
        cache, messages, note, meta = None, None, None, {}
        path = self.path(name) if self.memory is None else self.memory.checkout(name)
        if path is not None and path.exists():
            try:
                cache, meta = self._restore(name, path)
                messages = json.loads(meta.get("messages", "[]"))
            except RestoreError as e:
                note = str(e)
        if cache is not None and meta.get("adapter_fingerprint", "") != chosen[1]:  # changed since it was checked
            cache.release()
            raise InvalidRequestError(f"agent {name!r}'s memory was just saved under another adapter; retry the turn")
        if cache is not None and chosen[0] is None:
            cache.share_published()
        agent = Agent(self, name, cache or PromptCache(self.model, 256, self.kv_format, self.pool), messages, note,
                      chosen)
        agent.predicted = cache is not None and meta.get("predicted") == "1"
        self.live[name] = agent
        self.enforce_budget(keep=name)
        return agent

    def agent_adapter(self, name: str, adapter: str | None) -> tuple[str | None, str]:
        """(name, fingerprint) of the adapter agent `name` runs under for a request naming `adapter` (None: the
        agent's own): the one its memory was made under, or `adapter` for an agent with no memory yet.
        InvalidRequestError, in one line, when they differ or the agent's adapter is not loaded."""
        made = self._made_with(name)
        loaded = resident(self.model)
        if made is None:
            made = (adapter, loaded[adapter].fingerprint if adapter in loaded else "")
        made_name, made_fp = made
        if adapter is None and made_name is not None:  # the default: the same weights, under its name if loaded
            same = [n for n, a in loaded.items() if a.fingerprint == made_fp]
            adapter = made_name if made_name in same or not same else same[0]
            if adapter not in loaded:
                raise InvalidRequestError(f"agent {name!r} was made with adapter {made_name!r}, which is not loaded; "
                                          "load it or use another agent")
        if adapter is not None and adapter not in loaded:
            raise InvalidRequestError(f"unknown adapter {adapter!r}; loaded adapters: "
                                      f"{', '.join(sorted(loaded)) or 'none'}")
        fingerprint = loaded[adapter].fingerprint if adapter is not None else ""
        if fingerprint != made_fp:
            raise InvalidRequestError(
                f"agent {name!r} was made without an adapter; drop the adapter or use another agent"
                if made_name is None else
                f"agent {name!r} was made with another version of adapter {made_name!r} (other weights); load that "
                "version or use another agent" if adapter == made_name else
                f"agent {name!r} was made with adapter {made_name!r}; use that adapter or another agent")
        return adapter, fingerprint

    def _made_with(self, name: str) -> tuple[str | None, str] | None:
        """The adapter (name, fingerprint) agent `name`'s memory was made under: the live agent's, else its saved
        header's (read alone, so a refused request leaves the file as it was); None while it has no memory."""
        if name in self.live:
            agent = self.live[name]
            return None if not agent.cache.tokens and not agent.messages else (agent.adapter,
                                                                               agent.adapter_fingerprint)
        if self.memory is None:
            path = self.path(name) if self.path(name).exists() else None
        else:  # the newest saved memory in the shared store (reading takes no lease)
            found = self.memory.store.get(name)
            path = None if found is None else found[0]
        if path is None:
            return None
        try:
            meta = read_metadata(path)
        except RestoreError:  # the restore will say why, and the agent starts afresh
            return None
        return meta.get("adapter") or None, meta.get("adapter_fingerprint", "")

    def acquire(self, name: str, adapter: str | None = None) -> tuple[Agent, bool]:
        """The agent, pinned (never evicted) until `release`; and whether its memory was just read from disk.
        `adapter`: as `agent`'s."""
        from_disk = name not in self.live
        agent = self.agent(name, adapter)
        agent.pinned = True
        agent.last_used = time.monotonic()
        if self.memory is not None:  # its lease is renewed in the background until `release`, however long the turn
            self.memory.pin(name)
        return agent, from_disk and agent.restore_note is None and bool(agent.cache.tokens)

    def release(self, agent: Agent, save: bool) -> None:
        """Unpin an agent after a turn, writing its memory to disk if asked; the budget applies again."""
        agent.pinned = False
        try:
            if self.pool is not None:
                agent.cache.trim_reservation()
                self.publish(agent)
            if save:
                self.save(agent)
        finally:
            if self.memory is not None:
                self.memory.unpin(agent.name)
        self.enforce_budget(keep=agent.name)

    def forget(self, agent: Agent) -> None:
        """Drop a live agent without saving (its cache may be inconsistent): the next use restores the last save."""
        if self.live.get(agent.name) is agent:
            del self.live[agent.name]
            agent.cache.release()  # pool blocks go back; a contiguous cache is simply dropped
        if self.memory is not None:
            self.memory.unpin(agent.name)

    def describe(self, name: str, saved: dict[str, AgentInfo] | None = None) -> dict | None:
        """What is known of an agent, on disk and in RAM; None when it exists in neither."""
        saved = {i.name: i for i in self.list()} if saved is None else saved
        info, live = saved.get(name), self.live.get(name)
        if info is None and live is None:
            return None
        out = {"name": name, "tokens": 0, "file_bytes": 0, "kv_format": str(self.kv_format), "live": False,
               "adapter": None}
        out |= info.to_json() if info else {}
        if live is not None:
            out |= {"tokens": len(live.cache.tokens), "live": True, "live_bytes": live.nbytes,
                    "messages": len(live.messages), "adapter": live.adapter}
            if self.memory is not None:  # whether this server still holds it: an idle agent's lease may lapse
                out["leased"] = self.memory.holds(name)
            if self.pool is not None:  # blocks it shares are stored once, for every agent holding them
                out["private_bytes"] = live.cache.private_blocks * self.pool.block_bytes
        return out

    def describe_all(self) -> list[dict]:
        saved = {i.name: i for i in self.list()}
        return [self.describe(name, saved) for name in sorted(set(saved) | set(self.live))]

    def fork(self, source: str, name: str) -> Agent:
        """A new agent starting from `source`'s memory (e.g. a shared system prompt), its blocks shared in the pool;
        it inherits `source`'s adapter, which made those K/V."""
        if name in self.live or (self.memory.exists(name) if self.memory else self.path(name).exists()):
            raise InvalidRequestError(f"agent {name!r} already exists")
        parent = self.agent(source)
        agent = Agent(self, name, parent.cache.fork(), list(parent.messages),
                      adapter=(parent.adapter, parent.adapter_fingerprint))
        agent.predicted = parent.predicted
        self.live[name] = agent
        return agent

    def reserve(self, agent: Agent, prompt: str | list[int], max_tokens: int) -> str | list[int]:
        """With a pool, cut the agent's cache to what `prompt` reuses, take over blocks other agents published for
        more of it, and take every block this turn can need up front (evicting idle agents while the pool is full),
        so generation never runs out midway.

        Returns the prompt as token ids then (generation's own reuse finds nothing left to cut); unchanged otherwise.
        """
        if self.pool is None:
            return prompt
        ids = prepare_prompt(self.tokenizer, prompt, self.model)
        self.prepare(agent.cache, ids, min(len(ids) + max(max_tokens, 0), context_length(self.model)), agent.name,
                     share=agent.adapter is None)
        return ids

    def prepare(self, cache: PromptCache, ids: list[int], tokens: int, keep: str | None = None,
                share: bool = True) -> int:
        """Ready a pool cache for prompt `ids`: keep what it reuses, adopt published blocks for more (unless not
        `share`: an adapter's K/V are its own), and reserve room for `tokens` tokens (making room as needed; agent
        `keep` is never evicted). Returns the tokens held."""
        held = cache.reuse(ids)
        if share:
            held = cache.adopt(ids)
        self.grow(cache, tokens, keep)
        return held

    def grow(self, cache: PromptCache, tokens: int, keep: str | None = None) -> None:
        """Make `cache` able to hold `tokens` tokens, evicting idle caches while the pool is full; PoolExhausted
        when nothing idle is left to evict."""
        if self.pool is not None and any(layer.blocks_needed(tokens) for layer in cache.layers):
            self._make_room(keep, lambda: cache.reserve(tokens))

    def _make_room(self, keep: str | None, attempt: Callable[[], None]) -> None:
        """Run `attempt`; while the pool is full, drop an idle anonymous cache (oldest first) or write back an idle
        agent (expired ones first, then least recently used) that frees blocks, and retry."""
        while True:
            try:
                return attempt()
            except PoolExhausted:
                if self.anonymous:
                    self.anonymous.pop(0).release()
                    continue
                now = time.monotonic()
                idle = [(n, a) for n, a in self.live.items() if n != keep and not a.pinned and a.cache.private_blocks]
                if not idle:
                    raise
                expired = [n for n, a in idle if a.ttl_s is not None and now - a.last_used > a.ttl_s]
                self.evict(expired[0] if expired else idle[0][0])

    def anonymous_cache(self, ids: list[int], tokens: int) -> tuple[PromptCache, int]:
        """A cache for a request without an agent, and the prompt tokens it already holds: the idle one sharing
        most of `ids` (or a new one), readied for `tokens` tokens; pool caches adopt published blocks too."""
        cache = None
        if self.anonymous:
            best = max(range(len(self.anonymous)), key=lambda i: common_prefix(self.anonymous[i].tokens, ids))
            if common_prefix(self.anonymous[best].tokens, ids) > 1 or len(self.anonymous) >= self.anonymous_caches:
                cache = self.anonymous.pop(best)
        if self.pool is None:
            cache = cache or self.private_cache(ids, tokens)
            return cache, cache.reuse(ids)
        cache = cache or PromptCache(self.model, pool=self.pool)
        try:
            return cache, self.prepare(cache, ids, tokens)
        except PoolExhausted:
            cache.release()
            raise

    def private_cache(self, ids: list[int], tokens: int) -> PromptCache:
        """A new anonymous cache sharing no K/V with any other (a LoRA adapter's request: its K/V are its own),
        readied for `tokens` tokens; release it after use rather than park it."""
        if self.pool is None:
            # reserve modestly: max_tokens defaults to the whole context window, and the cache grows when needed
            return PromptCache(self.model, min(tokens, len(ids) + 1024), self.kv_format)
        cache = PromptCache(self.model, pool=self.pool)
        try:
            self.grow(cache, tokens)
        except PoolExhausted:
            cache.release()
            raise
        return cache

    def park(self, cache: PromptCache) -> None:
        """Keep an anonymous cache for a later request with the same prefix (the oldest beyond the limit go)."""
        if self.pool is not None:
            cache.trim_reservation()
            cache.publish()
        self.anonymous.append(cache)
        while len(self.anonymous) > self.anonymous_caches:
            self.anonymous.pop(0).release()

    def publish(self, agent: Agent) -> None:
        """Offer an agent's full blocks to others that start the same way, unless they hold predicted K/V or K/V
        made under a LoRA adapter."""
        if self.pool is not None and not agent.predicted and agent.adapter is None:
            agent.cache.publish()

    def _restore(self, name: str, path: Path) -> tuple[PromptCache, dict]:
        """Agent `name`'s memory read from `path`; with a pool, straight into its blocks, making room as needed."""
        if self.pool is None:
            return restore_memory(path, self.model, self.tokenizer.fingerprint, self.kv_format)
        restored = []
        self._make_room(name, lambda: restored.append(restore_memory(path, self.model, self.tokenizer.fingerprint,
                                                                     self.kv_format, self.pool)))
        return restored[0]

    def save(self, agent: Agent, path: Path | None = None) -> Path:
        """Write the agent's memory to `path` (default: its file in the store, or with a shared store, a staged file
        put under the agent's lease: StaleLeaseError, and the agent dropped from RAM, if another replica took it)."""
        if self.memory is not None and path is None:
            try:
                return self.memory.commit(agent.name, lambda staged: self.save(agent, staged))
            except StaleLeaseError:
                self.forget(agent)
                raise
        return save_memory(path or self.path(agent.name), agent.cache, self.model, self.tokenizer.fingerprint,
                           agent.messages, predicted=agent.predicted, adapter=agent.adapter,
                           adapter_fingerprint=agent.adapter_fingerprint)

    def save_all(self) -> None:
        for agent in list(self.live.values()):
            if agent.cache.tokens:
                try:
                    self.save(agent)
                except StaleLeaseError:  # another replica holds it now: its newer memory stays as it is
                    continue

    def live_bytes(self) -> int:
        """Physical KV bytes of live agents and idle anonymous caches: with a pool, its blocks in use (shared blocks
        once, running anonymous requests' too)."""
        return self.pool.bytes_in_use if self.pool is not None else self.logical_bytes()

    def logical_bytes(self) -> int:
        """KV bytes as if nothing were shared: every live agent's and idle anonymous cache's own count."""
        return sum(a.nbytes for a in self.live.values()) + sum(c.nbytes for c in self.anonymous)

    def enforce_budget(self, keep: str | None = None) -> None:
        """Write back and drop idle agents: expired ones first, then least recently used; never pinned ones."""
        now = time.monotonic()
        for name, agent in list(self.live.items()):
            if name != keep and not agent.pinned and agent.ttl_s is not None and now - agent.last_used > agent.ttl_s:
                self.evict(name)
        if self.budget_bytes is None:
            return
        for name in list(self.live):
            if self.live_bytes() <= self.budget_bytes:
                break
            if name != keep and not self.live[name].pinned:
                self.evict(name)

    def evict(self, name: str) -> None:
        """Save the agent's memory to disk, then free it from RAM (a failed save keeps it live)."""
        agent = self.live[name]
        if agent.cache.tokens:
            self.save(agent)
        del self.live[name]
        agent.cache.release()
        if self.memory is not None:
            self.memory.release(name)
        self.evictions += 1

    def list(self) -> list[AgentInfo]:
        if self.memory is not None:  # a shared store: names, sizes and times (headers may be remote)
            return [AgentInfo(m.name, 0, m.size, "unknown", m.modified, False, None) for m in self.memory.store.list()]
        return list_agents(self.root)

    def delete(self, name: str) -> bool:
        """Forget an agent in RAM and on disk; True if anything was removed."""
        agent = self.live.pop(name, None)
        if agent is not None:
            agent.cache.release()
        removed = agent is not None
        if self.memory is not None:
            return self.memory.delete(name) or removed
        path = self.path(name)
        if path.exists():
            path.unlink()
            removed = True
        return removed

    def stats(self) -> dict:
        saved = self.memory.store.list() if self.memory else list(self.root.glob("*.safetensors"))
        out = {"live_agents": len(self.live), "live_bytes": self.live_bytes(), "logical_bytes": self.logical_bytes(),
               "budget_bytes": self.budget_bytes, "saved_agents": len(saved),
               "evictions": self.evictions, "kv_format": str(self.kv_format)}
        if self.pool is not None:
            out |= {"pool_bytes": self.pool.capacity_blocks * self.pool.block_bytes,
                    "block_tokens": self.pool.block_tokens, "block_bytes": self.pool.block_bytes,
                    "free_blocks": self.pool.free_blocks, "shared_blocks": self.pool.shared_blocks}
        return out
