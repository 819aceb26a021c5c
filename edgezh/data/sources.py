"""Where records come from: local files (JSON Lines, JSON, Parquet, CSV, text), hub datasets, builtins.

Everything streams except a JSON document (read whole: use JSON Lines for large data). `rows(...)`
yields ``(origin, record)`` where ``origin`` is ``file:line`` (JSONL, CSV: the line the record starts
on), ``file record N`` (JSON), ``file row N`` (Parquet) or ``id:split row N`` (hub), and ``record`` is a
dict, a JSON Lines line still to parse (`parse_line`), or a `RecordError` (a line that does not decode).
`documents(...)` yields the documents of a text source. `items(...)` is what the data stage reads.

A file that cannot be read at all — missing, empty, binary (NUL bytes), not in its encoding (a GBK /
GB18030 file is recognised and named), a broken JSON document, not Parquet, an unknown extension — is a
`UserError` whatever ``on_error`` says: there is no record to skip.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgezh.data import builtin_hsk, corpora, formats
from edgezh.data.conversation import ControlTokens, Conversation, Pair, RecordError, check_encodable
from edgezh.data.problems import Problems
from edgezh.errors import UserError
from edgezh.paths import cache_dir
from edgezh.recipe import DataSource

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


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

SNIFF_BYTES = 1 << 16


def rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Raw records of a file or hub source, as they are read (builtins are built directly, see `items`).

    A JSON Lines record comes as its line's text (``str``): parsing happens where it is checked (in the
    encoding workers); every other record is a dict."""
    if source.hub is not None:
        yield from _hub_rows(source)
        return
    path = Path(source.path)
    kind = file_kind(path, source)
    if kind == "text":
        raise UserError(f"{display(path)}: a .txt file holds raw text: give the source `format: text`")
    yield from {"json": _json_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows, "csv": _csv_rows}[kind](path, source.encoding)


def file_kind(path: Path, source: DataSource) -> str:
    """json, jsonl, parquet, csv or text — after checking the file exists, is not empty and is not binary."""
    if path.is_dir():
        raise UserError(f"{display(path)}: is a folder; name a .json, .jsonl, .parquet, .csv or .txt file")
    if not path.is_file():
        raise UserError(f"{display(path)}: no such file")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{display(path)}: unknown file type {path.suffix or '(none)'!r} "
                        f"(data files are {', '.join(sorted(SUFFIXES))})")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head.strip():
        raise UserError(f"{display(path)}: empty file (no records)")
    if kind != "parquet":
        _sniff_text(path, head, source.encoding)
    return kind


def _sniff_text(path: Path, head: bytes, encoding: str | None) -> None:
    """A text file must decode: NUL bytes mean binary; not UTF-8 is named (GBK/GB18030 Chinese is common)."""
    if b"\x00" in head:
        raise UserError(f"{display(path)}: looks binary (NUL bytes in the first {len(head)} bytes), not a text data file")
    if encoding is not None:
        try:
            codecs.getincrementaldecoder(encoding)().decode(head, final=False)
        except UnicodeDecodeError as exc:
            raise UserError(f"{display(path)}: not {encoding} text (byte {exc.start}: {exc.reason})") from None
        return
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        guess = _guess_encoding(head)
        hint = (f"; it looks like {guess} Chinese text — set `encoding: gb18030` on the source, or convert the file "
                f"(iconv -f GB18030 -t UTF-8)") if guess else ""
        raise UserError(f"{display(path)}: not UTF-8 text (byte {exc.start}: {exc.reason}){hint}") from None


def _guess_encoding(head: bytes) -> str | None:
    """'GBK/GB18030' when the bytes decode as GB18030 into mostly Chinese characters."""
    try:
        text = codecs.getincrementaldecoder("gb18030")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    letters = [c for c in text if not c.isspace() and not c.isascii()]
    han = sum("\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in letters)
    return "GBK/GB18030" if letters and han / len(letters) > 0.8 else None


def lines(path: Path, encoding: str | None) -> Iterator[tuple[int, str | RecordError]]:
    """``(line number, text)`` of a text file, read as it goes; a line that does not decode is a
    `RecordError` (``bad_encoding``), so ``on_error: skip`` can drop it."""
    codec = encoding or "utf-8"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and codec.replace("-", "").lower() == "utf8" and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode(codec).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, RecordError("bad_encoding", f"not {codec} text (byte {exc.start} of the line: {exc.reason})")


def _read_text(path: Path, encoding: str | None) -> str:
    codec = encoding or "utf-8-sig"
    try:
        return path.read_text(encoding=codec)
    except UnicodeDecodeError as exc:
        raise UserError(f"{display(path)}: not {encoding or 'UTF-8'} text (byte {exc.start}: {exc.reason})") from None


def _json_rows(path: Path, encoding: str | None) -> Iterator[tuple[str, Any]]:
    """A JSON document is read whole (use JSON Lines for large data: it streams)."""
    text = _read_text(path, encoding)
    name = display(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSON Lines file named .json
            yield from _jsonl_rows(path, encoding)
            return
        raise UserError(f"{name}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = f" with keys {', '.join(sorted(data))}" if isinstance(data, dict) else ""
        raise UserError(f"{name}: expected a list of records or {{\"data\": [...]}}, found a {type(data).__name__}{keys}")
    for i, record in enumerate(data, start=1):
        yield f"{name} record {i}", record


def _jsonl_rows(path: Path, encoding: str | None) -> Iterator[tuple[str, Any]]:
    name = display(path)
    for number, line in lines(path, encoding):
        if isinstance(line, str) and not line.strip():
            continue
        yield f"{name}:{number}", line


def parse_line(line: str) -> Any:
    """One JSON Lines record, or a `RecordError` (``bad_json``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return RecordError("bad_json", f"invalid JSON ({exc.msg} at column {exc.colno})")


def _parquet_rows(path: Path, _encoding: str | None = None) -> Iterator[tuple[str, Any]]:
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


def _csv_rows(path: Path, encoding: str | None) -> Iterator[tuple[str, Any]]:
    name = display(path)
    handle = io.TextIOWrapper(open(path, "rb"), encoding=encoding or "utf-8-sig", newline="")
    try:
        yield from _csv_records(name, csv.DictReader(handle))
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not {encoding or 'UTF-8'} text (byte {exc.start}: {exc.reason})") from None
    finally:
        handle.close()


def _csv_records(name: str, reader: csv.DictReader) -> Iterator[tuple[str, Any]]:
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


# ---------------------------------------------------------------- what a source gives the stage


def kind_of(fmt: str) -> str:
    """``sft`` (conversations), ``pairs`` (preference pairs) or ``text`` (documents for pre-training)."""
    return "text" if fmt == "text" else "pairs" if fmt == "dpo" else "sft"


def is_text(source: DataSource) -> bool:
    return source.format == "text" or source.builtin == "peoples-daily" or (
        source.path is not None and source.format == "auto" and Path(source.path).suffix.lower() == ".txt")


def items(source: DataSource, name: str, default_system: str, seed: int) -> tuple[str, Iterator[tuple[str, Any]]]:
    """``(format, items)``: the source's format (detected from its first records when ``auto``) and its
    records as they are read — ``(origin, payload)``, the payload a JSON Lines line (str), a dict, a
    `RecordError`, a built `Conversation` / `Pair` (builtins) or, for text sources, a document (str)."""
    if is_text(source):
        return "text", documents(source)
    if source.builtin is not None:
        built = builtin_hsk.build(source.builtin, default_system, seed)
        for record in built:
            record.source = name
        return ("dpo" if source.builtin == "hsk-dpo" else "messages"), ((f"{name} record {i}", r) for i, r in enumerate(built, 1))
    raw = rows(source)
    head: list[tuple[str, Any]] = []
    for item in raw:
        head.append(item)
        if len(head) >= formats.DETECT_RECORDS:
            break
    where = source.hub or display(Path(source.path))
    if not head:
        raise UserError(f"{where}: no records (empty file or dataset)")
    fmt = source.format
    if fmt == "auto":
        parsed = (parse_line(r) if isinstance(r, str) else r for _, r in head)
        fmt = formats.detect((r for r in parsed if isinstance(r, dict)), where)
    if fmt == "text":
        return fmt, ((o, text_field(parse_line(r) if isinstance(r, str) else r, source.text_field)) for o, r in _chain(head, raw))
    return fmt, _chain(head, raw)


def documents(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Documents of a text source: ``(origin, text)``, or a `RecordError` for a row without text."""
    if source.builtin == "peoples-daily":
        for number, line in corpora.peoples_daily_lines():
            yield f"peoples-daily:{number}", line
        return
    if source.path is not None and file_kind(Path(source.path), source) == "text":
        yield from _text_file(Path(source.path), source)
        return
    for origin, record in rows(source):
        yield origin, text_field(parse_line(record) if isinstance(record, str) else record, source.text_field)


def text_field(record: Any, field_name: str) -> str | RecordError:
    if isinstance(record, RecordError):
        return record
    if not isinstance(record, dict):
        return RecordError("not_an_object", f"a record must be an object, got {type(record).__name__}")
    value = record.get(field_name)
    if not isinstance(value, str):
        found = ", ".join(sorted(map(str, record))) or "none"
        what = "missing" if value is None else f"{type(value).__name__}, not text"
        return RecordError("missing_text", f"`{field_name}` is {what} (columns: {found}); set `text_field` on the source")
    if not value.strip():
        return RecordError("empty_text", f"`{field_name}` is empty")
    return value


def _text_file(path: Path, source: DataSource) -> Iterator[tuple[str, Any]]:
    """A .txt file as documents: blank-line paragraphs, lines, or the whole file (``source.document``)."""
    name = display(path)
    block: list[str] = []
    first = 0
    for number, line in lines(path, source.encoding):
        if isinstance(line, RecordError):
            yield f"{name}:{number}", line
            continue
        if source.document == "line":
            if line.strip():
                yield f"{name}:{number}", line
        elif source.document == "paragraph" and not line.strip():
            if block:
                yield f"{name}:{first}", "\n".join(block)
            block = []
        else:
            if not block:
                first = number
            block.append(line)
    if block and "\n".join(block).strip():
        yield f"{name}:{first}", "\n".join(block)


def checked(name: str, fmt: str, origin: str, payload: Any, chat_format, control: ControlTokens):
    """One item of `items` as a checked `Conversation` / `Pair` (or a document's text); raises `RecordError`."""
    if isinstance(payload, RecordError):
        raise payload
    if fmt == "text":
        control.check(payload, "the document")
        return payload
    if isinstance(payload, str):
        payload = parse_line(payload)
        if isinstance(payload, RecordError):
            raise payload
    record = payload if isinstance(payload, (Conversation, Pair)) else formats.read(fmt, payload)
    record.source, record.origin = name, origin
    if isinstance(record, Pair):
        for part in ("prompt", "chosen", "rejected"):
            check_encodable(getattr(record, part), None, chat_format, control, f"`{part}`")
    else:
        check_encodable(record.messages, record.tools, chat_format, control)
    return record


@dataclass
class Loaded:
    """One source read whole into memory (small sources, tests): checked records and counts."""

    name: str
    kind: str
    format: str
    read: int = 0
    records: list = field(default_factory=list)

    @property
    def conversations(self) -> list[Conversation]:
        return self.records if self.kind == "sft" else []

    @property
    def pairs(self) -> list[Pair]:
        return self.records if self.kind == "pairs" else []


def load(source: DataSource, name: str, chat_format, control: ControlTokens, problems: Problems, seed: int) -> Loaded:
    """Read and check one source in memory, malformed records to ``problems`` (the data stage streams
    instead: `edgezh.data.stream`)."""
    fmt, records = items(source, name, chat_format.default_system, seed)
    loaded = Loaded(name, kind_of(fmt), fmt)
    for origin, payload in records:
        loaded.read += 1
        try:
            loaded.records.append(checked(name, fmt, origin, payload, chat_format, control))
        except RecordError as exc:
            problems.add(name, origin, exc.reason, exc.detail)
    return loaded


def _chain(head, rest):
    yield from head
    yield from rest
