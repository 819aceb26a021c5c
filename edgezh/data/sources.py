"""Where records come from: local files (JSON, JSONL, Parquet, CSV), hub datasets, the HSK builtins.

`rows(...)` yields ``(origin, record)`` where ``origin`` is ``file:line`` (JSONL, CSV: the line the
record starts on), ``file record N`` (JSON), ``file row N`` (Parquet) or ``id:split row N`` (hub), and
``record`` is a dict, or a `RecordError` for a record that could not even be parsed (a bad JSONL line).
A file that cannot be read at all (broken JSON document, not Parquet, not UTF-8, unknown extension)
is a `UserError` whatever ``on_error`` says: there is no record to skip.

`load(...)` turns one source into checked conversations or pairs, reporting each malformed record to
a `Problems` collector.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgezh.data import builtin_hsk, formats
from edgezh.data.conversation import (ControlTokens, Conversation, Pair, RecordError, check_encodable)
from edgezh.data.problems import Problems
from edgezh.errors import UserError
from edgezh.paths import cache_dir
from edgezh.recipe import DataSource

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def source_name(source: DataSource) -> str:
    """The name a source has in outputs and stats: `name`, else the builtin, hub id or file name."""
    if source.name:
        return source.name
    if source.builtin:
        return source.builtin
    if source.hub:
        return source.hub if source.split == "train" else f"{source.hub}:{source.split}"
    return Path(source.path).name


def display(path: Path) -> str:
    """A path as messages show it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- raw records


def rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Raw records of a file or hub source (builtins are built directly, see `load`)."""
    if source.hub is not None:
        yield from _hub_rows(source)
        return
    path = Path(source.path)
    if path.is_dir():
        raise UserError(f"{display(path)}: is a folder; name a .json, .jsonl, .parquet or .csv file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{display(path)}: unknown file type {path.suffix or '(none)'!r} "
                        f"(data files are {', '.join(sorted(SUFFIXES))})")
    yield from {"json": _json_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows, "csv": _csv_rows}[kind](path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{display(path)}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    name = display(path)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSON Lines file named .json
            yield from _jsonl_lines(name, text)
            return
        raise UserError(f"{name}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = f" with keys {', '.join(sorted(data))}" if isinstance(data, dict) else ""
        raise UserError(f"{name}: expected a list of records or {{\"data\": [...]}}, found a {type(data).__name__}{keys}")
    for i, record in enumerate(data, start=1):
        yield f"{name} record {i}", record


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    yield from _jsonl_lines(display(path), _read_text(path))


def _jsonl_lines(name: str, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{name}:{lineno}", RecordError("bad_json", f"invalid JSON ({exc.msg} at column {exc.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = display(path)
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{name}: not a readable Parquet file ({exc})") from None
    n = 0
    for batch in handle.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            n += 1
            yield f"{name} row {n}", record


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    name = display(path)
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise UserError(f"{name}:1: unreadable CSV header ({exc})") from None
    if not header:
        return
    if any(not h or not h.strip() for h in header) or len(set(header)) != len(header):
        raise UserError(f"{name}:1: CSV header has empty or repeated column names ({', '.join(map(repr, header))})")
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"{name}:{start}", RecordError("bad_csv", f"unreadable CSV row ({exc})")
            start = reader.line_num + 1
            continue
        where = f"{name}:{start}"
        start = reader.line_num + 1
        if None in record:
            yield where, RecordError("bad_csv", f"row has {len(header) + len(record[None])} fields, the header has {len(header)}")
        elif any(v is None for v in record.values()):
            yield where, RecordError("bad_csv", f"row has fewer fields than the header's {len(header)}")
        else:
            yield where, record


def _hub_rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    os.environ.setdefault("HF_HOME", str(cache_dir() / "huggingface"))
    import datasets

    label = f"{source.hub}:{source.split}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        dataset = datasets.load_dataset(source.hub, source.subset, split=source.split)
    except Exception as exc:  # noqa: BLE001 — datasets raises many types; any of them becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (" and HF_HUB_OFFLINE is set" if offline else "") + "; download it where there is network, or point `path` at a local file"
        raise UserError(f"data.sources: hub dataset {label} cannot be loaded ({first}){hint}") from None
    for i, record in enumerate(dataset, start=1):
        yield f"{label} row {i}", record


# ---------------------------------------------------------------- checked records


@dataclass
class Loaded:
    """One source after reading: checked records and how many raw records there were."""

    name: str
    kind: str  # "sft" or "pairs"
    format: str
    read: int = 0
    conversations: list[Conversation] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)

    @property
    def records(self) -> list:
        return self.conversations if self.kind == "sft" else self.pairs


def load(source: DataSource, name: str, chat_format, control: ControlTokens, problems: Problems, seed: int) -> Loaded:
    """Read, convert and check one source. Malformed records go to ``problems``."""
    if source.builtin is not None:
        built = builtin_hsk.build(source.builtin, chat_format.default_system, seed)
        kind = "pairs" if source.builtin == "hsk-dpo" else "sft"
        loaded = Loaded(name, kind, "dpo" if kind == "pairs" else "messages", read=len(built))
        for record in built:
            record.source = name
            _accept(loaded, record, chat_format, control, problems)
        return loaded
    raw = rows(source)
    head: list[tuple[str, Any]] = []
    for item in raw:
        head.append(item)
        if len(head) >= formats.DETECT_RECORDS:
            break
    where = source.hub or display(Path(source.path))
    if not head:
        problems.add(name, where, "empty_source", "no records (empty file or dataset)")
        return Loaded(name, "sft", source.format)
    fmt = source.format
    if fmt == "auto":
        fmt = formats.detect((r for _, r in head if isinstance(r, dict)), where)
    loaded = Loaded(name, "pairs" if fmt == "dpo" else "sft", fmt)
    for origin, record in _chain(head, raw):
        loaded.read += 1
        if isinstance(record, RecordError):
            problems.add(name, origin, record.reason, record.detail)
            continue
        try:
            converted = formats.read(fmt, record)
        except RecordError as exc:
            problems.add(name, origin, exc.reason, exc.detail)
            continue
        converted.source, converted.origin = name, origin
        _accept(loaded, converted, chat_format, control, problems)
    return loaded


def _chain(head, rest):
    yield from head
    yield from rest


def _accept(loaded: Loaded, record: Conversation | Pair, chat_format, control: ControlTokens, problems: Problems) -> None:
    try:
        if isinstance(record, Pair):
            for part in ("prompt", "chosen", "rejected"):
                check_encodable(getattr(record, part), None, chat_format, control, f"`{part}`")
        else:
            check_encodable(record.messages, record.tools, chat_format, control)
    except RecordError as exc:
        problems.add(loaded.name, record.origin, exc.reason, exc.detail)
        return
    loaded.records.append(record)
