"""Training logs: the Trainer's log records as JSONL, and PNG plots drawn with matplotlib's Agg backend.

`trainer_log.jsonl` holds one JSON object per line: the Trainer's records (`step`, `epoch`, `loss`,
`learning_rate`, `grad_norm`, `eval_loss`, DPO's `rewards/*`…) and edgezh's own events
(`{"event": "train_begin", "step": N, "resumed_from": "checkpoint-N" | null}`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from transformers import TrainerCallback
from edgezh.jsonl import read_jsonl

SFT_PLOTS = {"loss.png": [("loss", "train loss"), ("eval_loss", "eval loss")],
             "learning_rate.png": [("learning_rate", "learning rate")]}
DPO_PLOTS = {"loss.png": [("loss", "train loss"), ("eval_loss", "eval loss")],
             "rewards.png": [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected")],
             "reward_accuracy.png": [("rewards/accuracies", "reward accuracy")]}


def _clean(record: dict) -> dict:
    """JSON-safe: floats that are NaN/inf become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")


def read_log(path: Path) -> list[dict]:
    """The records of a training log, none when it was not written yet."""
    return read_jsonl(path) if path.is_file() else []


class JsonlLogger(TrainerCallback):
    """Appends every log record to a JSONL file as training runs (main process only), so progress
    and the steps of a killed run stay readable; `train_begin` records where a run (re)started."""

    def __init__(self, path: Path, resumed_from: str | None = None):
        self.path = Path(path)
        self.resumed_from = resumed_from

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            append_jsonl(self.path, [{"event": "train_begin", "step": state.global_step, "resumed_from": self.resumed_from}])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, [{**logs, "step": state.global_step}])


def final_records(log_history: list[dict], events: list[dict]) -> list[dict]:
    """The log of the whole training — the Trainer's history survives a resume (it is restored from the
    checkpoint) — with edgezh's events in step order."""
    records = [dict(r) for r in log_history]
    for event in events:
        index = next((i for i, r in enumerate(records) if r.get("step", 0) > event["step"]), len(records))
        records.insert(index, event)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "event" not in r]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot(records: list[dict], folder: Path, layout: dict[str, list[tuple[str, str]]], title: str) -> list[str]:
    """One PNG per entry of `layout` that has data; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    for name, curves in layout.items():
        drawn = [(label, *series(records, key)) for key, label in curves]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, steps, values in drawn:
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        axes.set_xlabel("step")
        axes.set_title(f"{title}: {', '.join(d[0] for d in drawn)}")
        axes.grid(alpha=0.3)
        if len(drawn) > 1:
            axes.legend()
        figure.tight_layout()
        figure.savefig(folder / name, metadata={"Software": None})
        plt.close(figure)
        written.append(name)
    return written
