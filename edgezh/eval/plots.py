"""PNG figures of the report (matplotlib, no display): perplexity per variant, KLD per quant."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(results: dict, folder: Path) -> list[str]:
    """Write the figures into `folder`; return their paths relative to the report (`report/…`)."""
    written = []
    if any(results.get("perplexity", {}).values()):
        written.append(perplexity_figure(results["perplexity"], folder / "perplexity.png"))
    if any(v.get("all", {}).get("tokens") for v in ((results.get("kld") or {}).get("variants") or {}).values()):
        written.append(kld_figure(results["kld"], folder / "kld.png"))
    return [f"{folder.name}/{name}" for name in written]


def perplexity_figure(ppl: dict[str, dict[str, float]], path: Path) -> str:
    plt = _pyplot()
    variants = list(ppl)
    corpora = sorted({c for v in ppl.values() for c in v})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(variants) * max(1, len(corpora)) ** 0.5 + 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(corpora))
    values = [ppl[v].get(c) for v in variants for c in corpora if ppl[v].get(c) is not None]
    for i, corpus in enumerate(corpora):
        xs = [j + (i - (len(corpora) - 1) / 2) * width for j in range(len(variants))]
        ys = [ppl[v].get(corpus, math.nan) for v in variants]
        ax.bar(xs, ys, width, label=corpus)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("perplexity")
    if values and max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title("Perplexity per variant (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def kld_figure(kld: dict, path: Path) -> str:
    plt = _pyplot()
    names = list(kld["variants"])
    means = [max(kld["variants"][n]["all"].get("mean", 0.0), 1e-12) for n in names]
    p99 = [max(kld["variants"][n]["all"].get("p99", 0.0), 1e-12) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(names) + 2), 3.6), dpi=110)
    ax.bar(range(len(names)), means, 0.6, label="mean KLD")
    ax.scatter(range(len(names)), p99, color="black", marker="_", s=400, label="99th percentile", zorder=3)
    for i, n in enumerate(names):
        ax.annotate(f"top-1 {kld['variants'][n]['all'].get('top1', 0):.1%}", (i, max(means[i], p99[i])), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 6), textcoords="offset points")
    ax.set_ylim(top=max(means + p99) * 4)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("KL divergence (nats/token)")
    ax.set_title(f"KL divergence vs {kld['reference']} (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
