"""Pass 1 of the data stage: each source's records read, checked and encoded by batches in worker
processes, and written to an Arrow file per source as the batches come back.

What stays in memory per record is three numbers (its 64-bit hash, its length, its trained-token
count — or, for a pair, its two lengths) plus the dedup set, so the stage's peak RSS does not grow with
the data's size. Workers are forked once the stage knows its tokenizer (`Workers`): each encodes with
the fast tokenizer's batch path, single-threaded, one process per core. A source of a few batches is
encoded in the stage's own process.

A task is ``(source name, format, [(origin, payload), …])``; its result is a `Chunk`: one status per
item, in order — ``("bad", origin, reason, detail)``, ``("long", key)`` (dropped by the length rule) or
``("ok", key, a, b, cut)`` — and an Arrow batch with one row per ``ok`` item. ``a, b`` are (tokens,
trained tokens) for a conversation, (chosen, rejected) lengths for a pair, (tokens, 0) for a document;
``cut`` is 1 when ``too_long: truncate`` cut the example.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgezh.data import sources
from edgezh.data.conversation import ControlTokens, RecordError
from edgezh.data.encode import Encoder

BATCH = 256  # records per task
SMALL = 4  # a source of at most this many tasks is encoded in-process


def hash64(text: str) -> int:
    """The 64-bit identity of a record (dedup, the held-out split)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class Context:
    """What every worker needs; set in the stage's process before the workers fork (`Workers`)."""

    encoder: Encoder
    control: ControlTokens
    max_length: int
    too_long: str


_CONTEXT: Context | None = None


def schema(kind: str):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    if kind == "sft":
        return pa.schema([("input_ids", ids), ("labels", ids), ("loss_scale", pa.list_(pa.float32())), ("record", pa.string())])
    if kind == "pairs":
        return pa.schema([("record", pa.string())])
    return pa.schema([("input_ids", ids)])


@dataclass
class Chunk:
    status: list[tuple]
    batch: Any  # pyarrow.RecordBatch


def work(task: tuple[str, str, list]) -> Chunk:
    """Check and encode one batch of records (in a worker, or in-process for small sources)."""
    name, fmt, items = task
    ctx = _CONTEXT
    kind = sources.kind_of(fmt)
    status: list[tuple] = [()] * len(items)
    records: list[tuple[int, Any]] = []
    for i, (origin, payload) in enumerate(items):
        try:
            records.append((i, sources.checked(name, fmt, origin, payload, ctx.encoder.format, ctx.control)))
        except RecordError as exc:
            status[i] = ("bad", origin, exc.reason, exc.detail)
    import pyarrow as pa

    if kind == "text":
        columns = _documents(ctx, records, status)
    elif kind == "pairs":
        columns = _pairs(ctx, records, status, items)
    else:
        columns = _conversations(ctx, records, status, items)
    return Chunk(status, pa.record_batch(columns, schema=schema(kind)))


def _conversations(ctx: Context, records, status, items) -> list:
    import json

    ids, labels, scales, texts = [], [], [], []
    encoded = ctx.encoder.encode_many([c for _, c in records])
    for (i, conversation), item in zip(records, encoded):
        key = hash64(conversation.key())
        if isinstance(item, RecordError):
            status[i] = ("bad", items[i][0], item.reason, item.detail)
            continue
        cut = 0
        if len(item) > ctx.max_length:
            item = item.truncated(ctx.max_length) if ctx.too_long == "truncate" else None
            if item is None or item.trained == 0:
                status[i] = ("long", key)
                continue
            cut = 1
        status[i] = ("ok", key, len(item), item.trained, cut)
        ids.append(item.input_ids)
        labels.append(item.labels)
        scales.append(item.loss_scale)
        texts.append(json.dumps(conversation.to_json(), ensure_ascii=False, sort_keys=True))
    return [ids, labels, scales, texts]


def _pairs(ctx: Context, records, status, items) -> list:
    import json

    texts = []
    for i, pair in records:
        key = hash64(pair.key())
        try:
            lengths = (ctx.encoder.length(pair.prompt + pair.chosen), ctx.encoder.length(pair.prompt + pair.rejected))
        except RecordError as exc:
            status[i] = ("bad", items[i][0], exc.reason, exc.detail)
            continue
        if max(lengths) > ctx.max_length and ctx.too_long == "drop":
            status[i] = ("long", key)
            continue
        status[i] = ("ok", key, lengths[0], lengths[1], int(max(lengths) > ctx.max_length))
        texts.append(json.dumps(pair.to_json(), ensure_ascii=False, sort_keys=True))
    return [texts]


def _documents(ctx: Context, records, status) -> list:
    ids = ctx.encoder.encode_documents([text for _, text in records])
    for (i, text), tokens in zip(records, ids):
        status[i] = ("ok", hash64(text), len(tokens), 0, 0)
    return [ids]


# ---------------------------------------------------------------- the stage's side


@dataclass
class Index:
    """One source after pass 1: counts, its Arrow file, and per kept record (in file order) its hash and
    two numbers (see the module docstring)."""

    name: str
    kind: str
    format: str
    path: Path
    read: int = 0
    valid: int = 0
    duplicates: int = 0
    dropped: int = 0  # too long
    truncated: int = 0
    keys: array = field(default_factory=lambda: array("Q"))
    a: array = field(default_factory=lambda: array("i"))
    b: array = field(default_factory=lambda: array("i"))

    @property
    def available(self) -> int:
        """Checked, distinct records (before the length rule): what the mixing ratios count."""
        return self.valid - self.duplicates

    def __len__(self) -> int:
        return len(self.keys)


class Workers:
    """A pool of forked encoders, started the first time a source is larger than a few batches."""

    def __init__(self, context: Context, processes: int | None = None):
        global _CONTEXT
        _CONTEXT = context
        self.processes = processes or _cores()
        self.pool = None

    def run(self, tasks: Iterator[tuple]) -> Iterator[Chunk]:
        first = list(islice(tasks, SMALL))
        if len(first) < SMALL or self.processes < 2:
            yield from map(work, first)
            yield from map(work, tasks)
            return
        if self.pool is None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
            self.pool = multiprocessing.get_context("fork").Pool(self.processes)
        window: deque = deque()
        for task in _chain(first, tasks):
            window.append(self.pool.apply_async(work, (task,)))
            if len(window) >= 2 * self.processes:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _cores() -> int:
    wanted = os.environ.get("EDGEZH_DATA_WORKERS")
    if wanted:
        return max(1, int(wanted))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _chain(first: list, rest: Iterable) -> Iterator:
    yield from first
    yield from rest


def tasks(name: str, fmt: str, records: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, str, list]]:
    iterator = iter(records)
    while batch := list(islice(iterator, BATCH)):
        yield name, fmt, batch


def read_source(workers: Workers, name: str, fmt: str, records: Iterable[tuple[str, Any]], path: Path,
                seen, problems, on_read=None) -> Index:
    """Pass 1 over one source: encode by batches, drop duplicates (``seen``; None: no dedup), write kept
    rows to ``path`` (Arrow IPC), count problems."""
    import pyarrow as pa

    kind = sources.kind_of(fmt)
    index = Index(name, kind, fmt, path)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema(kind)) as writer:
        for chunk in workers.run(tasks(name, fmt, records)):
            keep = []
            for row, entry in _rows(chunk.status):
                index.read += 1
                if entry[0] == "bad":
                    problems.add(name, entry[1], entry[2], entry[3])
                    continue
                index.valid += 1
                if seen is not None and not seen.add(entry[1]):
                    index.duplicates += 1
                    continue
                if entry[0] == "long":
                    index.dropped += 1
                    continue
                keep.append(row)
                index.keys.append(entry[1])
                index.a.append(entry[2])
                index.b.append(entry[3])
                index.truncated += entry[4]
            if keep:
                writer.write_batch(chunk.batch.take(pa.array(keep, pa.int32())) if len(keep) < chunk.batch.num_rows else chunk.batch)
            if on_read is not None:
                on_read(index)
    return index


def _rows(status: list[tuple]) -> Iterator[tuple[int | None, tuple]]:
    """(row in the chunk's batch or None, status) per item."""
    row = 0
    for entry in status:
        if entry[0] == "ok":
            yield row, entry
            row += 1
        else:
            yield None, entry
