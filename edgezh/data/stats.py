"""What the data stage reports: per-source counts and token totals (stats.json), a length histogram (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

PNG_METADATA = {"Software": None}  # matplotlib writes no date in PNGs; dropping its version keeps files identical


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def length_histogram(path: Path, lengths: dict[str, list[int]], max_length: int) -> None:
    """A stacked histogram of encoded lengths per source, with the length limit marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [n for n, values in lengths.items() if len(values)]
    top = int(max([max(v) for v in lengths.values() if len(v)], default=1))
    bins = min(50, max(1, top))
    if names:
        ax.hist([lengths[n] for n in names], bins=bins, range=(0, max(top, 1)), stacked=True, label=names)
        ax.legend(fontsize=8)
    ax.axvline(max_length, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"tokens per example (max_length {max_length})")
    ax.set_ylabel("examples")
    ax.set_title("encoded lengths (train + eval)")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=PNG_METADATA)


def summary(values) -> dict:
    """Count, total, min, mean, median and max of lengths (a list or a numpy array)."""
    import numpy as np

    ordered = np.sort(np.asarray(values, dtype=np.int64))
    if not len(ordered):
        return {"count": 0, "total": 0}
    total = int(ordered.sum())
    return {"count": len(ordered), "total": total, "min": int(ordered[0]), "max": int(ordered[-1]),
            "mean": round(total / len(ordered), 2), "median": int(ordered[len(ordered) // 2])}
