"""Expert offload: a Mixture-of-Experts model's expert weights held within a resident-memory budget.

The loader leaves every weight memory-mapped from its file (safetensors or GGUF), so an expert that is not in RAM
is read from disk when a token routes to it. Within `budget` bytes of expert weights:
- cold experts are used in place from the mapping and kept in the page cache least-recently-used first, within
  room for the experts of the last few tokens (`cache_tokens`); past it they are dropped from this process and the
  page cache (MADV_PAGEOUT, POSIX_FADV_DONTNEED), so the budget holds as it would for a model larger than RAM;
- in the rest of the budget the hottest experts, by decayed router counts, are copied into anonymous memory
  (pinned: never paged out), re-chosen every `repin_every` routed tokens as the traffic shifts;
- while layer i runs, layer i+1's router is applied to layer i's input (the residual stream changes little from
  one layer to the next, the Pre-gated MoE / MoE-Infinity observation) and its likely experts are prefetched with
  POSIX_FADV_WILLNEED: the kernel reads them in the background, overlapped with this layer's compute.
The policy runs where the routing is known: in SparseMoeBlock.forward op at a time, and inside the fused decode
step through its hook (the step calls `before` after each MoE layer's router). A re-pin swaps tensors, so the step
re-plans on its next token. `stats()` reports hits, bytes read from disk (pages found not resident by mincore) and
the policy's own time.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.perf.hardware import parse_bytes
from edgellm.quant.linear import QuantizedLinear

PAGE = mmap.PAGESIZE
MADV_RANDOM, MADV_PAGEOUT = 1, 21
DECAY = 0.9  # router counts are multiplied by this at every re-pin: recent traffic weighs most
# tokens whose experts the cold cache keeps: on a trained MoE (4 of 64 experts, 25% resident) a cache of half a
# token's experts hit 48-52% with the rest pinned by frequency, one of four tokens' 77% (load-balanced routing is
# nearly flat overall, but a passage keeps coming back to its experts)
CACHE_TOKENS = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def parse_budget(text: str, total: int) -> int:
    """Bytes from "2GiB", "512MB", a plain byte count, or "25%" of `total` (all the expert bytes)."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1])
        except ValueError:
            share = -1.0
        if not 0 <= share <= 100:
            raise InvalidRequestError(f"expert budget {text!r}: a share of the experts is 0% to 100%")
        return int(total * share / 100)
    return parse_bytes(text)


def _pages(t: torch.Tensor) -> tuple[int, int]:
    """The page-aligned address range holding tensor `t`'s bytes."""
    start = t.data_ptr() // PAGE * PAGE
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // PAGE) * PAGE
    return start, end - start


def release_pages(t: torch.Tensor) -> None:
    """Reclaim the whole pages of a memory-mapped tensor once a copy has replaced it (gpt-oss's repacked MXFP4
    experts): touched to make the copy, they would stay resident beside it while the file is mapped. MADV_PAGEOUT,
    unlike MADV_DONTNEED, keeps the data of anonymous memory; a neighbour's partial pages stay."""
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if end > start:
        _libc.madvise(start, end - start, MADV_PAGEOUT)


class _Mappings:
    """Where this process's file mappings lie (/proc/self/maps), to turn a tensor's pages into a file range."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, int, int, str]] = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    start, end = (int(a, 16) for a in parts[0].split("-"))
                    self.maps.append((start, end, int(parts[2], 16), parts[5].rstrip("\n")))
        self.fds: dict[str, int] = {}
        self.untrusted: set[int] = set()  # fds whose residency mincore cannot report (see Expert.measurable)

    def locate(self, address: int, length: int) -> tuple[int, int, int, int]:
        """(address, length, fd, file offset) of a page range inside one file mapping."""
        for start, end, offset, path in self.maps:
            if start <= address and address + length <= end:
                if path not in self.fds:
                    self.fds[path] = os.open(path, os.O_RDONLY)
                    # a file just written (a model converted a moment ago) holds dirty pages, which eviction cannot
                    # drop until written back: write them now, so the budget holds from the first token (a read-only
                    # or network file system may refuse: it has nothing of ours to write back)
                    with contextlib.suppress(OSError):
                        os.fdatasync(self.fds[path])
                    if not (os.access(path, os.W_OK) or os.stat(path).st_uid == os.geteuid()):
                        self.untrusted.add(self.fds[path])
                    # no readahead on faults: it would pull neighbouring cold experts in, past the budget
                    _libc.madvise(start, end - start, MADV_RANDOM)
                return address, length, self.fds[path], offset + address - start
        raise InvalidRequestError("--expert-budget needs the experts memory-mapped from their file (load the model "
                                  "without converting its dtype, e.g. --dtype matching the checkpoint; gpt-oss's "
                                  "MXFP4 release experts are repacked in memory at load, so they stay resident)")


@dataclass
class Expert:
    """One expert's weight tensors: where they sit in the file mapping, and a pinned copy while it is hot."""

    slots: list[tuple[nn.Module, str, torch.Tensor]]  # (module, attribute, the mapped tensor)
    nbytes: int
    ranges: list[tuple[int, int, int, int]] = field(default_factory=list)  # (address, length, fd, file offset)
    pinned: bool = False
    # Linux's mincore reports every page of a file the process neither owns nor may write as resident: for such a
    # file hits and disk reads are not measured, and every cold use is prefetched
    measurable: bool = True
    vectors: list = field(default_factory=list)  # mincore's answer buffers, one per range

    def resident_bytes(self) -> int:
        """Bytes of the mapped tensors now in RAM (mincore; asked for every expert a token runs, so its vectors are
        made once)."""
        if len(self.vectors) != len(self.ranges):
            self.vectors = [(ctypes.c_ubyte * (length // PAGE))() for _, length, _, _ in self.ranges]
        found = 0
        for (start, length, _, _), vec in zip(self.ranges, self.vectors, strict=True):
            if _libc.mincore(start, length, vec) != 0:
                return self.nbytes  # cannot tell: count it as present rather than invent disk reads
            found += (length // PAGE - bytes(vec).count(0)) * PAGE  # a page's byte is 1 when it is resident
        return min(found, self.nbytes)

    def prefetch(self) -> None:
        """Start reading the expert's pages into the page cache in the background (readahead)."""
        for _, length, fd, offset in self.ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)

    def evict(self) -> None:
        """Unmap the expert's pages from this process and drop them from the page cache: the next use reads disk."""
        for start, length, fd, offset in self.ranges:
            _libc.madvise(start, length, MADV_PAGEOUT)
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    def pin(self) -> None:
        self._point({id(t): t.clone() for _, _, t in self.slots})
        self.pinned = True
        self.evict()  # the copy serves it now

    def unpin(self) -> None:
        self._point({})
        self.pinned = False

    def _point(self, copies: dict[int, torch.Tensor]) -> None:
        """Point the modules at the copies (or back at the mapping), refreshing a quantized projection's view."""
        for module, name, tensor in self.slots:
            new = copies.get(id(tensor), tensor)
            setattr(module, name, nn.Parameter(new, requires_grad=False) if isinstance(tensor, nn.Parameter) else new)
        for module in {id(m): m for m, _, _ in self.slots}.values():
            if isinstance(module, QuantizedLinear):  # its kernels read the blocks in place: no table-lookup copy
                module.weight_view, module.lut, module.lut_due = module.quantized, None, False


class ExpertOffload:
    """The residency policy for every expert of `model` (see the module docstring); installed on its MoE blocks."""

    def __init__(self, model: nn.Module, budget: int, repin_every: int = 256, prefetch: bool = True,
                 cache_tokens: int = CACHE_TOKENS) -> None:
        self.blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
        if not self.blocks:
            raise InvalidRequestError("--expert-budget needs a Mixture-of-Experts model; this one has no experts")
        self.experts: dict[tuple[int, int], Expert] = {}
        for i, block in enumerate(self.blocks):
            if getattr(block, "offload", None) is not None:
                raise InvalidRequestError("this model already has an expert budget")
            for e, module in enumerate(block.experts):
                slots = [(sub, name, t) for sub in module.children()
                         for name, t in list(sub._parameters.items()) + list(sub._buffers.items()) if t is not None]
                self.experts[i, e] = Expert(slots, sum(t.numel() * t.element_size() for _, _, t in slots))
        largest = max(x.nbytes for x in self.experts.values())
        top_k = max(b.top_k for b in self.blocks)
        self.total = sum(x.nbytes for x in self.experts.values())
        self.budget = min(budget, self.total)
        # the cold cache holds the experts of the last `cache_tokens` tokens (a passage comes back to its experts)
        # where the budget holds one token's; below that an LRU would lose every expert before the next token
        # needs it, so it only stages one layer's experts and the next one's prefetch, and pinning gets the rest
        per_token, staging = top_k * largest * len(self.blocks), 2 * top_k * largest
        self.cache_budget = min(self.budget, max(staging, cache_tokens * per_token if self.budget >= per_token
                                                 else self.budget // 8))
        if self.budget < 2 * top_k * largest and self.budget < self.total:
            raise InvalidRequestError(f"expert budget {self.budget / 2**20:.0f} MiB is below two layers' experts "
                                      f"({2 * top_k * largest / 2**20:.0f} MiB); raise --expert-budget")
        self.files = files = _Mappings()
        for x in self.experts.values():
            x.ranges = [files.locate(*_pages(t)) for _, _, t in x.slots]
            x.measurable = not any(fd in files.untrusted for _, _, fd, _ in x.ranges)
            x.unpin()  # drops the load-time table-lookup copies
        self.counts = torch.zeros(len(self.blocks), max(len(b.experts) for b in self.blocks))
        self.cached: OrderedDict[tuple[int, int], int] = OrderedDict()  # cold experts in the page cache, LRU first
        self.cached_bytes = 0
        self.inflight: set[tuple[int, int]] = set()  # prefetched, not used yet
        self.repin_every, self.prefetch, self.since_repin, self.repins = repin_every, prefetch, 0, 0
        self.hits = self.uses = self.unmeasured = self.disk_bytes = self.prefetched = self.tokens = 0
        self.prefetch_used = 0  # prefetched experts the next layer did run
        self.repin_due = False
        self.policy_s = 0.0
        for i, block in enumerate(self.blocks):
            block.offload, block.offload_layer = self, i
        model.__dict__.pop("_fused", None)  # a fused plan made before has no hook into the policy
        if self.budget >= self.total:
            for x in self.experts.values():
                x.pin()
        else:
            for x in self.experts.values():
                x.evict()  # start from the budget, not from whatever loading left in RAM

    def before(self, layer: int, x: torch.Tensor, index: torch.Tensor, in_step: bool = False) -> None:
        """Called by layer `layer`'s MoE block after routing `x` to `index`, before its experts run; `in_step`
        from inside the fused decode step, whose plan holds the current tensors until it returns (`settle`)."""
        t0 = time.perf_counter()
        flat = index.flatten()
        chosen = sorted(set(flat.tolist()))
        self.counts[layer].index_add_(0, flat, torch.ones(flat.numel()))
        if layer == 0:
            self.tokens += x.shape[0]
            self.since_repin += x.shape[0]
        for e in chosen:
            expert = self.experts[layer, e]
            self.uses += 1
            # pinned, or cold but used since its pages last came in and not evicted since: resident (asking mincore
            # for every expert of every token cost ~10% of a small MoE's step; a page the kernel reclaimed under
            # memory pressure is then read by its fault, uncounted)
            if expert.pinned or ((layer, e) in self.cached and (layer, e) not in self.inflight):
                self.hits += 1
                if not expert.pinned:
                    self._touch(layer, e)
                continue
            if not expert.measurable:
                self.unmeasured += 1
                expert.prefetch()
                self._touch(layer, e)
                continue
            missing = expert.nbytes - expert.resident_bytes()
            self.hits += missing == 0
            if (layer, e) in self.inflight:  # a prefetch in flight was counted when it was issued
                self.prefetch_used += 1
                self.inflight.discard((layer, e))
            else:
                self.disk_bytes += missing
            if missing:
                expert.prefetch()  # all of this layer's misses read at once, not fault by fault
            self._touch(layer, e)
        self._shrink({(layer, e) for e in chosen})  # the layer before is done with its experts
        if self.prefetch and layer + 1 < len(self.blocks):
            nxt = self.blocks[layer + 1]
            with torch.no_grad():
                ahead = nxt.route(x[-1:])[2]  # the newest token's, as the next layer would route it now
            for e in ahead.flatten().tolist():
                expert = self.experts[layer + 1, e]
                if not expert.pinned and (layer + 1, e) not in self.cached:
                    self.prefetched += 1
                    self.disk_bytes += expert.nbytes - expert.resident_bytes() if expert.measurable else 0
                    self.inflight.add((layer + 1, e))
                    expert.prefetch()
                    self._touch(layer + 1, e)
        if layer == len(self.blocks) - 1 and (self.since_repin >= self.repin_every or not self.repins):
            self.repin_due = True
            if not in_step:
                self.settle()
        self.policy_s += time.perf_counter() - t0

    def _touch(self, layer: int, e: int) -> None:
        """Mark a cold expert most recently used."""
        key = (layer, e)
        if key in self.cached:
            self.cached.move_to_end(key)
        else:
            self.cached[key] = self.experts[key].nbytes
            self.cached_bytes += self.cached[key]

    def _shrink(self, keep: set[tuple[int, int]]) -> None:
        """Evict the least recently used cold experts past the cache budget, except those about to run (a prefill
        chunk may route to more experts than the budget holds: they stay until the next layer)."""
        if self.cached_bytes <= self.cache_budget:
            return
        for key in list(self.cached):
            if self.cached_bytes <= self.cache_budget:
                break
            if key not in keep:
                self.cached_bytes -= self.cached.pop(key)
                self.inflight.discard(key)
                self.experts[key].evict()

    def settle(self) -> None:
        """Between forward passes: re-pin if due (swapping tensors under a running fused step would leave it
        reading pages the swap just evicted)."""
        if self.repin_due:
            self.repin()

    def repin(self) -> None:
        """Pin the most-routed experts within the budget left after the cold cache; unpin the rest (a budget that
        holds every expert keeps them all pinned)."""
        self.repin_due, self.since_repin = False, 0
        self.repins += 1
        if self.budget >= self.total:
            return
        order = torch.argsort(self.counts.flatten(), descending=True, stable=True).tolist()
        width, room = self.counts.shape[1], self.budget - self.cache_budget
        want: set[tuple[int, int]] = set()
        for flat in order:
            key = (flat // width, flat % width)
            if key in self.experts and self.experts[key].nbytes <= room:
                want.add(key)
                room -= self.experts[key].nbytes
        for key, expert in self.experts.items():
            if expert.pinned and key not in want:
                expert.unpin()
                self._touch(*key)  # its pages are the mapping's again: cold, most recently demoted
        for key in want:
            if not self.experts[key].pinned:
                if key in self.cached:
                    self.cached_bytes -= self.cached.pop(key)
                self.experts[key].pin()
        self.counts *= DECAY

    def resident_bytes(self) -> int:
        """Expert bytes in RAM now: the pinned copies plus the mapped pages present (what the budget bounds)."""
        return sum(x.nbytes if x.pinned else x.resident_bytes() for x in self.experts.values())

    def stats(self) -> dict[str, float]:
        return {"budget_bytes": self.budget, "expert_bytes": self.total,
                "pinned_experts": sum(x.pinned for x in self.experts.values()), "experts": len(self.experts),
                "hit_rate": self.hits / max(self.uses - self.unmeasured, 1) if self.uses > self.unmeasured else None,
                "unmeasured_uses": self.unmeasured,
                "disk_bytes_per_token": self.disk_bytes / max(self.tokens, 1), "prefetched": self.prefetched,
                "prefetch_accuracy": self.prefetch_used / self.prefetched if self.prefetched else None,
                "repins": self.repins, "policy_s": self.policy_s, "tokens": self.tokens}


def enable(model: nn.Module, budget: str | int, **kwargs: Any) -> ExpertOffload:
    """Hold `model`'s experts within `budget` (bytes, or a size string as `parse_budget` reads)."""
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    total = sum(t.numel() * t.element_size() for b in blocks for e in b.experts for t in e.state_dict().values())
    return ExpertOffload(model, parse_budget(budget, total) if isinstance(budget, str) else budget, **kwargs)


def installed(model: nn.Module) -> ExpertOffload | None:
    """The policy `enable` installed on `model`, if any."""
    return next((layer.mlp.offload for layer in model.model.layers if getattr(layer.mlp, "offload", None)), None)
