"""The `data` stage: read every source, check, dedup, mix, split, encode through the chat template.

Outputs (the contract in docs/architecture.md), all deterministic for the same inputs:

- ``train.jsonl`` / ``eval.jsonl``: ``{"messages", "tools"?, "source"}`` per line, in the same order as
- ``train.parquet`` / ``eval.parquet``: ``input_ids`` (int32 list), ``labels`` (int32 list, -100 where not
  trained), ``loss_scale`` (float32 list, 0 where not trained), ``source`` (string);
- ``pairs_train.jsonl`` / ``pairs_eval.jsonl``: ``{"prompt", "chosen", "rejected", "source"}``;
- ``stats.json``: per source: records read, valid, skipped by reason, duplicates, selected, train/eval,
  too long (dropped / truncated), tokens and trained tokens; totals; length summaries;
- ``lengths.png``: histogram of encoded lengths per source.

Lengths: an SFT example longer than ``max_length`` is dropped (``too_long: drop``) or cut to
``max_length`` tokens in the parquet (``truncate``; its jsonl line keeps the whole conversation; one left
with no trained token is dropped). A preference pair longer than ``max_length`` (prompt + the longer
answer) is dropped under ``drop`` and kept whole under ``truncate`` (the DPO trainer truncates it).

The manifest ``info`` carries the counts, the chat format, ``pad_token_id`` (a pad distinct from every
stop token; see `edgezh.data.encode.choose_pad`) and ``max_length`` for the training stages.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np

from edgezh.artifacts import Artifact
from edgezh.data import mix, shards, sources
from edgezh.data.encode import Encoder
from edgezh.data.problems import Problems
from edgezh.data.stream import Context, Index, Workers, read_source
from edgezh.data.stats import length_histogram, summary, write_json
from edgezh.errors import UserError
from edgezh.layout import model_dir
from edgezh.progress import status
from edgezh.recipe import DataConfig

VERSION = "2"  # 2: streaming; held-out split by record hash; text blocks
log = logging.getLogger("edgezh.data")


def fingerprint(cfg: DataConfig) -> dict:
    """Identity of the local files and builtin corpora the stage reads."""
    files = []
    for source in cfg.sources:
        if source.path is not None:
            path = Path(source.path)
            stat = path.stat() if path.exists() else None
            files.append([str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    corpora = {}
    if any(s.builtin for s in cfg.sources):
        try:
            corpora["hsk-sentences-audio"] = metadata.version("hsk-sentences-audio")
        except metadata.PackageNotFoundError:
            corpora["hsk-sentences-audio"] = None
    return {"files": files, "corpora": corpora}


def source_names(cfg: DataConfig) -> list[str]:
    """Unique names: the source's own, with ``#2``, ``#3``… appended to repeats."""
    names, seen = [], Counter()
    for source in cfg.sources:
        name = sources.source_name(source)
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


KINDS = ("sft", "pairs", "text")
OUTPUTS = {"sft": ("train", "eval"), "pairs": ("pairs_train", "pairs_eval"), "text": ("text_train", "text_eval")}


def run(cfg: DataConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    base = inputs["base"]
    template = base.info["template"]
    with status(f"tokenizer and {template} chat format"):
        encoder = Encoder(model_dir(base), template, cfg.loss_scale)
    problems = Problems(cfg.on_error)
    names = source_names(cfg)
    configs = dict(zip(names, cfg.sources))
    scratch = out / ".pass1"
    scratch.mkdir()
    workers = Workers(Context(encoder, encoder.control_tokens(), cfg.max_length, cfg.too_long))
    seen = {kind: mix.Seen(scratch) if cfg.dedup else None for kind in KINDS}
    indexes: dict[str, Index] = {}
    try:
        for number, (name, source) in enumerate(configs.items()):
            fmt, records = sources.items(source, name, encoder.format.default_system, cfg.seed)
            with status(f"reading and encoding {name}") as line:
                indexes[name] = read_source(workers, name, fmt, records, scratch / f"{number}.arrow",
                                            seen[sources.kind_of(fmt)], problems,
                                            on_read=lambda index, line=line: line.update(f"reading and encoding {index.name}: "
                                                                                          f"{index.read:,} record(s)"))
    finally:
        workers.close()
        for s in seen.values():
            if s is not None:
                s.close()
    problems.check("reading the data")
    if not any(index.available for index in indexes.values()):
        raise UserError(_nothing_left(indexes, problems, "no usable records in any data source"))

    wanted: dict[str, int] = {}
    for kind in KINDS:
        group = [n for n in names if indexes[n].kind == kind]
        wanted.update(mix.counts({n: indexes[n].available for n in group}, {n: configs[n] for n in group}))
    stats, chosen = {}, {}
    for name in names:
        index, config = indexes[name], configs[name]
        keys = np.frombuffer(index.keys, dtype=np.uint64) if len(index) else np.zeros(0, np.uint64)
        train, held = mix.select(keys, min(wanted[name], len(index)) if not config.replace else wanted[name],
                                 cfg.eval_ratio, config.replace, cfg.seed, name)
        chosen[name] = {"train": train, "eval": held}
        stats[name] = _source_stats(index, wanted[name], chosen[name], problems)

    facts = {"template": template, "max_length": cfg.max_length, "pad_token_id": encoder.pad.token_id,
             "pad_token": encoder.pad.token, "pad_token_reason": encoder.pad.reason, "seed": cfg.seed}
    totals = _totals(stats)
    _check_left(stats, totals, cfg.max_length)
    with status("writing train/eval files"):
        blocks = _write(out, cfg, indexes, chosen)
        length_histogram(out / "lengths.png", {n: _lengths(indexes[n], chosen[n]) for n in names if indexes[n].kind == "sft"},
                         cfg.max_length)
    if blocks is not None:
        facts["end_of_text"] = encoder.end_of_text[0]
        totals.update(blocks)
    shutil.rmtree(scratch)
    write_json(out / "stats.json", {**facts, "sources": stats, "totals": totals,
                                    "lengths": {split: summary(np.concatenate([_lengths(indexes[n], chosen[n], split) for n in names
                                                                               if indexes[n].kind == "sft"] or [[]]))
                                                for split in ("train", "eval")}})
    log.info("data: %d train, %d eval, %d + %d pairs, %d skipped, %d duplicates", totals["train"], totals["eval"],
             totals["pairs_train"], totals["pairs_eval"], totals["skipped"], totals["duplicates"])
    return {**facts, **totals,
            "sources": {n: {k: stats[n][k] for k in ("kind", "format", "read", "skipped", "duplicates", "train", "eval", "too_long")}
                        for n in names}}


# ---------------------------------------------------------------- steps


def _lengths(index: Index, chosen: dict, split: str | None = None) -> np.ndarray:
    lengths = np.frombuffer(index.a, dtype=np.int32) if len(index) else np.zeros(0, np.int32)
    rows = [chosen[s] for s in ((split,) if split else ("train", "eval"))]
    return lengths[np.concatenate(rows)] if rows else np.zeros(0, np.int32)


def _source_stats(index: Index, wanted: int, chosen: dict, problems: Problems) -> dict:
    a = np.frombuffer(index.a, dtype=np.int32).astype(np.int64) if len(index) else np.zeros(0, np.int64)
    b = np.frombuffer(index.b, dtype=np.int32).astype(np.int64) if len(index) else np.zeros(0, np.int64)
    entry = {"kind": index.kind, "format": index.format, "read": index.read, "valid": index.valid,
             "skipped": problems.skipped(index.name), "duplicates": index.duplicates, "requested": wanted,
             "too_long": {"dropped": index.dropped, "truncated": index.truncated}}
    tokens = a + b if index.kind == "pairs" else a
    for split in ("train", "eval"):
        rows = chosen[split]
        entry[split] = int(len(rows))
        entry.setdefault("tokens", {})[split] = int(tokens[rows].sum())
        entry.setdefault("trained_tokens", {})[split] = int(b[rows].sum()) if index.kind == "sft" else (
            int(tokens[rows].sum()) if index.kind == "text" else 0)
    entry["short"] = max(0, wanted - entry["train"] - entry["eval"])
    return entry


def _write(out: Path, cfg: DataConfig, indexes: dict[str, Index], chosen: dict) -> dict | None:
    """Every output file; for text sources, the block counts."""
    blocks = None
    for kind in KINDS:
        group = [n for n in indexes if indexes[n].kind == kind]
        for split, stem in zip(("train", "eval"), OUTPUTS[kind]):
            parts = [(indexes[n], chosen[n][split]) for n in group]
            order = mix.shuffled(sum(len(rows) for _, rows in parts), cfg.seed, stem)
            if kind == "sft":
                shards.write_examples(out, stem, parts, order)
            elif kind == "pairs":
                shards.write_records(out / f"{stem}.jsonl", parts, order)
            elif group:
                made = shards.write_blocks(out / f"{stem}.parquet", parts, order, cfg.max_length)
                blocks = (blocks or {}) | {stem: made["blocks"], f"{stem.replace('text_', 'text_tokens_')}": made["tokens"]}
    return blocks


def _nothing_left(indexes: dict[str, Index], problems: Problems, headline: str) -> str:
    parts = [f"{n}: {p.read} read, {sum(problems.counts[n].values())} malformed" for n, p in indexes.items()]
    return f"{headline} ({'; '.join(parts)})"


def _check_left(stats: dict, totals: dict, max_length: int) -> None:
    """A kind whose sources had records but kept no training example (all too long) is an error."""
    for kind, left, what in (("sft", "train", "SFT examples"), ("pairs", "pairs_train", "preference pairs")):
        entries = [e for e in stats.values() if e["kind"] == kind and e["requested"]]
        if entries and not totals[left]:
            dropped = sum(e["too_long"]["dropped"] for e in entries)
            raise UserError(f"no training {what} left: {dropped} were longer than data.max_length={max_length} "
                            "(and none fit); raise max_length, or use too_long: truncate")


def _totals(stats: dict) -> dict:
    skipped = Counter()
    for entry in stats.values():
        skipped.update(entry["skipped"])
    of = lambda kind, key: sum(e[key] for e in stats.values() if e["kind"] == kind)  # noqa: E731
    tokens = lambda kind, key, split: sum(e[key][split] for e in stats.values() if e["kind"] == kind)  # noqa: E731
    return {
        "read": sum(e["read"] for e in stats.values()),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "duplicates": sum(e["duplicates"] for e in stats.values()),
        "too_long_dropped": sum(e["too_long"]["dropped"] for e in stats.values()),
        "too_long_truncated": sum(e["too_long"]["truncated"] for e in stats.values()),
        "train": of("sft", "train"), "eval": of("sft", "eval"), "pairs_train": of("pairs", "train"), "pairs_eval": of("pairs", "eval"),
        "tokens_train": tokens("sft", "tokens", "train"), "tokens_eval": tokens("sft", "tokens", "eval"),
        "trained_tokens_train": tokens("sft", "trained_tokens", "train"), "trained_tokens_eval": tokens("sft", "trained_tokens", "eval"),
        "documents_train": of("text", "train"), "documents_eval": of("text", "eval"),
    }
