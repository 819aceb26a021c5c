"""Mixing: exact-duplicate removal, how many records each source gives, and the held-out split.

Rules (SFT sources and preference-pair sources are mixed separately, each with these rules):

- **dedup** (``data.dedup``): a record identical to an earlier one (same messages and tools, or the same
  prompt/chosen/rejected) is dropped, across sources, in recipe order: the first source keeps it.
- **samples: N** takes exactly N records from the source (held-out ones included) with a seeded sample
  without replacement; more than the source has is an error unless ``replace: true``.
- **weight: w** gives the source the share ``w / Σw`` of the weighted sources. The weighted group is as
  large as it can be without repeating a record: ``T = min(n_i / share_i)`` over the weighted sources
  that do not set ``replace``, so the scarcest one is used whole (if every weighted source sets
  ``replace``, ``T`` is their total size). Each takes ``floor(T · share_i)`` records.
- neither: every record of the source.
- ``replace: true``: records are drawn with replacement (upsampling); the held-out part is drawn first,
  without replacement, so no held-out record is also trained on.
- **length rule**: records are encoded as they are drawn; one that the length rule drops
  (``too_long: drop``) is replaced by the next draw, so a source gives its full count as long as it has
  records that fit (``stats.json`` counts the drops, and any shortfall).
- a weighted source left with no usable record drops out of the shares.
- **held-out split** per source: ``round(count · eval_ratio)`` records, at least one when
  ``eval_ratio > 0`` and the source gives two or more, and never all of them — so every source is
  represented in the evaluation set.

All draws use ``random.Random(f"{seed}:{source name}")``; each output list is shuffled with
``random.Random(f"{seed}:{output}")`` (``train``, ``eval``, ``pairs_train``, ``pairs_eval``): the same recipe
gives the same records in the same order.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

from edgezh.errors import UserError
from edgezh.recipe import DataSource


def dedup(records: list, seen: set[str]) -> tuple[list, int]:
    """Records whose key was not seen before (``seen`` is updated); returns (kept, duplicates)."""
    kept = []
    for record in records:
        key = record.key()
        if key in seen:
            continue
        seen.add(key)
        kept.append(record)
    return kept, len(records) - len(kept)


def counts(pools: dict[str, list], configs: dict[str, DataSource]) -> dict[str, int]:
    """How many records each source contributes (train + eval), by the rules above."""
    result: dict[str, int] = {}
    # a weighted source left with no usable record drops out of the shares instead of emptying the group
    weighted = {n: c for n, c in configs.items() if c.weight is not None and pools[n]}
    total_weight = sum(c.weight for c in weighted.values())
    bounded = [len(pools[n]) / (c.weight / total_weight) for n, c in weighted.items() if not c.replace]
    group = min(bounded) if bounded else sum(len(pools[n]) for n in weighted)
    for name, config in configs.items():
        available = len(pools[name])
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


def held_out(count: int, ratio: float) -> int:
    if ratio <= 0 or count < 2:
        return 0
    return min(max(1, round(count * ratio)), count - 1)


def draw(pool: list, wanted: int, n_eval: int, replace: bool, rng: random.Random,
         accept: Callable[[int], Any | None]) -> tuple[list, list]:
    """Draw a source's held-out and training items. ``accept(index)`` encodes ``pool[index]`` and returns
    the item, or None when the length rule drops it; a dropped record is replaced by the next draw, so a
    source gives its full count while it has records that fit.

    Held-out items come first from a seeded permutation of the pool; training items continue along it
    (without replacement) or are drawn uniformly from the records not held out (with replacement)."""
    order = rng.sample(range(len(pool)), len(pool))
    position = 0
    held: list = []
    while len(held) < n_eval and position < len(order):
        item = accept(order[position])
        position += 1
        if item is not None:
            held.append(item)
    train: list = []
    target = wanted - n_eval
    if not replace:
        while len(train) < target and position < len(order):
            item = accept(order[position])
            position += 1
            if item is not None:
                train.append(item)
        return train, held
    alive = order[position:]
    while len(train) < target and alive:
        k = rng.randrange(len(alive))
        item = accept(alive[k])
        if item is None:
            alive[k] = alive[-1]
            alive.pop()
        else:
            train.append(item)
    return train, held


def shuffled(records: list, seed: int, what: str) -> list:
    records = list(records)
    random.Random(f"{seed}:{what}").shuffle(records)
    return records
