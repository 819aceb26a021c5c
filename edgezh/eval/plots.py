"""PNG figures of the report (matplotlib, no display): perplexity per variant; file size vs KL divergence
(the quants' Pareto front)."""

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
    kld = results.get("kld") or {}
    if kld.get("variants"):
        from edgezh.eval.kld import chart_points

        chart = kld.get("chart") or chart_points(results)
        if chart["points"]:
            written.append(kld_figure(chart, folder / "kld.png"))
    return [f"{folder.name}/{name}" for name in written]


def perplexity_figure(ppl: dict[str, dict[str, float]], path: Path) -> str:
    """Bars per variant (one colour per corpus), each bar's value printed on it: variants of one model differ in
    the third or fourth digit, which a bar's height alone does not show."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    variants = list(ppl)
    corpora = sorted({c for v in ppl.values() for c in v})
    longest = max(len(v) for v in variants)
    tilt = longest * len(variants) > 48
    fig, ax = plt.subplots(figsize=(min(11.0, max(5.0, (0.9 + 0.5 * len(corpora)) * len(variants) + 1.5)), 3.9), dpi=110)
    width = 0.8 / max(1, len(corpora))
    values = [ppl[v].get(c) for v in variants for c in corpora if ppl[v].get(c) is not None]
    log = bool(values) and max(values) / max(min(values), 1e-9) > 20
    for i, corpus in enumerate(corpora):
        xs = [j + (i - (len(corpora) - 1) / 2) * width for j in range(len(variants))]
        ys = [ppl[v].get(corpus, math.nan) for v in variants]
        bars = ax.bar(xs, ys, width, label=corpus)
        ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7 if len(corpora) > 1 else 8, padding=2)
    ax.set_xticks(range(len(variants)), variants, rotation=25 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("perplexity" + (f" on {corpora[0]}" if len(corpora) == 1 else ""))
    if log:
        ax.set_yscale("log")
    elif values:
        ax.set_ylim(0, max(values) * 1.15)  # room for the value labels
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))  # 0, 2.5, 140,000
    ax.set_title("Perplexity per variant (lower is better)", fontsize=10)
    if len(corpora) > 1:
        ax.legend(fontsize=8, ncols=len(corpora), loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _short(value: float) -> str:
    """A figure for a chart label: 9.91, 36.0, 138.2, 1,382, 138,203 (no decimals past four digits)."""
    if value is None or math.isnan(value):
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


GROUP_STYLES = [("o", "tab:blue"), ("s", "tab:orange"), ("^", "tab:green"), ("D", "tab:red"), ("v", "tab:purple"),
                ("P", "tab:brown")]


def _size_unit(sizes: list[float]) -> tuple[float, str]:
    return (2**30, "GiB") if max(sizes) >= 2**30 else (2**20, "MiB")


def log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Tick values for a log axis over [lo, hi]: 1-2-5 steps, or decades when those are too many, or
    1…9 steps when the range is too narrow for three 1-2-5 ticks; never more than `most`."""
    def steps(mantissas, every=1):
        out = []
        for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            if exp % every:
                continue
            out += [m * 10.0**exp for m in mantissas if lo <= m * 10.0**exp <= hi]
        return out

    for ticks in (steps((1, 2, 5)), steps((1,)), steps((1,), 2), steps((1,), 3)):
        if len(ticks) <= most and len(ticks) >= 3:
            return ticks
    ticks = steps(range(1, 10))
    if 2 <= len(ticks) <= most:
        return ticks
    if len(ticks) > most:
        return ticks[:: math.ceil(len(ticks) / most)]
    return [lo, hi] if hi > lo else [lo]


def _tick_label(value: float) -> str:
    text = f"{value:.2g}"
    return text.replace("e-0", "e-").replace("e+0", "e")


def kld_figure(chart: dict, path: Path) -> str:
    """The size-vs-KLD chart (`size_kld_chart`) as a PNG."""
    plt = _pyplot()
    fig = size_kld_chart(chart)
    fig.savefig(path)
    plt.close(fig)
    return path.name


def size_kld_chart(chart: dict):
    """File size (x) against mean KLD vs the reference (y, log): one labelled point per quantized variant,
    a marker and colour per group, the Pareto front joined by a line, the reference's size as a dashed line
    (or a note, when it lies far to the right). `chart` is what `edgezh.eval.kld.chart_points` returns (kept
    in the results as `kld.chart`). Returns the matplotlib figure."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    plt = _pyplot()
    points = chart["points"]
    ref = chart.get("reference") or {}
    sizes = [p["bytes"] for p in points]
    # the reference's size as a line when it does not squeeze the points into a corner, else in the legend only
    ref_on_chart = bool(ref.get("bytes")) and (ref["bytes"] - min(sizes)) <= 1.6 * max(max(sizes) - min(sizes), 0.05 * max(sizes))
    scale, unit = _size_unit(sizes + ([ref["bytes"]] if ref.get("bytes") else []))
    if ref_on_chart:
        sizes.append(ref["bytes"])
    floor = min((p["mean_kld"] for p in points if p["mean_kld"] > 0), default=1e-6) / 10
    ys = {p["variant"]: max(p["mean_kld"], floor) for p in points}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)

    groups = list(dict.fromkeys(p.get("group") for p in points))
    for index, group in enumerate(groups):
        marker, colour = GROUP_STYLES[index % len(GROUP_STYLES)]
        members = [p for p in points if p.get("group") == group]
        label = group if len(groups) > 1 and group is not None else "quantized GGUF" + (f" ({group})" if group not in (None, "plain") else "")
        ax.scatter([p["bytes"] / scale for p in members], [ys[p["variant"]] for p in members], marker=marker,
                   color=colour, s=46, zorder=3, label=label, edgecolors="black", linewidths=0.5)
    front = [p for p in points if p.get("pareto")]
    if len(front) > 1:
        ax.plot([p["bytes"] / scale for p in front], [ys[p["variant"]] for p in front], color="0.35", lw=1.2,
                ls="-", zorder=2, label="Pareto front")

    lo, hi = min(ys.values()), max(ys.values())
    ymin, ymax = lo / 2.2, hi * 2.2
    ax.set_yscale("log")
    ax.set_ylim(ymin, ymax)
    ticks = log_ticks(ymin, ymax)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_label(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())

    xmin, xmax = min(sizes) / scale, max(sizes) / scale
    span = (xmax - xmin) or xmax or 1.0
    ax.set_xlim(max(0.0, xmin - 0.12 * span), xmax + 0.22 * span)
    if ref_on_chart:
        ax.axvline(ref["bytes"] / scale, color="0.5", ls="--", lw=1, zorder=1, label=f"{ref['variant']} (reference, KLD 0)")
    elif ref.get("bytes"):  # far to the right: a note instead of a line that would squeeze the points
        ax.text(0.99, 0.02, f"{ref['variant']} (reference, KLD 0): {ref['bytes'] / scale:,.1f} {unit} →",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.35")

    ax.set_xlabel(f"file size ({unit})")
    ax.set_ylabel("mean KL divergence (nats/token)")
    ax.set_title(f"Size vs KL divergence from {ref.get('variant') or 'the reference'}\n"
                 "(lower left is better; the line joins the Pareto front)", fontsize=10)
    ax.grid(which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    _label_points(ax, fig, [(p["variant"], p["bytes"] / scale, ys[p["variant"]]) for p in points])
    return fig


# where a point's label may go, in offset points from the point, tried in this order
_LABEL_SPOTS = [(6, 3, "left", "bottom"), (6, -3, "left", "top"), (-6, 3, "right", "bottom"), (-6, -3, "right", "top"),
                (14, 12, "left", "bottom"), (14, -12, "left", "top"), (-14, 12, "right", "bottom"), (-14, -12, "right", "top"),
                (24, 22, "left", "bottom"), (24, -22, "left", "top"), (-24, 22, "right", "bottom"), (-24, -22, "right", "top"),
                (34, 34, "left", "bottom"), (34, -34, "left", "top")]


def _label_points(ax, fig, labelled: list[tuple[str, float, float]]) -> None:
    """Each point's name beside it, at the first spot where it covers no other label, no point and not the legend,
    and stays inside the axes; a label placed away from its point gets a thin leader line."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for _, x, y in labelled]
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    for name, x, y in sorted(labelled, key=lambda item: (item[1], -item[2])):
        own = ax.transData.transform((x, y))
        chosen = None
        for dx, dy, ha, va in _LABEL_SPOTS:
            far = abs(dx) > 6
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha, va=va,
                               arrowprops={"arrowstyle": "-", "color": "0.3", "lw": 0.7, "shrinkA": 1, "shrinkB": 4}
                               if far else None)
            box = text.get_window_extent(renderer).expanded(1.06, 1.15)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            clear = not any(box.overlaps(other) for other in taken) and not any(
                box.x0 - 4 <= px <= box.x1 + 4 and box.y0 - 4 <= py <= box.y1 + 4 for px, py in dots)
            # the label's near end (where a reader looks for its point) is closest to its own point
            end = (box.x0 if ha == "left" else box.x1, box.y0 if va == "bottom" else box.y1)
            mine = (end[0] - own[0]) ** 2 + (end[1] - own[1]) ** 2
            nearest = all(mine <= (end[0] - px) ** 2 + (end[1] - py) ** 2 for px, py in dots)
            if inside and clear and (nearest or far):
                chosen = box
                break
            text.remove()
        if chosen is None:  # nowhere free: the first spot, overlaps and all
            dx, dy, ha, va = _LABEL_SPOTS[0]
            chosen = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=ha,
                                 va=va).get_window_extent(renderer)
        taken.append(chosen)
