"""Helpers around llama.cpp's native code: capture what it prints, check disk space first."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgezh.errors import UserError


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where llama.cpp logs) into a buffer; yields a list that holds
    the captured lines once the block ends. Python's own sys.stderr is flushed around it."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def ensure_writable(folder: Path, need_bytes: int, what: str) -> None:
    """Fail before writing when `folder` cannot be written or lacks `need_bytes` (+5%) free."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the output folder ({exc.strerror}); cannot write {what}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: not writable; cannot write {what}")
    free = shutil.disk_usage(folder).free
    if free < need_bytes * 1.05:
        raise UserError(f"{folder}: {free / 2**30:.2f} GiB free, {what} needs about {need_bytes / 2**30:.2f} GiB")
