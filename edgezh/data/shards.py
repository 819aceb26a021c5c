"""Pass 2 of the data stage: the chosen records, in their shuffled order, copied from the per-source Arrow
files (pass 1) into the artifact's Parquet and JSON Lines files, a bounded chunk at a time.

Each chunk memory-maps the source files, takes its rows and lets the maps go again, so the pages it
touched leave the process: peak memory is one chunk, whatever the data's size. Parquet files are written
row group by row group (`ParquetWriter`); the same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgezh.data.stream import Index, open_file

CHUNK = 4096  # output rows per step


def parquet_schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("input_ids", ids), ("labels", ids), ("loss_scale", pa.list_(pa.float32())), ("source", pa.string())])


def ordered(parts: list[tuple[Index, np.ndarray]], permutation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part number, row) of every output position, in output order."""
    which = np.concatenate([np.full(len(rows), i, dtype=np.int32) for i, (_, rows) in enumerate(parts)] or [np.zeros(0, np.int32)])
    rows = np.concatenate([rows for _, rows in parts] or [np.zeros(0, np.int64)]).astype(np.int64)
    return which[permutation], rows[permutation]


def chunks(parts: list[tuple[Index, np.ndarray]], which: np.ndarray, rows: np.ndarray, columns: list[str]):
    """Tables of ``CHUNK`` output rows (the named columns plus ``source``), in output order.

    Rows are taken record batch by record batch of the pass-1 files (a take over a table of many
    batches would first concatenate all of them: a copy of the whole column for every chunk)."""
    import pyarrow as pa

    starts = {}
    for start in range(0, len(rows), CHUNK):
        part_of, row_of = which[start:start + CHUNK], rows[start:start + CHUNK]
        pieces, positions = [], []
        for p in np.unique(part_of):
            index = parts[p][0]
            at = np.flatnonzero(part_of == p)
            mapped, reader = open_file(index.path)
            try:
                if p not in starts:
                    sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
                    starts[p] = np.concatenate([[0], np.cumsum(sizes)])
                batch_of = np.searchsorted(starts[p], row_of[at], side="right") - 1
                order = np.argsort(batch_of, kind="stable")
                for b in np.unique(batch_of):
                    picked = order[batch_of[order] == b]
                    batch = reader.get_batch(int(b)).select(columns)
                    taken = batch.take(pa.array(row_of[at][picked] - starts[p][b]))
                    pieces.append(taken.append_column("source", pa.array([index.name] * len(picked), pa.string())))
                    positions.append(at[picked])
            finally:
                del reader
                mapped.close()
        table = pa.Table.from_batches(pieces).combine_chunks()
        yield table.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def write_examples(out: Path, stem: str, parts: list[tuple[Index, np.ndarray]], permutation: np.ndarray) -> None:
    """``<stem>.parquet`` (encoded) and ``<stem>.jsonl`` (the conversations) for SFT examples."""
    import pyarrow.parquet as pq

    which, rows = ordered(parts, permutation)
    with pq.ParquetWriter(out / f"{stem}.parquet", parquet_schema()) as writer, \
            open(out / f"{stem}.jsonl", "w", encoding="utf-8", newline="\n") as lines:
        wrote = False
        for table in chunks(parts, which, rows, ["input_ids", "labels", "loss_scale", "record"]):
            writer.write_table(table.drop_columns(["record"]).cast(parquet_schema()), row_group_size=CHUNK)
            lines.writelines(f"{line}\n" for line in table.column("record").to_pylist())
            wrote = True
        if not wrote:
            writer.write_table(parquet_schema().empty_table())


def write_records(path: Path, parts: list[tuple[Index, np.ndarray]], permutation: np.ndarray) -> None:
    """A JSON Lines file of the records (preference pairs)."""
    which, rows = ordered(parts, permutation)
    with open(path, "w", encoding="utf-8", newline="\n") as lines:
        for table in chunks(parts, which, rows, ["record"]):
            lines.writelines(f"{line}\n" for line in table.column("record").to_pylist())


def write_blocks(path: Path, parts: list[tuple[Index, np.ndarray]], permutation: np.ndarray, block: int) -> dict:
    """Documents joined in their shuffled order and cut into rows of ``block`` tokens (the last one
    shorter), every token trained; ``source`` is the source of a row's first token. Returns counts."""
    import pyarrow.parquet as pq

    which, rows = ordered(parts, permutation)
    schema = parquet_schema()
    buffer, owners = np.zeros(0, dtype=np.int32), []  # owners: (position in buffer, source) where a document starts
    batch: list[tuple[np.ndarray, str]] = []
    blocks = tokens = 0

    def emit(ids: np.ndarray) -> None:
        nonlocal blocks, tokens
        batch.append((ids, next(s for start, s in reversed(owners) if start <= 0)))
        blocks += 1
        tokens += len(ids)

    with pq.ParquetWriter(path, schema) as writer:
        for table in chunks(parts, which, rows, ["input_ids"]):
            sources = table.column("source").to_pylist()
            offsets = table.column("input_ids").combine_chunks().offsets.to_numpy()
            values = table.column("input_ids").combine_chunks().values.to_numpy()
            base = len(buffer)
            owners += [(base + int(offsets[i]), s) for i, s in enumerate(sources)]
            buffer = np.concatenate([buffer, values.astype(np.int32)])
            while len(buffer) >= block:
                emit(buffer[:block])
                buffer = buffer[block:]
                owners = _shift(owners, block)
            _flush(writer, batch, schema)
        if len(buffer):
            emit(buffer)
        _flush(writer, batch, schema)
        if not blocks:
            writer.write_table(schema.empty_table())
    return {"blocks": blocks, "tokens": tokens}


def _shift(owners: list[tuple[int, str]], by: int) -> list[tuple[int, str]]:
    """Document starts after dropping ``by`` tokens: keep the last one at or before the new start."""
    moved = [(start - by, s) for start, s in owners]
    keep = [i for i, (start, _) in enumerate(moved) if start <= 0]
    return moved[keep[-1]:] if keep else moved


def _flush(writer, batch: list, schema) -> None:
    import pyarrow as pa

    if not batch:
        return
    ids = [b[0].tolist() for b in batch]
    writer.write_table(pa.table({"input_ids": ids, "labels": ids, "loss_scale": [[1.0] * len(i) for i in ids],
                                 "source": [b[1] for b in batch]}, schema=schema), row_group_size=CHUNK)
    batch.clear()
