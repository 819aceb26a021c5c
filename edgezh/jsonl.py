"""JSON and JSON Lines files: the one reader every artifact, config and history file goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from edgezh.errors import UserError


def numbered_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a missing file, a line that is not JSON
    or not UTF-8 is a UserError naming `path:line`."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from None
                yield number, record
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number + 1}: not UTF-8 text") from None


def read_json(path: Path, *, what: str = "a JSON object") -> Any:
    """A JSON file that must hold an object; missing, unreadable, not JSON or not an object is a
    UserError naming `path`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {what}")
    return data


def read_jsonl(path: Path) -> list[Any]:
    """Every record of a JSON Lines file."""
    return [record for _, record in numbered_records(path)]
