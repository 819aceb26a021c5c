"""KL divergence and top-1 agreement of quantized variants against a reference, token by token.

As llama.cpp's `perplexity --kl-divergence`: for every scored token, with P the reference's
next-token distribution and Q the variant's, both over the full vocabulary,

    KLD = Σ_v P(v) · (log P(v) − log Q(v))        (nats)

and top-1 agreement is whether argmax P = argmax Q. The statistics are the mean, the 99th
percentile and the maximum over tokens, plus the share of tokens whose top-1 agrees. The tokens are
exactly the perplexity windows' scored tokens (`edgezh.eval.perplexity`), so the perplexities of
the reference and the variants fall out of the same pass.

The reference and the variants run in lockstep, window by window: nothing of size vocabulary ×
tokens is kept (llama.cpp stores the reference's log-probabilities in a file instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgezh.eval.perplexity import Window, token_nll


@dataclass
class Comparison:
    """Per-token figures of one variant against the reference."""

    nll: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        return cat(self.nll, np.float64), cat(self.kld, np.float64), cat(self.top1, bool)


def token_kld(ref_log_probs, log_probs) -> tuple[np.ndarray, np.ndarray]:
    """KL(P_ref ‖ Q) per row and whether each row's top-1 agrees."""
    import torch

    p = ref_log_probs.exp()
    terms = torch.where(p > 0, p * (ref_log_probs - log_probs), 0.0)  # 0 · log 0 = 0
    kld = terms.sum(-1, dtype=torch.float64).numpy()
    same = (ref_log_probs.argmax(-1) == log_probs.argmax(-1)).numpy()
    return kld, same


def compare(reference, variants: dict, wins: list[Window]) -> tuple[np.ndarray, dict[str, Comparison]]:
    """Run `reference` and every backend in `variants` over `wins`; return the reference's per-token
    negative log-likelihood and each variant's per-token NLL, KLD and top-1 agreement."""
    ref_nll: list[np.ndarray] = []
    results = {name: Comparison() for name in variants}
    for w in wins:
        ref = reference.log_probs(w.ids, w.rows)
        ref_nll.append(token_nll(ref, w.targets))
        for name, backend in variants.items():
            lp = backend.log_probs(w.ids, w.rows)
            if lp.shape != ref.shape:
                raise ValueError(f"{name}: vocabulary of {lp.shape[-1]} tokens, the reference has {ref.shape[-1]}")
            kld, same = token_kld(ref, lp)
            results[name].nll.append(token_nll(lp, w.targets))
            results[name].kld.append(kld)
            results[name].top1.append(same)
    return (np.concatenate(ref_nll) if ref_nll else np.zeros(0)), results


def stats(kld: np.ndarray, top1: np.ndarray) -> dict:
    """Mean, median, p99 and max KLD and the top-1 agreement, as llama.cpp prints them."""
    if len(kld) == 0:
        return {"tokens": 0}
    return {
        "tokens": int(len(kld)),
        "mean": float(np.mean(kld)),
        "median": float(np.median(kld)),
        "p99": float(np.percentile(kld, 99)),
        "max": float(np.max(kld)),
        "top1": float(np.mean(top1)),
    }


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (size, kld) points are Pareto-optimal: no other point is at most as large and at most as far
    from the reference, and better in one of the two."""
    flags = []
    for i, (size, value) in enumerate(points):
        dominated = any(j != i and s <= size and v <= value and (s < size or v < value) for j, (s, v) in enumerate(points))
        flags.append(not dominated)
    return flags


def chart_points(results: dict) -> dict:
    """The data of the size-vs-KLD chart, kept in the report's results (`results["kld"]["chart"]`): one point
    per quantized variant with a size and a measured mean KLD — file bytes, mean and p99 KLD, top-1, its
    `group` (a variant's facts may name one, e.g. "imatrix" or "plain"; None otherwise) and whether it is on
    the Pareto front — and the reference's size."""
    k = results.get("kld") or {}
    facts = results.get("variants") or {}
    points = []
    for name, v in (k.get("variants") or {}).items():
        a = v.get("all") or {}
        size = (facts.get(name) or {}).get("bytes")
        if not a.get("tokens") or a.get("mean") is None or not size:
            continue
        points.append({"variant": name, "bytes": int(size), "mean_kld": a["mean"], "p99_kld": a.get("p99"),
                       "top1": a.get("top1"), "group": (facts.get(name) or {}).get("group")})
    for point, optimal in zip(points, pareto([(p["bytes"], p["mean_kld"]) for p in points])):
        point["pareto"] = optimal
    points.sort(key=lambda p: (p["bytes"], p["mean_kld"]))
    reference = k.get("reference")
    return {"x": "bytes", "y": "mean_kld", "reference": {"variant": reference, "bytes": (facts.get(reference) or {}).get("bytes")},
            "points": points}
