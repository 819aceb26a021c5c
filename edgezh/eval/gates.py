"""The recipe's quality gates checked against the figures of the report.

Each gate applies to every quantized variant against the reference (see `edgezh.eval.variants`):
`max_kld` to the mean KLD and `min_top1` to the top-1 agreement, both pooled over all corpora;
`max_ppl_ratio` to perplexity(variant) / perplexity(reference) on each corpus. A gate set while
nothing was measured for it (no quantized variant) fails too: a limit nobody checked is no limit.
"""

from __future__ import annotations

from edgezh.recipe import Gates


def check(gates: Gates, results: dict) -> list[dict]:
    """One row per gate and variant: gate, variant, value, limit, passed, message."""
    rows: list[dict] = []
    kld = results.get("kld") or {}
    reference = kld.get("reference")
    variants = kld.get("variants") or {}

    def add(gate: str, variant: str, value: float | None, limit: float, passed: bool, figure: str) -> None:
        shown = "not measured" if value is None else f"{value:.6g}"
        relation = "within" if passed else "exceeds" if gate.startswith("max") else "below"
        rows.append({"gate": gate, "variant": variant, "value": value, "limit": limit, "passed": passed,
                     "message": f"{variant}: {figure} {shown} {relation} {gate} {limit:g}"})

    limits = [(name, getattr(gates, name)) for name in ("max_kld", "min_top1", "max_ppl_ratio") if getattr(gates, name) is not None]
    for gate, limit in limits:
        if not variants:
            add(gate, "(no quantized variant)", None, limit, False, "nothing quantized to measure:")
            continue
        for name, figures in variants.items():
            if gate == "max_kld":
                value = figures.get("all", {}).get("mean")
                add(gate, name, value, limit, value is not None and value <= limit, f"mean KLD vs {reference}")
            elif gate == "min_top1":
                value = figures.get("all", {}).get("top1")
                add(gate, name, value, limit, value is not None and value >= limit, f"top-1 agreement vs {reference}")
            else:
                ratios = {c: x for c, x in (figures.get("ppl_ratio") or {}).items() if x is not None}
                if not ratios:
                    add(gate, name, None, limit, False, f"perplexity ratio vs {reference}")
                    continue
                corpus, value = max(ratios.items(), key=lambda item: item[1])
                add(gate, name, value, limit, value <= limit, f"perplexity ratio vs {reference} on {corpus}")
    return rows


def failures(rows: list[dict]) -> list[str]:
    return [r["message"] for r in rows if not r["passed"]]
