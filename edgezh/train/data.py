"""The data artifact as training reads it: encoded SFT examples, preference pairs, and the SFT collator.

SFT rows (`train.parquet` / `eval.parquet`) are already encoded by the data stage through the
template registry: `input_ids`, `labels` (-100 where not trained), `loss_scale` (a weight per
token, aligned with `labels`). They reach the model untouched: no re-tokenization, no TRL
dataset preparation. `SFTCollator` pads with the data's pad id (or, padding-free, gives packed rows
restarting `position_ids`, which transformers' SDPA/eager attention turns into a block-diagonal
mask) and carries `loss_scale` beside `labels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezh.errors import UserError
from edgezh.jsonl import numbered_records

SFT_COLUMNS = ("input_ids", "labels", "loss_scale")
PAIR_KEYS = ("prompt", "chosen", "rejected")


def has_rows(path: Path) -> bool:
    """Whether a split file exists and holds at least one example (the data stage writes empty eval files
    when nothing is held out)."""
    if not path.is_file():
        return False
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    with open(path, encoding="utf-8") as handle:
        return any(line.strip() for line in handle)


def load_sft(path: Path, cache_dir: Path, max_length: int | None, limit: int | None = None) -> tuple[Any, dict]:
    """The encoded examples of one parquet file (memory-mapped: datasets' Arrow cache), cut to `max_length`,
    the first `limit` of them when given; returns (dataset, counts)."""
    from datasets import Dataset

    import pyarrow.parquet as pq

    if not path.is_file():
        raise UserError(f"{path}: not found — the data artifact has no encoded SFT examples")
    names = pq.read_schema(path).names
    missing = [c for c in SFT_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")
    if not has_rows(path):
        raise UserError(f"{path}: no examples — the recipe's data has no SFT source (messages, sharegpt, alpaca…)")
    dataset = Dataset.from_parquet(str(path), cache_dir=str(cache_dir)).select_columns(list(SFT_COLUMNS))
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))
    counts = {"examples": len(dataset), "truncated": 0, "dropped_untrained": 0}
    if max_length is not None:
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("input_ids"))
        counts["truncated"] = int(pc.sum(pc.greater(lengths, max_length)).as_py() or 0)
    if counts["truncated"]:
        dataset = dataset.map(lambda row: {c: row[c][:max_length] for c in SFT_COLUMNS})
        dataset = dataset.filter(lambda row: any(label != -100 for label in row["labels"][1:]))
        counts["dropped_untrained"] = counts["examples"] - len(dataset)
        counts["examples"] = len(dataset)
        if len(dataset) == 0:
            raise UserError(f"{path}: no example keeps a trained token within max_length={max_length}")
    return dataset, counts


def pack(dataset, max_length: int):
    """Best-fit-decreasing packing of whole examples into rows of at most `max_length` tokens
    (TRL's `pack_dataset`, which carries every list column — loss_scale included — and adds `seq_lengths`)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, max_length, strategy="bfd")


@dataclass
class SFTCollator:
    """Batches of encoded examples → tensors: input_ids, labels, loss_scale and either attention_mask
    (padded) or, padding-free, `position_ids` that restart at every example packed into a row (no
    attention mask: transformers turns restarting positions into a block-diagonal mask, row by row).
    Padding-free rows stay separate rows, padded at the end to the widest (the pad run is a block of
    its own, untrained), so attention costs width² per row rather than (all tokens of the batch)²;
    the first label of each packed example is masked so no example is trained to follow the previous
    one, and `token_count` carries the number of real tokens."""

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        for example in examples:
            if not len(example["input_ids"]) == len(example["labels"]) == len(example["loss_scale"]):
                raise ValueError("an encoded example has input_ids, labels and loss_scale of different lengths")
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(examples), width), -100, dtype=torch.long),
            "loss_scale": torch.zeros((len(examples), width), dtype=torch.float32),
        }
        if self.padding_free:
            batch["position_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
            batch["token_count"] = torch.tensor(sum(len(e["input_ids"]) for e in examples))
        else:
            batch["attention_mask"] = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(example["input_ids"])
            batch["labels"][row, :n] = torch.as_tensor(example["labels"])
            batch["loss_scale"][row, :n] = torch.as_tensor(example["loss_scale"], dtype=torch.float32)
            if not self.padding_free:
                batch["attention_mask"][row, :n] = 1
                continue
            start = 0
            for length in [*(example.get("seq_lengths") or [n]), width - n]:
                batch["position_ids"][row, start:start + length] = torch.arange(length)
                if length and start < n:
                    batch["labels"][row, start] = -100
                start += length
        return batch


def load_pairs(path: Path, limit: int | None = None) -> Any:
    """Preference pairs as a datasets.Dataset of conversational prompt / chosen / rejected (the first `limit`)."""
    from datasets import Dataset

    if not path.is_file():
        raise UserError(f"{path}: not found — the data artifact has no preference pairs (add a dpo-format source)")
    rows = []
    for number, record in numbered_records(path):
        missing = [k for k in PAIR_KEYS if not isinstance(record, dict) or not isinstance(record.get(k), list) or not record.get(k)]
        if missing:
            raise UserError(f"{path}:{number}: {', '.join(missing)} must be non-empty lists of messages")
        rows.append({k: record[k] for k in PAIR_KEYS})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: no preference pairs — add a dpo-format source to the recipe's data")
    return Dataset.from_list(rows)
