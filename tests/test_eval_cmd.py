"""`edgezh eval` on real GGUFs: tiny Llama 3 as F16 (the reference), q8_0, q4_k_m and q4_k_m with an importance
matrix (llama.cpp's own quantizer); the report's sections, results.json, the compact table, the size-vs-KLD chart,
a build folder evaluated alone (the same figures as the files), and bad inputs as one-line errors naming the path."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, TINY_RECIPE
from edgezh.commands.eval import add_eval_parser, eval_cmd, format_table, summary_rows
from edgezh.errors import UserError
from edgezh.eval import kld, plots, report
from test_runtime_fixtures import tiny_gguf  # noqa: F401  (fixture)

SMALL = ["--tokens", "300", "--context", "96", "--stride", "48", "--replies", "2", "--reply-tokens", "4", "--threads", "1"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgezh")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _eval(*argv: str) -> int:
    return eval_cmd(_parse(*argv))


def _ones_imatrix(ggufs: Path) -> dict[str, np.ndarray]:
    """Uniform importance for every block weight of the tiny model (hidden 256, FFN 512)."""
    columns = {"attn_q": 256, "attn_k": 256, "attn_v": 256, "attn_output": 256, "ffn_gate": 256, "ffn_up": 256, "ffn_down": 512}
    return {f"blk.{b}.{name}.weight": np.ones(n, np.float32) for b in range(2) for name, n in columns.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_gguf: Path) -> dict[str, Path]:  # noqa: F811
    from edgezh.export.quantize import quantize

    folder = tmp_path_factory.mktemp("eval-cmd")
    out = {"f16": folder / "tiny-f16.gguf"}
    shutil.copyfile(tiny_gguf, out["f16"])
    for kind in ("q8_0", "q4_k_m"):
        out[kind] = folder / f"tiny-{kind}.gguf"
        quantize(out["f16"], out[kind], kind, threads=2)
    out["imat"] = folder / "tiny-q4_k_m-imat.gguf"
    quantize(out["f16"], out["imat"], "q4_k_m", threads=2, imatrix=_ones_imatrix(out["f16"]),
             imatrix_meta={"file": "ones.imatrix.gguf", "dataset": "uniform"})
    return out


@pytest.fixture(scope="module")
def evaluated(files, tmp_path_factory) -> dict:
    """One `edgezh eval` of three quants against the F16, with its output read at once."""
    out = tmp_path_factory.mktemp("eval-out") / "report"
    import io  # capsys is function-scoped: the command's console prints into a buffer instead

    from edgezh import progress

    buffer = io.StringIO()
    saved = progress.out._file  # None: the console follows sys.stdout (the `file` property would pin today's stream)
    progress.out.file = buffer
    try:
        rc = _eval(str(files["q8_0"]), str(files["q4_k_m"]), str(files["imat"]), "--reference", str(files["f16"]),
                   "--corpus", "hsk", *SMALL, "-o", str(out))
    finally:
        progress.out._file = saved
    return {"rc": rc, "out": out, "stdout": buffer.getvalue(), "report": (out / "report.md").read_text(encoding="utf-8"),
            "results": json.loads((out / "results.json").read_text(encoding="utf-8"))}


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


# --- files against a reference ------------------------------------------------------------------------


def test_report_has_the_build_reports_sections(evaluated) -> None:
    assert evaluated["rc"] == 0
    text, r = evaluated["report"], evaluated["results"]
    assert text.startswith("# tiny: quality of 4 GGUF file(s)\n")
    titles = ["Files", "Perplexity", "KL divergence", "Chinese-reply rate", "Plots"]
    positions = [text.index(f"\n## {t}") for t in titles]
    assert positions == sorted(positions)
    # each section is exactly what the build's report renders from the same results
    for title, render in (("Perplexity", report._perplexity), ("KL divergence", report._kld), ("Chinese-reply rate", report._replies)):
        assert "\n".join(render(r)).strip() in text, title
    assert "the reference's own vocabulary (`tiny-f16.gguf`, llama.cpp)" in _section(text, "Perplexity")
    for name in ("perplexity", "kld"):
        assert f"![{name}](report/{name}.png)" in text
        assert (evaluated["out"] / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_hold_every_figure_and_the_chart(evaluated, files) -> None:
    r = evaluated["results"]
    assert list(r["variants"]) == ["tiny-f16", "tiny-q8_0", "tiny-q4_k_m", "tiny-q4_k_m-imat"]
    assert r["kld"]["reference"] == "tiny-f16" and set(r["kld"]["variants"]) == {"tiny-q8_0", "tiny-q4_k_m", "tiny-q4_k_m-imat"}
    assert r["corpora"]["hsk"]["tokens"] == 300 and set(r["perplexity"]) == set(r["variants"])
    v = r["kld"]["variants"]
    assert 0 < v["tiny-q8_0"]["all"]["mean"] < v["tiny-q4_k_m"]["all"]["mean"]
    assert v["tiny-q8_0"]["all"]["top1"] > v["tiny-q4_k_m"]["all"]["top1"]
    assert set(r["chinese_reply"]["by_variant"]) == set(r["variants"]) and r["chinese_reply"]["prompts"] == 2
    for name, kind in (("tiny-f16", "f16"), ("tiny-q8_0", "q8_0"), ("tiny-q4_k_m-imat", "imat")):
        assert r["variants"][name]["bytes"] == files[kind].stat().st_size
    from edgezh.export.quantize import describe

    assert r["variants"]["tiny-q4_k_m"]["bits_per_weight"] == describe(files["q4_k_m"])["bits_per_weight"]
    chart = r["kld"]["chart"]
    assert chart["reference"] == {"variant": "tiny-f16", "bytes": files["f16"].stat().st_size}
    points = {p["variant"]: p for p in chart["points"]}
    assert set(points) == set(v) and [p["bytes"] for p in chart["points"]] == sorted(p["bytes"] for p in chart["points"])
    assert points["tiny-q4_k_m-imat"]["group"] == "imatrix" and points["tiny-q8_0"]["group"] == "plain"
    assert points["tiny-q8_0"]["mean_kld"] == v["tiny-q8_0"]["all"]["mean"]
    assert [p["pareto"] for p in chart["points"]] == kld.pareto([(p["bytes"], p["mean_kld"]) for p in chart["points"]])
    assert points["tiny-q8_0"]["pareto"]  # the closest to the reference is always on the front


def test_console_table(evaluated) -> None:
    r, stdout = evaluated["results"], evaluated["stdout"]
    header, rows = summary_rows(r)
    assert header == ["model", "size MiB", "PPL hsk", "mean KLD", "top-1", "Chinese"]
    assert format_table(header, rows) in stdout
    assert rows[0][0] == "tiny-f16 (ref)" and rows[0][3:5] == ["0", "100%"]
    q8 = next(row for row in rows if row[0].startswith("tiny-q8_0"))
    assert q8[0] == "tiny-q8_0 *" and q8[3] == f"{r['kld']['variants']['tiny-q8_0']['all']['mean']:.5f}"
    assert f"report: {evaluated['out'] / 'report.md'}" in stdout


def test_a_second_run_replaces_the_output_and_a_foreign_folder_is_refused(evaluated, files, tmp_path) -> None:
    out = evaluated["out"]
    assert _eval(str(files["q8_0"]), "--reference", str(files["f16"]), *SMALL, "--replies", "0", "-o", str(out)) == 0
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(again["kld"]["variants"]) == {"tiny-q8_0"} and not again["chinese_reply"]["by_variant"]
    assert again["kld"]["variants"]["tiny-q8_0"]["all"] == evaluated["results"]["kld"]["variants"]["tiny-q8_0"]["all"]
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("*.old"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=f"{re.escape(str(foreign))}: exists and is not an edgezh eval output"):
        _eval(str(files["q8_0"]), "--reference", str(files["f16"]), *SMALL, "-o", str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_text_file_and_prompts_file(files, tmp_path, peoples_daily) -> None:
    text = tmp_path / "news.txt"
    text.write_text(peoples_daily[:2000], encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"你好，请介绍一下北京。"\n{"prompt": "今天天气怎么样？"}\n'
                       '{"messages": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "讲个笑话。"}]}\n',
                       encoding="utf-8")
    out = tmp_path / "out"
    assert _eval(str(files["q8_0"]), "--reference", str(files["f16"]), "--text", str(text), "--prompts", str(prompts),
                 *SMALL[:6], "--replies", "5", "--reply-tokens", "3", "--threads", "1", "-o", str(out)) == 0
    r = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(r["corpora"]) == ["news.txt"] and r["corpora"]["news.txt"]["tokens"] == 300
    assert r["chinese_reply"]["prompts"] == 3 and str(prompts) in r["chinese_reply"]["source"]


# --- a build folder -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """The tiny-llama3 recipe built up to its quants (the eval-report tests' cached fixture), copied here."""
    from edgezh.pipeline import build_lock, make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    plan = make_plan(load_recipe(TINY_RECIPE, [f"output.root={FIXTURES / 'eval-export'}"]))
    with build_lock(plan.root):
        run_plan(plan)
    root = tmp_path_factory.mktemp("eval-cmd-build") / "tiny-llama3"
    shutil.copytree(plan.root, root, ignore=shutil.ignore_patterns("build.log", ".lock", "*.tmp", "export"))
    return root


def test_a_build_alone_gives_the_same_figures_as_its_files(build, tmp_path) -> None:
    assert _eval(str(build), *SMALL) == 0
    r = json.loads((build / "eval-report" / "results.json").read_text(encoding="utf-8"))
    assert r["name"] == "tiny-llama3" and r["kld"]["reference"] == "f16"
    assert set(r["variants"]) == {"f16", "q4_k_m", "q8_0"} and all(v["engine"] == "llama.cpp" for v in r["variants"].values())
    assert r["variants"]["q8_0"]["group"] == "plain"
    assert (build / "eval-report" / "report.md").read_text(encoding="utf-8").startswith("# tiny-llama3: quality of 3 GGUF file(s)")
    # the same files given one by one: llama.cpp's vocabulary tokenizes as the base's HF tokenizer does
    quants = json.loads(next(build.glob("*-quantize/manifest.json")).read_text(encoding="utf-8"))["info"]["quants"]
    f16 = next(build.glob("*-gguf/*.gguf"))
    q8 = next(build.glob("*-quantize")) / quants["q8_0"]["file"]
    assert _eval(str(q8), "--reference", str(f16), *SMALL, "-o", str(tmp_path / "files")) == 0
    files = json.loads((tmp_path / "files" / "results.json").read_text(encoding="utf-8"))
    ours, theirs = files["kld"]["variants"][q8.name.removesuffix(".gguf")]["all"], r["kld"]["variants"]["q8_0"]["all"]
    assert ours["tokens"] == theirs["tokens"] == 300
    assert ours["mean"] == pytest.approx(theirs["mean"], rel=1e-6) and ours["top1"] == theirs["top1"]
    assert files["perplexity"][f16.name.removesuffix(".gguf")]["hsk"] == pytest.approx(r["perplexity"]["f16"]["hsk"], rel=1e-9)


# --- bad inputs -------------------------------------------------------------------------------------------


def test_bad_inputs_are_user_errors_naming_the_path(files, tmp_path) -> None:
    ref = str(files["f16"])
    missing = tmp_path / "nope.gguf"
    with pytest.raises(UserError, match=f"{re.escape(str(missing))}: no such GGUF file"):
        _eval(str(missing), "--reference", ref)
    with pytest.raises(UserError, match=f"{re.escape(str(missing))}: no such reference GGUF"):
        _eval(str(files["q8_0"]), "--reference", str(missing))
    text = tmp_path / "fake.gguf"
    text.write_text("not a model")
    with pytest.raises(UserError, match=f"{re.escape(str(text))}: not a GGUF file"):
        _eval(str(text), "--reference", ref)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["q8_0"].read_bytes()[: 8 << 20])
    with pytest.raises(UserError, match=f"{re.escape(str(cut))}: corrupt or truncated GGUF"):
        _eval(str(cut), "--reference", ref)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}: a folder"):
        _eval(str(files["q8_0"]), str(tmp_path), "--reference", ref)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}: a folder but not an edgezh build"):
        _eval(str(tmp_path))
    with pytest.raises(UserError, match="--reference F16.gguf is needed"):
        _eval(str(files["q8_0"]))
    with pytest.raises(UserError, match="nothing to compare"):
        _eval(ref, "--reference", ref)
    with pytest.raises(UserError, match="stride .* must be smaller than context_length"):
        _eval(str(files["q8_0"]), "--reference", ref, "--context", "64", "--stride", "64")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"好"\n{"answer": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"{re.escape(str(bad))}:2: not a prompt"):
        _eval(str(files["q8_0"]), "--reference", ref, *SMALL, "--prompts", str(bad), "-o", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_vocabulary_mismatch_names_the_file(files, smollm2_gguf: Path) -> None:
    with pytest.raises(UserError, match=rf"{re.escape(str(smollm2_gguf))}: its vocabulary has 49152 tokens, the reference "
                                        rf"{re.escape(str(files['f16']))} has 128256"):
        _eval(str(smollm2_gguf), "--reference", str(files["f16"]))


# --- the chart --------------------------------------------------------------------------------------------


def _chart(points: dict[str, tuple[float, float, str | None]], reference_bytes: float) -> dict:
    r = {"kld": {"reference": "f16", "variants": {}}, "variants": {"f16": {"bytes": int(reference_bytes)}}}
    for name, (size, mean, group) in points.items():
        r["variants"][name] = {"bytes": int(size), "group": group}
        r["kld"]["variants"][name] = {"all": {"tokens": 100, "mean": mean, "p99": mean * 5, "top1": 0.9}}
    return kld.chart_points(r)


def test_pareto_front() -> None:
    assert kld.pareto([(1, 5.0), (2, 3.0), (2, 4.0), (3, 3.0), (4, 1.0)]) == [True, True, False, False, True]
    assert kld.pareto([(1, 1.0), (1, 1.0)]) == [True, True]  # equal points do not dominate each other


@pytest.mark.parametrize("lo,hi", [(1e-6, 2.0), (0.014, 0.08), (0.0005, 0.002), (0.3, 0.31), (1e-5, 1e-5 * 1.2)])
def test_log_ticks_are_few_and_inside_the_range(lo, hi) -> None:
    ticks = plots.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 8 or (len(ticks) == 1 and hi == lo)
    assert all(lo <= t <= hi for t in ticks) and ticks == sorted(set(ticks))


def _boxes_overlap(boxes) -> list:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


@pytest.mark.parametrize("spread", ["many", "narrow"])
def test_chart_labels_and_ticks_do_not_overlap(spread) -> None:
    if spread == "many":  # llama.cpp's usual ladder for an 8B model, plain and imatrix
        points = {"q2_k": (3.2e9, 0.52, "plain"), "q3_k_m": (4.0e9, 0.21, "plain"), "q3_k_m-imat": (4.0e9, 0.16, "imatrix"),
                  "q4_0": (4.7e9, 0.12, "plain"), "q4_k_s": (4.6e9, 0.09, "plain"), "q4_k_m": (4.9e9, 0.071, "plain"),
                  "q4_k_m-imat": (4.9e9, 0.055, "imatrix"), "q5_k_m": (5.7e9, 0.031, "plain"), "q6_k": (6.6e9, 0.012, "plain"),
                  "q8_0": (8.5e9, 0.0031, "plain")}
        reference = 16e9
    else:
        points = {"q4_k_m": (53.9e6, 0.00146, None), "q8_0": (78.8e6, 1.5e-5, None)}
        reference = 141.5e6
    fig = plots.size_kld_chart(_chart(points, reference))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        ticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text() and t.get_visible()]
        assert len(ticks) >= 2 and not _boxes_overlap(ticks)
        labels = [t for t in ax.texts if t.get_text() in points]
        assert sorted(t.get_text() for t in labels) == sorted(points)
        assert not _boxes_overlap([t.get_window_extent(renderer) for t in labels])
        frame = ax.get_window_extent(renderer)
        assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in (t.get_window_extent(renderer) for t in labels))
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert ("imatrix" in legend and "plain" in legend) if spread == "many" else "quantized GGUF" in legend
        assert "Pareto front" in legend
        title = ax.title.get_window_extent(renderer)
        assert title.y0 >= frame.y1 - 1  # the title sits above the plot, over nothing
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
