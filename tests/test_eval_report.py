"""The eval stage in a real build: the tiny-llama3 recipe (base → gguf → quantize → modelfile) plus `eval`,
its report at builds/<name>/report.md, the figures in the manifest, and a gate that fails the build."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, QUICKSTART, TINY_RECIPE
from edgezh.cli import main
from edgezh.eval.report import SECTIONS
from edgezh.stages import folder_name

EVAL = ["eval.texts=[hsk]", "eval.max_tokens=300", "eval.context_length=96", "eval.stride=48",
        "eval.multiple_choice=[{builtin: hsk-translate, max_questions: 2, shots: [0, 5]}]", "eval.mc_max_length=512",
        "eval.chinese_reply_prompts=3", "eval.reply_max_tokens=6"]


QUICK = ["eval.multiple_choice=[]", "eval.chinese_reply_prompts=0"]  # gate runs: perplexity and KLD only


def _build(root: Path, *extra: str) -> int:
    return main(["build", str(TINY_RECIPE), f"output.root={root}", *EVAL, *extra])


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The tiny-llama3 recipe built up to its Modelfiles by the pipeline, cached in the fixture folder like
    the other fixtures, then copied here: the build below finds those stages cached and runs `eval`."""
    from edgezh.pipeline import build_lock, make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    plan = make_plan(load_recipe(TINY_RECIPE, [f"output.root={FIXTURES / 'eval-export'}"]))
    with build_lock(plan.root):
        run_plan(plan)
    root = tmp_path_factory.mktemp("eval-build")
    shutil.copytree(plan.root, root / "tiny-llama3", copy_function=_link_or_copy,
                    ignore=shutil.ignore_patterns("build.log", ".lock", "*.tmp", "export"))
    return root


@pytest.fixture(scope="module")
def built(exported: Path) -> dict:
    """The build, and what it wrote read at once (the gate test rewrites the build root later)."""
    root = exported
    assert _build(root) == 0
    build = root / "tiny-llama3"
    eval_dir = build / folder_name("eval")
    return {
        "build": build,
        "report": (build / "report.md").read_text(encoding="utf-8"),
        "artifact_report": (eval_dir / "report.md").read_text(encoding="utf-8"),
        "manifest": json.loads((eval_dir / "manifest.json").read_text(encoding="utf-8")),
        "results": json.loads((build / "report" / "results.json").read_text(encoding="utf-8")),
        "quantize": json.loads((build / folder_name("quantize") / "manifest.json").read_text(encoding="utf-8")),
        "gguf": json.loads((build / folder_name("gguf") / "manifest.json").read_text(encoding="utf-8")),
        "modelfile": json.loads((build / folder_name("modelfile") / "manifest.json").read_text(encoding="utf-8")),
    }


def _section(report: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", report, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_report_has_every_section_in_reading_order(built) -> None:
    report = built["report"]
    assert report == built["artifact_report"]  # the build root's copy is the artifact's report
    assert report.startswith("# tiny-llama3: quality report")
    positions = [report.index(f"\n## {title}") for title in SECTIONS]
    assert positions == sorted(positions)
    assert f"edgezh chat {built['build']}" in report


def test_what_was_built_names_hashes_sizes_and_bits_per_weight(built) -> None:
    text = _section(built["report"], "What was built")
    assert f"`{built['gguf']['hash'][:12]}`" in text and f"`{built['quantize']['hash'][:12]}`" in text
    for kind, q in built["quantize"]["info"]["quants"].items():
        assert re.search(rf"^\| {kind} \| llama\.cpp \| `tiny-llama3-{kind}\.gguf` \| {q['bytes'] / 2**20:,.1f} MiB \| {q['bits_per_weight']:g} \|$",
                         text, re.M), kind
    assert '"outtype": "f16"' in text and '"quantize": [' in text  # the recipe sections, from the manifests


def test_tables_hold_the_manifest_figures(built) -> None:
    info = built["manifest"]["info"]
    report = built["report"]
    ppl = info["perplexity"]
    assert set(ppl) == {"base", "f16", "q4_k_m", "q8_0"}
    # transformers (float32) and the F16 GGUF read the same 300 tokens: nearly the same perplexity
    assert info["corpora"]["hsk"]["tokens"] == 300 and abs(ppl["f16"]["hsk"] / ppl["base"]["hsk"] - 1) < 0.01
    rows = _section(report, "Perplexity")
    for name, values in ppl.items():
        assert re.search(rf"^\| {name} \| \S+ \| {values['hsk']:,.3f} \|$", rows, re.M), name
    kld = info["kld"]
    assert kld["reference"] == "f16" and set(kld["variants"]) == {"q4_k_m", "q8_0"}
    assert kld["variants"]["q8_0"]["all"]["mean"] < kld["variants"]["q4_k_m"]["all"]["mean"]
    kld_text = _section(report, "KL divergence")
    for name, v in kld["variants"].items():
        assert f"| {name} |" in kld_text and f"{v['all']['mean']:.5f}" in kld_text and f"{v['all']['top1']:.2%}" in kld_text
    mc = info["multiple_choice"]
    assert [(m["set"], m["shots"], m["questions"]) for m in mc] == [("hsk-translate", 0, 12), ("hsk-translate", 5, 12)]
    assert set(mc[1]["by_variant"]) == set(ppl)
    mc_text = _section(report, "Multiple choice")
    assert "### hsk-translate, 5-shot (12 questions)" in mc_text and "| variant | overall | hsk1 |" in mc_text
    replies = info["chinese_reply"]
    assert replies["prompts"] == 3 and set(replies["by_variant"]) == set(ppl)
    assert "HSK sentences" in replies["source"]  # no data stage: the fallback prompts, said so
    assert set(info["speed"]) == {"f16", "q4_k_m", "q8_0"} and all(v["gen_tps"] > 0 for v in info["speed"].values())
    assert "`heldout`" not in report and built["results"]["perplexity"] == ppl


def test_plots_and_commands(built) -> None:
    report, build = built["report"], built["build"]
    for name in ("perplexity", "kld"):
        assert f"![{name}](report/{name}.png)" in report
        assert (build / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "No training plots in this build." in _section(report, "Training curves")
    run = _section(report, "Run it")
    for kind, model in built["modelfile"]["info"]["models"].items():
        assert f"ollama create {model} -f {build / 'export' / f'Modelfile.{kind}'}\nollama run {model}" in run


def test_impossible_gate_fails_the_build_and_keeps_the_report(built, capsys) -> None:
    build = built["build"]
    assert _build(build.parent, *QUICK, "eval.gates.max_kld=1e-12") == 2
    err = capsys.readouterr().err
    assert "eval gate failed (2)" in err and re.search(r"q4_k_m: mean KLD vs f16 [\d.e-]+ exceeds max_kld 1e-12", err)
    assert f"{build / 'report.md'}" in err.replace("\n", "")
    report = (build / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# tiny-llama3: quality report\n\n**Gates: FAILED** (2)")
    assert re.search(r"^\| max_kld \| q8_0 \| [\d.e-]+ \| 1e-12 \| \*\*FAIL\*\* \|$", _section(report, "Gates"), re.M)
    gates = json.loads((build / "report" / "results.json").read_text(encoding="utf-8"))["gates"]
    assert {g["variant"] for g in gates if not g["passed"]} == {"q4_k_m", "q8_0"}
    assert not (build / folder_name("eval")).exists() and not (build / (folder_name("eval") + ".tmp")).exists()
    # relaxing the gate evaluates again (nothing stale is cached) and the root report passes
    assert _build(build.parent, *QUICK, "eval.gates.max_kld=10") == 0
    report = (build / "report.md").read_text(encoding="utf-8")
    assert "**Gates: passed** (max_kld)" in report and "FAIL" not in report


# ---------------------------------------------------------------- the quickstart, end to end

QUICKSTART_SMALL = ["data.sources.0.samples=80", "data.sources.1.samples=30", "sft.max_steps=2", "sft.save_steps=2",
                    "dpo.max_steps=2", "dpo.save_steps=2", "export.gptq.samples=4", "eval.max_tokens=256",
                    "eval.context_length=128", "eval.stride=96", "eval.chinese_reply_prompts=2", "eval.reply_max_tokens=6",
                    "eval.multiple_choice=[{builtin: hsk-translate, max_questions: 2}]", "export.gguf.imatrix.tokens=1024"]
QUICKSTART_VARIANTS = {"base", "sft", "dpo", "f16", "q4_k_m", "q8_0", "q4_k_m-plain", "gptq", "base-f16+lora", "base-q4_k_m+lora"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> dict:
    """recipes/quickstart.yaml built whole by `edgezh build` (every stage, real SmolLM2 weights), with fewer
    examples, steps and eval tokens than the shipped recipe so that it fits in the test suite."""
    root = tmp_path_factory.mktemp("quickstart")
    assert main(["build", str(QUICKSTART), f"output.root={root}", *QUICKSTART_SMALL]) == 0
    build = root / "quickstart"
    return {"build": build, "root": root, "report": (build / "report.md").read_text(encoding="utf-8"),
            "info": json.loads((build / folder_name("eval") / "manifest.json").read_text(encoding="utf-8"))["info"],
            "modelfile": json.loads((build / folder_name("modelfile") / "manifest.json").read_text(encoding="utf-8"))["info"]}


def test_quickstart_report_has_every_section_with_every_variant(quickstart) -> None:
    report, info, build = quickstart["report"], quickstart["info"], quickstart["build"]
    assert report.startswith("# quickstart: quality report\n")
    positions = [report.index(f"\n## {title}") for title in SECTIONS]
    assert positions == sorted(positions)

    built = _section(report, "What was built")
    for folder in map(folder_name, ("base", "data", "sft", "dpo", "merge", "gguf", "imatrix", "quantize", "gptq", "adapter",
                                    "modelfile")):
        assert f"| `{folder}` |" in built, folder
    assert "group_size=64" in built

    ppl = info["perplexity"]
    assert set(ppl) == QUICKSTART_VARIANTS and set(info["variants"]) == QUICKSTART_VARIANTS
    ppl_text = _section(report, "Perplexity")
    for name, values in ppl.items():
        assert re.search(rf"^\| {re.escape(name)} \| \S+ \| {values['heldout']:,.3f} \| {values['peoples-daily']:,.3f} \|$", ppl_text, re.M), name
    assert set(info["kld"]["variants"]) == {"q4_k_m", "q8_0", "q4_k_m-plain", "gptq", "base-f16+lora", "base-q4_k_m+lora"}
    kld_text = _section(report, "KL divergence")
    assert all(f"| {name} |" in kld_text for name in info["kld"]["variants"])
    assert "### LoRA adapter on the base\n\n`quickstart-lora-f16.gguf`" in kld_text  # base + adapter vs the merged f16
    assert [set(m["by_variant"]) for m in info["multiple_choice"]] == [QUICKSTART_VARIANTS]
    assert "### hsk-translate, 0-shot" in _section(report, "Multiple choice")
    replies = info["chinese_reply"]
    assert set(replies["by_variant"]) == QUICKSTART_VARIANTS and "02-data/eval.jsonl" in replies["source"]
    reply_text = _section(report, "Chinese-reply rate")
    assert all(f"| {name} | {v['rate']:.1%} |" in reply_text for name, v in replies["by_variant"].items())
    assert set(info["speed"]) == {"f16", "q4_k_m", "q8_0", "base-f16+lora", "base-q4_k_m+lora"}
    assert all(f"| {name} |" in _section(report, "Speed on this machine") for name in info["speed"])

    curves = _section(report, "Training curves")
    for name in ("sft-loss", "sft-learning_rate", "dpo-loss", "dpo-rewards", "dpo-reward_accuracy", "perplexity", "kld"):
        assert f"report/{name}.png" in report
        assert (build / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "sft-loss" in curves and "dpo-reward_accuracy" in curves
    run = _section(report, "Run it")
    assert set(quickstart["modelfile"]["models"]) == {"f16", "q4_k_m", "q8_0", "lora-f16", "lora-q4_k_m"}
    for kind, model in quickstart["modelfile"]["models"].items():
        assert f"ollama create {model} -f {build / 'export' / f'Modelfile.{kind}'}\nollama run {model}" in run
    assert f"edgezh chat {build}" in run
    assert json.loads((build / "report" / "results.json").read_text(encoding="utf-8"))["perplexity"] == ppl


def test_quickstart_with_an_impossible_gate_fails_and_keeps_its_report(quickstart, capsys) -> None:
    build = quickstart["build"]
    gate = ["eval.gates.min_top1=1.0", "eval.multiple_choice=[]", "eval.chinese_reply_prompts=0"]
    assert main(["build", str(QUICKSTART), f"output.root={quickstart['root']}", *QUICKSTART_SMALL, *gate]) == 2
    err = capsys.readouterr().err
    assert re.search(r"gptq: top-1 agreement vs f16 0\.\d+ below min_top1 1\b", err), err[-2000:]
    report = (build / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# quickstart: quality report\n\n**Gates: FAILED**")
    assert "## Perplexity" in report and not (build / folder_name("eval")).exists()
