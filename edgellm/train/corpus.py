"""Training text: the Python standard library's own sources, split train/held-out by a hash of each path.

The stdlib is the one sizeable, clean, license-compatible corpus present on every machine that runs edgellm,
so the built-in model can be rebuilt offline. Test suites (`test/`, `tests/`, `idle_test/`) are left out: they
are half the bytes but full of deliberately odd code (encoding torture tests, huge literal tables); so are the
codec tables in `encodings/` (12% of what is left, and they taught the first model to babble hex);
`site-packages/` is left out because it is third-party code, not the stdlib.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeLLMError

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"})


class CorpusError(EdgeLLMError):
    """The training corpus is missing, empty or too small to split."""


@dataclass(frozen=True)
class Corpus:
    """The sorted source files of one directory, each assigned to the train or the held-out split."""

    root: Path
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]

    def read(self, files: tuple[Path, ...]) -> list[str]:
        """File texts in order; files that are not UTF-8 are skipped (a handful of legacy-encoded modules)."""
        texts = []
        for file in files:
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue
        return texts


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def hash_bucket(relative: str) -> int:
    """0..9999, stable across machines and runs: sha256 of the relative path, not Python's salted hash()."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big") % 10_000


def load_corpus(root: Path | None = None, heldout_percent: float = 2.0) -> Corpus:
    """All .py files under `root` (default: the stdlib) outside SKIPPED_DIRS; those whose hash bucket falls in
    the first `heldout_percent` are held out, and at least one is, so small corpora still get a held-out set."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"corpus directory {root} does not exist")
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if len(files) < 2:
        raise CorpusError(f"{root} holds {len(files)} .py file(s); training needs at least 2 (train and held-out)")
    buckets = {f: hash_bucket(f.relative_to(root).as_posix()) for f in files}
    cutoff = max(heldout_percent * 100, min(buckets.values()) + 1)
    heldout = tuple(f for f in files if buckets[f] < cutoff)
    train = tuple(f for f in files if buckets[f] >= cutoff)
    if not train:
        raise CorpusError(f"every file of {root} fell in the held-out split; lower the held-out percentage")
    return Corpus(root, train, heldout)


def token_stream(texts: list[str], encode_batch: Callable[[list[str]], list[list[int]]], eos_id: int) -> np.ndarray:
    """One int32 stream of every text's ids (with the tokenizer's BOS) followed by EOS, for packing."""
    pieces = []
    for ids in encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
