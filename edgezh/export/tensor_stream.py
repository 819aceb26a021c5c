"""Tensor-by-tensor I/O on safetensors files without holding a model (or a shard) in memory.

Reading uses plain positioned reads, not memory maps: a mapped page that was read stays
resident and counts in the process's RSS until the file is closed. Writing lays out the header
from the planned tensors first, then appends each tensor's bytes in order, so a file of any size
is written with one tensor (or one chunk of rows) in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from edgezh.errors import UserError

CODES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
         "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: code for code, dtype in CODES.items()}
CHUNK_BYTES = 32 * 2**20


def numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def read_exact(f: BinaryIO, offset: int, out: torch.Tensor, where: str) -> None:
    """Fill `out` (contiguous) with the bytes at `offset`; UserError if the file ends first."""
    raw = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    done = 0
    while done < raw.nbytes:
        got = f.readinto(raw[done:])
        if not got:
            raise UserError(f"{where}: file ends inside the tensor (truncated)")
        done += got


def read_tensor(f: BinaryIO, data_start: int, info: dict, where: str) -> torch.Tensor:
    """One whole tensor described by a safetensors header entry."""
    start, end = info["data_offsets"]
    tensor = torch.empty(info["shape"], dtype=CODES[info["dtype"]])
    if tensor.numel() * tensor.element_size() != end - start:
        raise UserError(f"{where}: declares {end - start} bytes but shape {info['shape']} and dtype {info['dtype']} need "
                        f"{tensor.numel() * tensor.element_size()}")
    read_exact(f, data_start + start, tensor, where)
    return tensor


def row_chunks(f: BinaryIO, data_start: int, info: dict, where: str) -> Iterator[torch.Tensor]:
    """A tensor as consecutive chunks of rows (dimension 0), each at most ~CHUNK_BYTES."""
    shape = info["shape"]
    dtype = CODES[info["dtype"]]
    if not shape:
        yield read_tensor(f, data_start, info, where)
        return
    row_bytes = numel(shape[1:]) * dtype.itemsize
    rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    start = info["data_offsets"][0]
    for first in range(0, shape[0], rows):
        count = min(rows, shape[0] - first)
        chunk = torch.empty([count, *shape[1:]], dtype=dtype)
        read_exact(f, data_start + start + first * row_bytes, chunk, where)
        yield chunk


class SafetensorsWriter:
    """Writes one .safetensors file from a plan of (name, dtype, shape), tensor by tensor, in plan order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, dtype, shape in plan:
            size = numel(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.path = path
        self.f = open(path, "wb")
        self.f.write(len(text).to_bytes(8, "little") + text)
        self.position = 0  # index into expected
        self.pending = 0  # bytes still owed to the current tensor

    def begin(self, name: str) -> None:
        want, size = self.expected[self.position]
        if name != want or self.pending:
            raise RuntimeError(f"{self.path}: expected tensor {want}, got {name}")
        self.pending = size
        if size == 0:
            self.position += 1

    def write(self, data: torch.Tensor) -> None:
        """Append bytes of the current tensor (the whole tensor or its next chunk of rows)."""
        raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes > self.pending:
            raise RuntimeError(f"{self.path}: too many bytes for tensor {self.expected[self.position][0]}")
        self.f.write(raw.data)
        self.pending -= raw.nbytes
        if self.pending == 0:
            self.position += 1

    def close(self) -> None:
        self.f.close()
        if self.position != len(self.expected):
            raise RuntimeError(f"{self.path}: {len(self.expected) - self.position} planned tensor(s) were not written")
