"""Agents with persistent KV memory: generate with reuse, save, restore, list, delete, evict under a budget."""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.generate import GenerationResponse, GenerationResult, generate, stream_generate
from edgellm.kv.formats import KVFormat
from edgellm.kv.persist import RestoreError, read_metadata, restore_memory, save_memory
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import SamplingParams
from edgellm.tokenizer import Tokenizer

AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_agent_name(name: str) -> str:
    """Agent names become file names: refuse anything that could leave the store directory."""
    if not AGENT_NAME.match(name) or ".." in name:
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
        except (EdgeLLMError, ValueError):
            fmt, tokens, predicted = "damaged", 0, False
        stat = file.stat()
        infos.append(AgentInfo(file.name.removesuffix(".safetensors"), tokens, stat.st_size, fmt, stat.st_mtime,
                               predicted))
    return infos


class Agent:
    """One agent's conversation state: its KV memory and, for chat, its messages."""

    def __init__(self, store: AgentStore, name: str, cache: PromptCache, messages: list[dict] | None = None,
                 restore_note: str | None = None) -> None:
        self.store, self.name, self.cache = store, name, cache
        self.messages: list[dict] = messages or []
        self.restore_note = restore_note  # why a saved memory was refused, if one was
        self.pinned = False
        self.ttl_s: float | None = None
        self.last_used = time.monotonic()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.cache.layers)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
               stop: list[str] | None = None) -> Iterator[GenerationResponse]:
        """Generate reusing this agent's memory: only tokens past the cached prefix are prefilled."""
        self.last_used = time.monotonic()
        yield from stream_generate(self.store.model, self.store.tokenizer, prompt, max_tokens, sampling, stop,
                                   self.cache)
        self.store.enforce_budget(keep=self.name)

    def generate(self, prompt: str | list[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop: list[str] | None = None) -> GenerationResult:
        self.last_used = time.monotonic()
        result = generate(self.store.model, self.store.tokenizer, prompt, max_tokens, sampling, stop, self.cache)
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
    """The agents of one model in one directory, kept in RAM under a byte budget, written back to disk (LRU)."""

    def __init__(self, root: str | Path, model: nn.Module, tokenizer: Tokenizer,
                 kv_format: str | KVFormat | None = None, budget_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = model, tokenizer
        self.kv_format = kv_format if isinstance(kv_format, KVFormat) else KVFormat.parse(kv_format or "fp16")
        self.budget_bytes = budget_bytes
        self.live: OrderedDict[str, Agent] = OrderedDict()
        self.evictions = 0

    def path(self, name: str) -> Path:
        return self.root / f"{check_agent_name(name)}.safetensors"

    def agent(self, name: str) -> Agent:
        """The live agent, else its memory restored from disk, else a new empty agent."""
        if name in self.live:
            self.live.move_to_end(name)
            return self.live[name]
        cache, messages, note = None, None, None
        if self.path(name).exists():
            try:
                cache, meta = restore_memory(self.path(name), self.model, self.tokenizer.fingerprint, self.kv_format)
                messages = json.loads(meta.get("messages", "[]"))
            except RestoreError as e:
                note = str(e)
        agent = Agent(self, name, cache or PromptCache(self.model, 256, self.kv_format), messages, note)
        self.live[name] = agent
        self.enforce_budget(keep=name)
        return agent

    def save(self, agent: Agent) -> Path:
        return save_memory(self.path(agent.name), agent.cache, self.model, self.tokenizer.fingerprint,
                           agent.messages)

    def save_all(self) -> None:
        for agent in self.live.values():
            if agent.cache.tokens:
                self.save(agent)

    def live_bytes(self) -> int:
        return sum(a.nbytes for a in self.live.values())

    def enforce_budget(self, keep: str | None = None) -> None:
        """Write back and drop idle agents: expired ones first, then least recently used; never pinned ones."""
        now = time.monotonic()
        for name, agent in list(self.live.items()):
            if name != keep and agent.ttl_s is not None and now - agent.last_used > agent.ttl_s:
                self.evict(name)
        if self.budget_bytes is None:
            return
        for name in list(self.live):
            if self.live_bytes() <= self.budget_bytes:
                break
            if name != keep and not self.live[name].pinned:
                self.evict(name)

    def evict(self, name: str) -> None:
        """Save the agent's memory to disk and free it from RAM."""
        agent = self.live.pop(name)
        if agent.cache.tokens:
            self.save(agent)
        self.evictions += 1

    def list(self) -> list[AgentInfo]:
        return list_agents(self.root)

    def delete(self, name: str) -> bool:
        """Forget an agent in RAM and on disk; True if anything was removed."""
        removed = self.live.pop(name, None) is not None
        path = self.path(name)
        if path.exists():
            path.unlink()
            removed = True
        return removed

    def stats(self) -> dict:
        return {"live_agents": len(self.live), "live_bytes": self.live_bytes(), "budget_bytes": self.budget_bytes,
                "saved_agents": len(list(self.root.glob("*.safetensors"))), "evictions": self.evictions,
                "kv_format": str(self.kv_format)}
