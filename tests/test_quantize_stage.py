"""Chinese-calibrated quantization in a build: the imatrix stage, quantize with it (and a plain twin),
IQ types, per-tensor types and `fit`, on the tiny Llama 3 (real tokenizer, 256-wide rows), through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from edgezh.stages import folder_name

from conftest import run_cli

RECIPE = """\
name: tq
base:
  init: {hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, seed: 0}
  tokenizer: llama3
  template: llama3
export:
  gguf:
    outtype: f16
    quantize: [q4_k_m, iq4_xs, iq3_m]
    plain: [q4_k_m]
    imatrix: {text: [peoples-daily], tokens: 1024, chunk_size: 256}
    tensor_types:
      - {pattern: ffn_down, type: q8_0}
    fit: {budget: 80MB, tokens: 256, max_scored: 2, candidates: [q4_k_m, q6_k, iq4_xs]}
modelfile: {num_ctx: 2048}
eval: {texts: [hsk], context_length: 128, stride: 96, max_tokens: 256, chinese_reply_prompts: 0}
"""


def manifest(build: Path, folder: str) -> dict:
    return json.loads((build / folder / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tq")
    (root / "r.yaml").write_text(RECIPE, encoding="utf-8")
    result = run_cli("build", "r.yaml", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "builds" / "tq"


def test_report_compares_imatrix_with_plain_and_shows_the_fit(build: Path) -> None:
    report = (build / "report.md").read_text(encoding="utf-8")
    info = manifest(build, folder_name("eval"))["info"]
    plain, with_matrix = info["kld"]["variants"]["q4_k_m-plain"]["all"], info["kld"]["variants"]["q4_k_m"]["all"]
    section = report[report.index("### Importance matrix"):report.index("### Fit to a size budget")]
    assert "`tq.imatrix.gguf`: 4 chunks of 256 tokens of peoples-daily, 15 weights" in section
    assert re.search(rf"^\| q4_k_m \| {plain['mean']:.5f} \| {with_matrix['mean']:.5f} \| "
                     rf"{with_matrix['mean'] / plain['mean']:.2f}× \|", section, re.M), section
    fit = manifest(build, folder_name("quantize"))["info"]["fit"]
    tail = report[report.index("### Fit to a size budget"):]
    assert f"Kept as `fit`: **{fit['chosen']['label']}**" in tail and "given as 80MB" in tail
    scored = [c for c in fit["candidates"] if c.get("kld") is not None]
    assert all(f"| {c['label']} |" in tail for c in scored)
    assert {"fit", "iq4_xs", "iq3_m", "q4_k_m", "q4_k_m-plain"} <= set(info["kld"]["variants"])
    points = {p["variant"]: p for p in info["kld"]["chart"]["points"]}
    assert points["q4_k_m"]["group"] == "imatrix" and points["q4_k_m-plain"]["group"] == "plain"
    assert (build / "report" / "kld.png").stat().st_size > 10_000


def test_imatrix_stage_writes_llama_cpp_imatrix_gguf(build: Path) -> None:
    from edgezh.export import imatrix

    info = manifest(build, folder_name("imatrix"))["info"]
    data = imatrix.read(build / folder_name("imatrix") / info["file"])
    assert info["file"] == "tq.imatrix.gguf" and data.datasets == ["peoples-daily"]
    # every linear layer of the 2 blocks (q k v o gate up down) and the untied head, by GGUF name
    expected = {f"blk.{i}.{t}.weight" for i in range(2) for t in
                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    assert set(data.sums) == expected and info["entries"] == 15
    assert data.chunk_count == info["chunk_count"] == 4 and data.chunk_size == 256  # 1024 tokens / 256
    assert all(float(c[0]) == 1024 for c in data.counts.values())


def test_quants_carry_the_imatrix_and_the_plain_twin_does_not(build: Path) -> None:
    from edgezh.export.quantize import describe

    quants = manifest(build, folder_name("quantize"))["info"]["quants"]
    assert set(quants) == {"q4_k_m", "iq4_xs", "iq3_m", "q4_k_m-plain", "fit"}
    with_matrix = describe(build / folder_name("quantize") / quants["q4_k_m"]["file"], "q4_k_m")
    assert with_matrix["imatrix"] == {"file": "tq.imatrix.gguf", "dataset": "peoples-daily", "entries_count": 15,
                                      "chunks_count": 4}
    plain = describe(build / folder_name("quantize") / quants["q4_k_m-plain"]["file"], "q4_k_m")
    assert "imatrix" not in plain and quants["q4_k_m-plain"]["imatrix"] is False and quants["q4_k_m"]["imatrix"] is True
    assert quants["q4_k_m-plain"]["file"] == "tq-q4_k_m-plain.gguf"


def test_tensor_types_reach_every_quant(build: Path) -> None:
    from gguf import GGUFReader

    for kind in ("q4_k_m", "iq4_xs", "q4_k_m-plain"):
        reader = GGUFReader(build / folder_name("quantize") / f"tq-{kind}.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert {types[f"blk.{i}.ffn_down.weight"] for i in range(2)} == {"Q8_0"}, kind
        assert types["blk.0.ffn_up.weight"] != "Q8_0"


@pytest.mark.parametrize("kind", ["iq4_xs", "iq3_m"])
def test_iq_types_load_in_llama_cpp_and_generate(build: Path, kind: str) -> None:
    import llama_cpp

    from edgezh.export.quantize import describe

    facts = describe(build / folder_name("quantize") / f"tq-{kind}.gguf", kind)
    main = "IQ4_XS" if kind == "iq4_xs" else "IQ3_S"
    assert main in facts["tensor_types"] and facts["fallback"] == []
    llm = llama_cpp.Llama(str(build / folder_name("quantize") / f"tq-{kind}.gguf"), n_ctx=128, verbose=False)
    out = llm.create_completion("你好", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0


def test_fit_keeps_the_lowest_kld_mix_that_fits(build: Path) -> None:
    info = manifest(build, folder_name("quantize"))["info"]
    fit = info["fit"]
    assert fit["budget"] == 80_000_000 and fit["text"]["tokens"] > 0
    candidates = fit["candidates"]
    assert {c["base"] for c in candidates} >= {"q4_k_m", "q6_k", "iq4_xs"}
    assert all(c["bytes"] > 0 for c in candidates)
    scored = [c for c in candidates if c.get("kld") is not None]
    assert len(scored) == 2 and all(c["bytes"] <= fit["budget"] and c["same_as"] is None for c in scored)
    chosen = fit["chosen"]
    assert chosen["kld"] == min(c["kld"] for c in scored)
    file = build / folder_name("quantize") / "tq-fit.gguf"
    assert file.stat().st_size == chosen["bytes"] == info["quants"]["fit"]["bytes"] <= fit["budget"]
    assert info["quants"]["fit"]["mix"] == chosen["label"]
    text = (build / "export" / "Modelfile.fit").read_text(encoding="utf-8")
    assert re.search(r"^FROM \./tq-fit\.gguf$", text, re.M)


def test_dry_run_sizes_are_the_real_sizes(build: Path) -> None:
    """Every candidate is sized by llama.cpp's dry run; the two that were written match to the byte."""
    info = manifest(build, folder_name("quantize"))["info"]
    sizes = {c["label"]: c["bytes"] for c in info["fit"]["candidates"]}
    assert sizes["q4_k_m+imatrix"] == info["quants"]["q4_k_m"]["bytes"]
    assert sizes["q4_k_m"] == info["quants"]["q4_k_m-plain"]["bytes"]


@pytest.mark.parametrize(("extra", "path", "message"), [
    ("export: {gguf: {quantize: [iq4_xs]}}", "export.gguf.quantize.0", "iq4_xs needs an importance matrix"),
    ("export: {gguf: {quantize: [q4_k_m], plain: [q4_k_m]}}", "export.gguf.plain.0", "needs export.gguf.imatrix"),
    ("export: {gguf: {quantize: [q4_k_m], output_type: iq4_nl}}", "export.gguf.output_type", "need an importance matrix"),
    ("export: {gguf: {quantize: [q4_k_m], imatrix: {text: [train]}}}", "export.gguf.imatrix.text", "add a `data` section"),
    ("export: {gguf: {fit: {budget: 3x}}}", "export.gguf.fit", "is not a size"),
    ("export: {gguf: {fit: {budget: 1GB, candidates: [iq3_m]}}}", "export.gguf.fit.candidates.0", "iq3_m needs an importance matrix"),
    ("export: {gguf: {quantize: [q4_k_m], tensor_types: [{pattern: '(', type: q8_0}]}}", "export.gguf.tensor_types.0.pattern",
     "not a regular expression"),
])
def test_recipe_refuses_before_anything_runs(tmp_path: Path, extra: str, path: str, message: str) -> None:
    (tmp_path / "r.yaml").write_text("name: bad\nbase: {init: {}, tokenizer: llama3}\n" + extra + "\n", encoding="utf-8")
    result = run_cli("build", "r.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert path in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "builds").exists()


def test_quantize_command_with_imatrix_and_refusal(build: Path, tmp_path: Path) -> None:
    source = build / folder_name("gguf") / "tq-f16.gguf"
    refused = run_cli("quantize", str(source), "iq4_xs", "-o", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 2 and "iq4_xs" in refused.stderr and "imatrix" in refused.stderr
    assert "Traceback" not in refused.stderr and not list(tmp_path.glob("*.gguf"))
    sized = run_cli("quantize", str(source), "iq4_xs", "--imatrix", str(build / folder_name("imatrix") / "tq.imatrix.gguf"),
                    "--tensor-type", "ffn_down=q8_0", "--dry-run", "-o", str(tmp_path), cwd=tmp_path)
    assert sized.returncode == 0, sized.stderr
    would = float(re.search(r"would be ([\d.]+) MiB", sized.stdout).group(1))
    assert not list(tmp_path.glob("*.gguf"))
    made = run_cli("quantize", str(source), "iq4_xs", "--imatrix", str(build / folder_name("imatrix") / "tq.imatrix.gguf"),
                   "--tensor-type", "ffn_down=q8_0", "-o", str(tmp_path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    written = tmp_path / "tq-iq4_xs.gguf"
    assert round(written.stat().st_size / 2**20, 1) == would
