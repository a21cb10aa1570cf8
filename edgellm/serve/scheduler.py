"""Continuous batching: one engine thread owns the model; sequences join and leave the decode batch every step.

Each step (1) admits waiting requests into free slots, reusing an agent's KV memory or the anonymous cache
with the longest common prefix, (2) prefills at most `prefill_chunk` prompt tokens, so a long prompt is spread
over several steps while running streams keep flowing, and (3) runs ONE batched decode step for every sequence
past its prefill. Tokens go back to the asyncio side through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from edgellm import runner
from edgellm.agents import Agent, AgentStore
from edgellm.kv.pool import PoolExhausted
from edgellm.kv.store import MemoryStoreError
from edgellm.models.lora import LoraAdapter, adapters, read_adapter
from edgellm.sampling import SamplingParams, TokenLogprob
from edgellm.sequence import Sequence, State, StepOutput
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.protocol import ServeError
from edgellm.speculative import Speculation, make_speculator
from edgellm.tokenizer import Tokenizer

log = logging.getLogger("edgellm.serve")

RESERVE_AHEAD = 128  # generated tokens whose pool blocks a request takes when it starts (more are taken as needed)


@dataclass
class Event:
    """One message from the engine to a request's HTTP handler."""

    text: str = ""
    finish: str | None = None  # "stop" | "length" once the sequence is done
    usage: tuple[int, int, int] | None = None  # prompt, completion, cached tokens (with `finish`)
    error: Exception | None = None
    logprob: TokenLogprob | None = None  # the step's token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: the prompt's tokens but the first (first event only)


@dataclass
class GenerationRequest:
    """What the engine needs to run one request; `events` is read by the HTTP handler on `loop`."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    stop: list[str] = field(default_factory=list)
    agent: str | None = None
    messages: list[dict] | None = None  # chat turns to remember with the agent (assistant reply appended)
    kv_prediction: bool = False  # predict the uncached prompt's K/V (all but the last token) with the KV predictor
    speculation: Speculation | None = None  # speculative decoding (checked against the engine's draft models)
    logprobs: int | None = None  # top alternatives per token (0: the token's own logprob only); None: off
    echo: bool = False  # with logprobs, score the prompt too; max_tokens 0 then only scores it
    adapter: str | None = None  # the LoRA adapter (resident on the model) every forward of this request uses
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Called from the event loop when the client goes away; the engine drops it at its next step."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


@dataclass
class Slot:
    """A running request: its sequence, and the agent whose memory it uses (None for an anonymous cache)."""

    request: GenerationRequest
    seq: Sequence
    agent: Agent | None
    last_token_at: float = 0.0
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: sent with the first token, then dropped


class Engine:
    """The model's only user: an admission queue in front of a continuously batched decode loop."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, store: AgentStore, metrics: ServerMetrics,
                 max_concurrency: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 kv_predictor: nn.Module | None = None, draft_model: nn.Module | None = None) -> None:
        self.model, self.tokenizer, self.store, self.metrics = model, tokenizer, store, metrics
        self.kv_predictor, self.draft_model = kv_predictor, draft_model
        self.max_concurrency, self.max_queue, self.prefill_chunk = max_concurrency, max_queue, prefill_chunk
        self.context = int(model.args.max_position_embeddings)
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[Slot] = []
        self.busy_agents: set[str] = set()
        self.cond = threading.Condition()
        self.store_lock = threading.RLock()  # the HTTP side lists/deletes agents while the engine saves them
        self.model_lock = threading.Lock()  # held for each step: adapters are swapped in and out between steps
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="edgellm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the loop, fail whatever is still queued or running, then flush agent memories to disk."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()
        for req in [*self.waiting, *(slot.request for slot in self.running)]:
            req.emit(Event(error=ServeError("server is shutting down", 503, "server_error")))
        self.waiting.clear()
        self.running.clear()
        self.store.save_all()
        if self.store.memory is not None:  # another replica may take these agents over without waiting out a TTL
            self.store.memory.release_all()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or refuse it with 429 when the admission queue is full."""
        with self.cond:
            if self.stopping:
                raise ServeError("server is shutting down", 503, "server_error")
            if len(self.waiting) >= self.max_queue:
                raise ServeError(f"server busy: {len(self.waiting)} requests already queued; retry shortly", 429,
                                 "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(request)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()

    @property
    def active(self) -> int:
        return len(self.running)

    def kv_bytes(self) -> tuple[int, int]:
        """Physical and logical KV bytes in RAM: agents, idle and running anonymous caches. With a block pool the
        physical figure stores each shared block once; the logical one counts it for every cache holding it."""
        running = sum(s.seq.cache.nbytes for s in self.running if s.agent is None)
        physical = self.store.live_bytes() + (0 if self.store.pool is not None else running)
        return physical, self.store.logical_bytes() + running

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.running and not any(self._admissible()):
                    self.cond.wait(timeout=0.5)
                if self.stopping:
                    return
            try:
                with self.model_lock:
                    self.step()
                self.metrics.active.set(len(self.running))
                with self.store_lock:
                    physical, logical = self.kv_bytes()
                self.metrics.kv_bytes.set(physical)
                self.metrics.kv_logical_bytes.set(logical)
            except Exception as e:  # never leave a client hanging on an engine fault
                log.exception("engine step failed")
                for slot in self.running:
                    self._discard(slot)
                    slot.request.emit(Event(error=e))
                self.running.clear()

    def _admissible(self) -> Iterator[GenerationRequest]:
        """Waiting requests that fit in free slots, skipping those whose agent is already generating."""
        busy = set(self.busy_agents)
        free = self.max_concurrency - len(self.running)
        for req in self.waiting:
            if free <= 0:
                return
            if req.cancelled or req.agent is None or req.agent not in busy:
                if req.agent is not None:
                    busy.add(req.agent)
                free -= 1
                yield req

    def _take_admissible(self) -> list[GenerationRequest]:
        # a second request for a busy agent waits in the queue (FIFO per agent) rather than being refused
        taken = list(self._admissible())
        for req in taken:
            self.waiting.remove(req)
            if req.agent is not None and not req.cancelled:
                self.busy_agents.add(req.agent)
        self.metrics.queue_depth.set(len(self.waiting))
        return taken

    def step(self) -> None:
        """Admit, prefill one chunk's worth, decode one token for every sequence past its prefill: one batched
        pass for the plain ones, a speculative step (one to k + 1 tokens) for each speculating one."""
        with self.cond:
            admitted = self._take_admissible()
        for req in admitted:
            if req.cancelled:
                self.metrics.cancelled.inc()
                continue
            try:
                if req.max_tokens == 0:
                    self._score_only(req)
                else:
                    self.running.append(self._start(req))
            except Exception as e:
                with self.cond:
                    self.busy_agents.discard(req.agent)
                req.emit(Event(error=e))
        for slot in [s for s in self.running if s.request.cancelled]:
            self.metrics.cancelled.inc()
            self._finish(slot, save=False)
        by_seq = {id(slot.seq): slot for slot in self.running}
        prefilling = [slot.seq for slot in self.running if slot.seq.state is State.PREFILL]
        for seq, out in runner.prefill(self.model, prefilling, self.prefill_chunk):
            self._prefilled(by_seq[id(seq)])
            self._emit(by_seq[id(seq)], out)
        decoding = self._grow([slot for slot in self.running if slot.seq.state is State.DECODE])
        if decoding:
            self.metrics.batch_size.observe(len(decoding))
        batch = [slot for slot in decoding if slot.seq.speculator is None]
        if batch:
            for slot, out in zip(batch, runner.decode(self.model, [slot.seq for slot in batch]), strict=True):
                self._emit(slot, out)
        for slot in decoding:
            if slot.seq.speculator is not None:
                for out in runner.speculative_step(self.model, slot.seq):
                    self._emit(slot, out)

    def _prompt_logprobs(self, req: GenerationRequest) -> list[TokenLogprob] | None:
        """Echo's prompt scores, from a forward of their own: a cached prefix has no logits to score it with."""
        if not req.echo or req.logprobs is None:
            return None
        return runner.score(self.model, req.ids, req.logprobs, adapter=req.adapter)

    def _score_only(self, req: GenerationRequest) -> None:
        """max_tokens 0 (echo): score the prompt and finish; nothing is generated and no cache is touched."""
        try:
            req.emit(Event(finish="length", usage=(len(req.ids), 0, 0), prompt_logprobs=self._prompt_logprobs(req)))
        finally:
            with self.cond:
                self.busy_agents.discard(req.agent)

    def _start(self, req: GenerationRequest) -> Slot:
        agent, cache = None, None
        # pool blocks for the prompt and the first RESERVE_AHEAD tokens now; decode takes more a block at a time
        tokens = min(len(req.ids) + min(req.max_tokens, RESERVE_AHEAD), self.context)
        try:
            with self.store_lock:
                if req.agent is not None:
                    # pinned: never evicted while it is generating; under its own adapter when the request names none
                    agent, restored = self.store.acquire(req.agent, req.adapter)
                    req.adapter = agent.adapter
                    if agent.restore_note:
                        log.warning("agent %s: saved memory not used (%s)", req.agent, agent.restore_note)
                    elif restored:
                        self.metrics.restored_tokens.inc(len(agent.cache.tokens))
                    cache = agent.cache
                    if self.store.pool is not None:
                        self.store.prepare(cache, req.ids, tokens, agent.name, share=agent.adapter is None)
                elif req.adapter is not None:  # K/V made under an adapter are shared with no one
                    cache = self.store.private_cache(req.ids, tokens)
                else:
                    cache = self.store.anonymous_cache(req.ids, tokens)[0]
            prompt_logprobs = self._prompt_logprobs(req)  # under the agent's adapter: it is known now
            predictor = self.kv_predictor if req.kv_prediction else None
            speculator = None if req.speculation is None else make_speculator(
                req.speculation, req.sampling, len(req.ids) + min(req.max_tokens, self.context) + 64,
                self.draft_model, self.kv_predictor)
            seq = Sequence(self.model, self.tokenizer, req.ids, cache, req.max_tokens, req.sampling, req.stop,
                           predictor, started_at=req.submitted, logprobs=req.logprobs, speculator=speculator,
                           adapter=req.adapter)
            seq.begin()
        except Exception as e:  # an agent acquired for a request that cannot start must not stay pinned
            with self.store_lock:
                if agent is not None:
                    self.store.release(agent, save=False)
                elif cache is not None:
                    cache.release()
            if isinstance(e, PoolExhausted):
                raise self._memory_full(len(req.ids)) from e
            raise
        self.metrics.prompt_tokens.inc(len(req.ids))
        self.metrics.cached_tokens.inc(seq.cached)
        if seq.cached:
            self.metrics.cache_hits.inc()
        return Slot(req, seq, agent, prompt_logprobs=prompt_logprobs)

    def _memory_full(self, tokens: int) -> ServeError:
        """The error for a request the KV pool cannot hold: too big for the budget (400), or held up by the
        requests running now (503, retry)."""
        pool = self.store.pool
        need = -(-tokens // pool.block_tokens) * self.model.args.num_hidden_layers
        if need > pool.capacity_blocks:
            return ServeError(f"a prompt of {tokens} tokens needs {need} KV blocks but --memory-budget holds "
                              f"{pool.capacity_blocks}: raise --memory-budget or shorten the prompt", 400,
                              code="context_too_large_for_memory")
        return ServeError("KV memory is held by running requests; retry shortly (or raise --memory-budget)", 503,
                          "server_error", code="kv_memory_full", headers={"Retry-After": "1"})

    def _grow(self, batch: list[Slot]) -> list[Slot]:
        """Take the pool blocks each sequence's next step needs (most steps need none; a speculative one holds up to
        k + 1 tokens); a sequence the full pool cannot extend ends with an error, the others decode."""
        if self.store.pool is None:
            return batch
        ready = []
        for slot in batch:
            try:
                with self.store_lock:
                    step = 1 + (slot.seq.speculator.k if slot.seq.speculator is not None else 0)
                    self.store.grow(slot.seq.cache, min(len(slot.seq.cache.tokens) + step, self.context),
                                    None if slot.agent is None else slot.agent.name)
                ready.append(slot)
            except PoolExhausted:
                slot.request.emit(Event(error=self._memory_full(len(slot.seq.cache.tokens) + 1)))
                self._finish(slot, save=False)
        return ready

    def _prefilled(self, slot: Slot) -> None:
        """The prompt is in the cache: an agent remembers whether its memory now holds predicted K/V."""
        if slot.agent is not None:
            slot.agent.note_prediction(slot.seq.cached, slot.seq.predicted)

    def _emit(self, slot: Slot, out: StepOutput) -> None:
        """Send a step's text to the client and record its metrics; on the last step, finish the request."""
        seq, req = slot.seq, slot.request
        if out.finish_reason == "error":  # this request's own step failed: only it ends, the batch goes on
            req.emit(Event(error=seq.error))
            self._finish(slot, save=False)
            return
        if len(seq.generated) == 1:
            self.metrics.ttft.observe(seq.ttft_s)
        else:
            self.metrics.inter_token.observe(seq.last_token_at - slot.last_token_at)
        slot.last_token_at = seq.last_token_at
        self.metrics.generated_tokens.inc()
        prompt_logprobs, slot.prompt_logprobs = slot.prompt_logprobs, None
        if out.finish_reason is None:
            if out.text or out.logprob or prompt_logprobs:
                req.emit(Event(text=out.text, logprob=out.logprob, prompt_logprobs=prompt_logprobs))
            return
        # an agent's memory is saved before its turn's last event: once a client has seen the turn end, a replica
        # taking the agent over (its home killed) restores that turn, not the one before
        try:
            self._finish(slot, save=True)
        finally:
            req.emit(Event(text=out.text, finish=out.finish_reason,
                           usage=(len(req.ids), len(seq.generated), seq.cached), logprob=out.logprob,
                           prompt_logprobs=prompt_logprobs))

    def _finish(self, slot: Slot, save: bool) -> None:
        self.running.remove(slot)
        self._release(slot, save)

    def _release(self, slot: Slot, save: bool) -> None:
        """Give the sequence's cache back: persist an agent's memory, or return an anonymous cache to the pool."""
        agent = slot.agent
        if agent is None:
            with self.store_lock:
                # predicted or adapted K/V must not leak into requests that did not ask for them
                if slot.request.kv_prediction or slot.request.adapter is not None:
                    slot.seq.cache.release()
                else:
                    self.store.park(slot.seq.cache)
            return
        if save and slot.request.messages is not None:
            agent.messages = [*slot.request.messages, {"role": "assistant", "content": "".join(slot.seq.text)}]
        try:
            with self.store_lock:
                self.store.release(agent, save)
        except (OSError, MemoryStoreError) as e:  # a full disk or a lost lease must not wedge the agent or others
            log.error("could not persist agent %r: %s", agent.name, e)
        finally:
            with self.cond:
                self.busy_agents.discard(agent.name)

    def _discard(self, slot: Slot) -> None:
        """After an engine fault the cache may hold K/V its token list does not: drop it rather than reuse it."""
        if slot.agent is None:
            return
        with self.store_lock:
            self.store.forget(slot.agent)  # the next request restores the last good save
        with self.cond:
            self.busy_agents.discard(slot.agent.name)

    def load_adapter(self, name: str, path: str) -> LoraAdapter:
        """Make a LoRA adapter resident between two steps: running requests go on, the base is not reloaded."""
        adapter = read_adapter(path, name)  # the file is read and checked outside the lock
        with self.model_lock:
            adapters(self.model).add(adapter)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Drop a LoRA adapter between two steps; refused (409) while a request using it is queued or running.

        Idle live agents made under it are written back to disk and dropped from RAM first: they cannot run without
        it, and their saved memory keeps its adapter, usable again once the same weights are loaded.
        """
        with self.model_lock, self.cond, self.store_lock:
            adapters(self.model).check(name)
            holders = [n for n, agent in self.store.live.items() if agent.adapter == name]
            requests = [*self.waiting, *(slot.request for slot in self.running)]
            if any(r.adapter == name or r.agent in holders for r in requests):
                raise ServeError(f"adapter {name!r} has a request in flight; unload it when idle", 409,
                                 code="adapter_busy")
            for agent in holders:
                self.store.evict(agent)
            adapters(self.model).remove(name)

    def delete_agent(self, name: str) -> bool:
        """Forget an agent in RAM and on disk; refused (409) while one of its requests is queued or running."""
        with self.cond:
            if name in self.busy_agents or any(r.agent == name for r in self.waiting):
                raise ServeError(f"agent {name!r} has a request in flight; delete it when idle", 409,
                                 code="agent_busy")
            with self.store_lock:
                return self.store.delete(name)
