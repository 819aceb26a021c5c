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

import json
import logging
import random
from collections import Counter
from importlib import metadata
from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.data import mix, sources
from edgezh.data.conversation import Conversation, Pair, RecordError
from edgezh.data.encode import Encoded, Encoder
from edgezh.data.problems import Problems
from edgezh.data.stats import length_histogram, summary, write_json
from edgezh.errors import UserError
from edgezh.layout import model_dir
from edgezh.progress import status
from edgezh.recipe import DataConfig

VERSION = "1"
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


def run(cfg: DataConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    base = inputs["base"]
    template = base.info["template"]
    with status(f"tokenizer and {template} chat format"):
        encoder = Encoder(model_dir(base), template, cfg.loss_scale)
    control = encoder.control_tokens()
    problems = Problems(cfg.on_error)
    names = source_names(cfg)
    configs = dict(zip(names, cfg.sources))

    loaded: dict[str, sources.Loaded] = {}
    for name, source in configs.items():
        with status(f"reading {name}"):
            loaded[name] = sources.load(source, name, encoder.format, control, problems, cfg.seed)
    problems.check("reading the data")

    pools, duplicates, seen = {}, {}, {"sft": set(), "pairs": set()}
    for name, part in loaded.items():
        pools[name], duplicates[name] = mix.dedup(part.records, seen[part.kind]) if cfg.dedup else (part.records, 0)
    if not any(pools.values()):
        raise UserError(_nothing_left(loaded, problems, "no usable records in any data source"))

    wanted: dict[str, int] = {}
    for kind in ("sft", "pairs"):
        group = [n for n in names if loaded[n].kind == kind]
        wanted.update(mix.counts({n: pools[n] for n in group}, {n: configs[n] for n in group}))

    stats, drawn = {}, {}
    for name in names:
        part, pool, config = loaded[name], pools[name], configs[name]
        stats[name] = entry = _source_stats(part, duplicates[name], wanted[name])
        n_eval = mix.held_out(wanted[name], cfg.eval_ratio)
        if config.replace:
            n_eval = min(n_eval, max(len(pool) - 1, 0))
        accept = (_sft_acceptor if part.kind == "sft" else _pair_acceptor)(cfg, encoder, pool, entry, problems)
        with status(f"{'encoding' if part.kind == 'sft' else 'measuring'} {name}: {wanted[name]} record(s)"):
            drawn[name] = dict(zip(("train", "eval"), mix.draw(pool, wanted[name], n_eval, config.replace,
                                                               random.Random(f"{cfg.seed}:{name}"), accept)))
        _count(entry, drawn[name], part.kind)
    problems.check("encoding the data")
    for name in names:
        stats[name]["skipped"] = problems.skipped(name)

    sft = [n for n in names if loaded[n].kind == "sft"]
    prefs = [n for n in names if loaded[n].kind == "pairs"]
    train = mix.shuffled([item for n in sft for item in drawn[n]["train"]], cfg.seed, "train")
    held = mix.shuffled([item for n in sft for item in drawn[n]["eval"]], cfg.seed, "eval")
    pairs_train = mix.shuffled([p for n in prefs for p, _ in drawn[n]["train"]], cfg.seed, "pairs_train")
    pairs_eval = mix.shuffled([p for n in prefs for p, _ in drawn[n]["eval"]], cfg.seed, "pairs_eval")
    _check_left(stats, train, pairs_train, cfg.max_length)

    with status("writing train/eval files"):
        _write_jsonl(out / "train.jsonl", [c.to_json() for c, _ in train])
        _write_jsonl(out / "eval.jsonl", [c.to_json() for c, _ in held])
        _write_parquet(out / "train.parquet", train)
        _write_parquet(out / "eval.parquet", held)
        _write_jsonl(out / "pairs_train.jsonl", [p.to_json() for p in pairs_train])
        _write_jsonl(out / "pairs_eval.jsonl", [p.to_json() for p in pairs_eval])
        length_histogram(out / "lengths.png", {n: [len(e) for split in ("train", "eval") for _, e in drawn[n][split]]
                                               for n in sft}, cfg.max_length)

    totals = _totals(stats, train, held, pairs_train, pairs_eval)
    pad = encoder.pad
    facts = {"template": template, "max_length": cfg.max_length, "pad_token_id": pad.token_id, "pad_token": pad.token,
             "pad_token_reason": pad.reason, "seed": cfg.seed}
    write_json(out / "stats.json", {**facts, "sources": stats, "totals": totals,
                                    "lengths": {"train": summary([len(e) for _, e in train]),
                                                "eval": summary([len(e) for _, e in held])}})
    log.info("data: %d train, %d eval, %d + %d pairs, %d skipped, %d duplicates", len(train), len(held),
             len(pairs_train), len(pairs_eval), totals["skipped"], totals["duplicates"])
    return {**facts, **totals,
            "sources": {n: {k: stats[n][k] for k in ("kind", "format", "read", "skipped", "duplicates", "train", "eval", "too_long")}
                        for n in names}}


# ---------------------------------------------------------------- steps


def _source_stats(part: sources.Loaded, duplicates: int, wanted: int) -> dict:
    return {"kind": part.kind, "format": part.format, "read": part.read, "valid": len(part.records),
            "skipped": {}, "duplicates": duplicates, "requested": wanted, "short": 0,
            "train": 0, "eval": 0, "too_long": {"dropped": 0, "truncated": 0},
            "tokens": {"train": 0, "eval": 0}, "trained_tokens": {"train": 0, "eval": 0}}


def _count(entry: dict, drawn: dict, kind: str) -> None:
    for split in ("train", "eval"):
        entry[split] = len(drawn[split])
        entry["tokens"][split] = sum(len(e) if kind == "sft" else sum(e) for _, e in drawn[split])
        entry["trained_tokens"][split] = sum(e.trained for _, e in drawn[split]) if kind == "sft" else 0
    entry["short"] = max(0, entry["requested"] - entry["train"] - entry["eval"])


def _sft_acceptor(cfg: DataConfig, encoder: Encoder, pool: list[Conversation], entry: dict, problems: Problems):
    """``accept(i)``: pool[i] encoded and put through the length rule → (conversation, Encoded) or None."""
    cache: dict[int, tuple[Conversation, Encoded] | None] = {}

    def accept(i: int):
        if i in cache:
            return cache[i]
        conversation = pool[i]
        cache[i] = None
        try:
            item = encoder.encode(conversation)
        except RecordError as exc:
            problems.add(conversation.source, conversation.origin, exc.reason, exc.detail)
            return None
        if len(item) > cfg.max_length:
            item = item.truncated(cfg.max_length) if cfg.too_long == "truncate" else None
            if item is None or item.trained == 0:
                entry["too_long"]["dropped"] += 1
                return None
            entry["too_long"]["truncated"] += 1
        cache[i] = (conversation, item)
        return cache[i]

    return accept


def _pair_acceptor(cfg: DataConfig, encoder: Encoder, pool: list[Pair], entry: dict, problems: Problems):
    """``accept(i)``: pool[i] rendered (a template check) and measured → (pair, (chosen, rejected) tokens) or None."""
    cache: dict[int, tuple[Pair, tuple[int, int]] | None] = {}

    def accept(i: int):
        if i in cache:
            return cache[i]
        pair = pool[i]
        cache[i] = None
        try:
            lengths = (encoder.length(pair.prompt + pair.chosen), encoder.length(pair.prompt + pair.rejected))
        except RecordError as exc:
            problems.add(pair.source, pair.origin, exc.reason, exc.detail)
            return None
        if max(lengths) > cfg.max_length:
            if cfg.too_long == "drop":
                entry["too_long"]["dropped"] += 1
                return None
            entry["too_long"]["truncated"] += 1
        cache[i] = (pair, lengths)
        return cache[i]

    return accept


def _nothing_left(loaded, problems: Problems, headline: str) -> str:
    parts = [f"{n}: {p.read} read, {sum(problems.counts[n].values())} malformed" for n, p in loaded.items()]
    return f"{headline} ({'; '.join(parts)})"


def _check_left(stats: dict, train, pairs_train, max_length: int) -> None:
    """A kind whose sources had records but kept no training example (all too long) is an error."""
    for kind, left, what in (("sft", train, "SFT examples"), ("pairs", pairs_train, "preference pairs")):
        entries = [e for e in stats.values() if e["kind"] == kind and e["requested"]]
        if entries and not left:
            dropped = sum(e["too_long"]["dropped"] for e in entries)
            raise UserError(f"no training {what} left: {dropped} were longer than data.max_length={max_length} "
                            "(and none fit); raise max_length, or use too_long: truncate")


def _totals(stats: dict, train, held, pairs_train, pairs_eval) -> dict:
    skipped = Counter()
    for entry in stats.values():
        skipped.update(entry["skipped"])
    return {
        "read": sum(e["read"] for e in stats.values()),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "duplicates": sum(e["duplicates"] for e in stats.values()),
        "too_long_dropped": sum(e["too_long"]["dropped"] for e in stats.values()),
        "too_long_truncated": sum(e["too_long"]["truncated"] for e in stats.values()),
        "train": len(train), "eval": len(held), "pairs_train": len(pairs_train), "pairs_eval": len(pairs_eval),
        "tokens_train": sum(len(e) for _, e in train), "tokens_eval": sum(len(e) for _, e in held),
        "trained_tokens_train": sum(e.trained for _, e in train), "trained_tokens_eval": sum(e.trained for _, e in held),
    }


# ---------------------------------------------------------------- files


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def _write_parquet(path: Path, items: list[tuple[Conversation, Encoded]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("loss_scale", pa.list_(pa.float32())), ("source", pa.string())])
    table = pa.table({"input_ids": [e.input_ids for _, e in items], "labels": [e.labels for _, e in items],
                      "loss_scale": [e.loss_scale for _, e in items], "source": [c.source for c, _ in items]}, schema=schema)
    pq.write_table(table, path)
