"""Pass 2 of the data stage: the chosen records, in their shuffled order, copied from the per-source Arrow
files (pass 1) into the artifact's Parquet and JSON Lines files, a bounded chunk at a time.

The shuffle is external (`chunks`): rows go to buckets of consecutive output positions in one ordered
read of each pass-1 file, and each bucket is then ordered in memory, so peak memory is one bucket
whatever the data's size. Parquet files are written row group by row group (`ParquetWriter`); the same
inputs give the same bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgezh.data.stream import Index

CHUNK = 4096  # output rows per step
BUCKET = 4 * CHUNK  # consecutive output rows gathered in one bucket file


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
    """Tables of at most ``CHUNK`` output rows (the named columns plus ``source``), in output order.

    An external shuffle in two steps, so memory is one bucket whatever the data's size: each pass-1 file
    is read once, in order, a record batch at a time, and every chosen row is appended to the bucket of
    its output position (``BUCKET`` consecutive positions, an Arrow file each); then each bucket is read
    back, put in order and given out. Random access into the pass-1 files instead would touch every page
    of them for every chunk."""
    import pyarrow as pa

    if not len(rows):
        return
    folder = Path(tempfile.mkdtemp(prefix="buckets-", dir=parts[0][0].path.parent))
    writers: dict[int, tuple] = {}
    try:
        for p, (index, _) in enumerate(parts):
            positions = np.flatnonzero(which == p)
            if not len(positions):
                continue
            order = np.argsort(rows[positions], kind="stable")
            wanted, placed = rows[positions][order], positions[order]
            with pa.OSFile(str(index.path), "rb") as handle:
                reader = pa.ipc.open_file(handle)
                start = done = 0
                for number in range(reader.num_record_batches):
                    batch = reader.get_batch(number)
                    end = start + batch.num_rows
                    upto = int(np.searchsorted(wanted, end, side="left"))
                    if upto > done:
                        piece = batch.select(columns).take(pa.array(wanted[done:upto] - start))
                        piece = piece.append_column("source", pa.array([index.name] * piece.num_rows, pa.string()))
                        piece = piece.append_column("position", pa.array(placed[done:upto]))
                        buckets = placed[done:upto] // BUCKET
                        for bucket in np.unique(buckets):
                            _bucket_writer(writers, folder, int(bucket), piece.schema).write_batch(
                                piece.take(pa.array(np.flatnonzero(buckets == bucket))))
                        done = upto
                    start = end
        for sink, writer in writers.values():
            writer.close()
            sink.close()
        for bucket in sorted(writers):
            path = folder / f"{bucket}.arrow"
            with pa.OSFile(str(path), "rb") as handle:
                table = pa.ipc.open_file(handle).read_all().combine_chunks()
            path.unlink()
            table = table.take(pa.array(np.argsort(table.column("position").to_numpy(), kind="stable"))).drop_columns(["position"])
            for offset in range(0, table.num_rows, CHUNK):
                yield table.slice(offset, CHUNK)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bucket_writer(writers: dict, folder: Path, bucket: int, schema):
    import pyarrow as pa

    if bucket not in writers:
        sink = pa.OSFile(str(folder / f"{bucket}.arrow"), "wb")
        writers[bucket] = (sink, pa.ipc.new_file(sink, schema))
    return writers[bucket][1]


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
    import pyarrow.compute as pc
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
            column = table.column("input_ids")
            offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False))])
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
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
