"""Mixing: exact-duplicate removal, how many records each source gives, and the held-out split.

Rules (SFT sources, preference-pair sources and text sources are mixed separately, each with these rules):

- **dedup** (``data.dedup``): a record identical to an earlier one (same messages and tools, the same
  prompt/chosen/rejected, or the same document text) is dropped, across sources, in recipe order: the
  first source keeps it. Records are compared by a 64-bit hash (`Seen`; on disk beyond 4M records).
- **samples: N** takes exactly N records from the source (held-out ones included): the N with the lowest
  seeded draw score; more than the source has is an error unless ``replace: true``.
- **weight: w** gives the source the share ``w / Σw`` of the weighted sources. The weighted group is as
  large as it can be without repeating a record: ``T = min(n_i / share_i)`` over the weighted sources
  that do not set ``replace``, so the scarcest one is used whole (if every weighted source sets
  ``replace``, ``T`` is their total size). Each takes ``floor(T · share_i)`` records.
- neither: every record of the source.
- counts are taken over the distinct checked records; the **length rule** (``too_long: drop``) removes
  records before the draw, so a source gives its full count as long as it has records that fit
  (``stats.json`` counts the drops, and any shortfall as ``short``).
- a weighted source left with no usable record drops out of the shares.
- **held-out split** by record hash: a record is held out when its seeded split score (a function of its
  content hash and ``data.seed`` only) is below ``eval_ratio`` — so a record stays on its side when
  other records are added to its source, and the evaluation set is stable as data grows. A source that
  gives two or more records has at least one held out and never all (the lowest / highest score moves).
- ``replace: true``: the held-out records are chosen the same way; training records are drawn with
  replacement from the rest (upsampling), so no held-out record is also trained on.

Each output is shuffled by a permutation fixed by the seed and its name (``train``, ``eval``,
``pairs_train``, ``pairs_eval``, ``text_train``, ``text_eval``): the same recipe gives the same records
in the same order, byte for byte.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np

from edgezh.errors import UserError
from edgezh.recipe import DataSource

MEMORY_KEYS = 4_000_000  # hashes kept in a Python set before the dedup set moves to disk


class Seen:
    """The 64-bit hashes of the records kept so far (dedup across sources): a set in memory, moved to an
    SQLite table in ``folder`` beyond ``limit`` keys so memory stays bounded for any number of records."""

    def __init__(self, folder: Path, limit: int = MEMORY_KEYS):
        self.folder, self.limit = folder, limit
        self.keys: set[int] = set()
        self.db: sqlite3.Connection | None = None

    def add(self, key: int) -> bool:
        """True when ``key`` is new (and remember it)."""
        if self.db is None:
            if key in self.keys:
                return False
            self.keys.add(key)
            if len(self.keys) > self.limit:
                self._spill()
            return True
        changed = self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (key - (1 << 63),)).rowcount
        return changed == 1

    def _spill(self) -> None:
        self.db = sqlite3.connect(self.folder / "seen.sqlite")
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE seen (key INTEGER PRIMARY KEY)")
        self.db.executemany("INSERT INTO seen VALUES (?)", ((k - (1 << 63),) for k in self.keys))
        self.keys = set()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def counts(sizes: dict[str, int], configs: dict[str, DataSource]) -> dict[str, int]:
    """How many records each source contributes (train + eval), by the rules above, from the number of
    distinct checked records each has."""
    result: dict[str, int] = {}
    # a weighted source left with no usable record drops out of the shares instead of emptying the group
    weighted = {n: c for n, c in configs.items() if c.weight is not None and sizes[n]}
    total_weight = sum(c.weight for c in weighted.values())
    bounded = [sizes[n] / (c.weight / total_weight) for n, c in weighted.items() if not c.replace]
    group = min(bounded) if bounded else sum(sizes[n] for n in weighted)
    for name, config in configs.items():
        available = sizes[name]
        if config.samples is not None:
            wanted = config.samples
        elif config.weight is not None and name in weighted:
            wanted = math.floor(group * config.weight / total_weight + 1e-9)
        elif config.weight is not None:
            wanted = 0
        else:
            wanted = available
        if wanted > available and not config.replace:
            raise UserError(f"data source {name!r}: samples: {wanted} but only {available} usable record(s) "
                            "(after malformed ones and duplicates); lower `samples` or set `replace: true`")
        if available == 0:
            wanted = 0
        result[name] = wanted
    return result


def seed_of(text: str) -> int:
    from edgezh.data.stream import hash64

    return hash64(text)


def score(keys: np.ndarray, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per record hash, fixed by ``salt`` (splitmix64 of hash ^ salt)."""
    x = keys.astype(np.uint64) ^ np.uint64(seed_of(salt))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def held_out(split: np.ndarray, ratio: float) -> np.ndarray:
    """Which of these records (by their split scores) are held out: score < ratio; at least one when
    ``ratio > 0`` and there are two or more, never all."""
    mask = split < ratio
    if ratio <= 0 or len(split) < 2:
        mask[:] = False
        return mask
    if not mask.any():
        mask[np.argmin(split)] = True
    if mask.all():
        mask[np.argmax(split)] = False
    return mask


def select(keys: np.ndarray, wanted: int, ratio: float, replace: bool, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (indices into ``keys``, a source's usable records in file order) for training and held out."""
    n = len(keys)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0 or wanted == 0:
        return empty, empty
    split = score(keys, f"{seed}:split")
    if not replace:
        if wanted < n:
            chosen = np.sort(np.argsort(score(keys, f"{seed}:draw:{name}"), kind="stable")[:wanted])
        else:
            chosen = np.arange(n)
        held = held_out(split[chosen], ratio)
        return chosen[~held], chosen[held]
    held = held_out(split, ratio)
    rest = np.flatnonzero(~held)
    rng = np.random.Generator(np.random.PCG64(seed_of(f"{seed}:{name}")))
    train = rest[rng.integers(0, len(rest), max(wanted - int(held.sum()), 0))] if len(rest) else empty
    return train, np.flatnonzero(held)


def shuffled(count: int, seed: int, what: str) -> np.ndarray:
    """A permutation of ``range(count)`` fixed by the seed and the output's name."""
    return np.random.Generator(np.random.PCG64(seed_of(f"{seed}:{what}"))).permutation(count)
