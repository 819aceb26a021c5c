"""LoRA adapters as GGUF: the converter against llama.cpp's convert_lora_to_gguf.py, base + adapter in llama.cpp
against the merged model on Chinese text, several adapters with scales in one context, bad input, the recipe
section, the adapter stage with its ADAPTER Modelfiles and the report's base + adapter line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICKSTART, ROOT
from edgezh import templates
from edgezh.cli import main
from edgezh.errors import UserError
from edgezh.export import lora_gguf
from test_merge import load_base, save_adapter, small_llama, variant_configs

CHINESE_TOKENS = 1024  # the acceptance's minimum of scored Chinese tokens


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_adapters(tiny_llama3: Path, tmp_path_factory) -> dict[str, Path]:
    """peft adapters on the tiny Llama 3 with random (non-zero) factors: all-linear, rslora with rank/alpha
    patterns (llama.cpp's one alpha cannot say it: the ratio is folded into lora_b), embed_tokens + o_proj,
    and one with lm_head in modules_to_save."""
    root = tmp_path_factory.mktemp("lora-adapters")
    return {name: save_adapter(load_base(tiny_llama3), config, root / name, seed=i)
            for i, (name, config) in enumerate(variant_configs().items())}


@pytest.fixture(scope="module")
def quickstart_adapter(smollm2: Path, tmp_path_factory) -> Path:
    """An adapter shaped as the quickstart trains it (its recipe's sft.lora: rank 16, alpha 32, all-linear) on
    the real SmolLM2 weights, with small random factors so that the model stays a language model."""
    import torch
    from peft import get_peft_model

    from edgezh.recipe_load import load_recipe
    from edgezh.train.model import lora_config

    spec = load_recipe(QUICKSTART, []).sft.lora
    model = get_peft_model(load_base(smollm2), lora_config(spec))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    folder = tmp_path_factory.mktemp("quickstart-lora") / "adapter"
    model.save_pretrained(folder)
    (folder / "README.md").unlink()  # as the training stages leave an adapter: config and weights
    return folder


# ---------------------------------------------------------------- parity with llama.cpp's converter


def _reference_lora_converter() -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py with gguf-py and conversion/ beside it: beside
    $EDGEZH_LLAMA_CPP_CONVERT, else in .cache/llama.cpp/, which `make test` extracts from the installed
    llama-cpp-python's sdist."""
    folders = [Path(os.environ["EDGEZH_LLAMA_CPP_CONVERT"]).parent] if os.environ.get("EDGEZH_LLAMA_CPP_CONVERT") else []
    for folder in folders + [ROOT / ".cache" / "llama.cpp"]:
        script = folder / "convert_lora_to_gguf.py"
        if script.is_file() and (folder / "gguf-py").is_dir():
            return script
    return None


# The keys both write; where edgezh's value differs from the reference's; what only the reference writes.
ADAPTER_KEYS = {"general.architecture", "general.type", "general.name", "general.quantization_version", "adapter.type",
                "adapter.lora.alpha"}
REFERENCE_DIFFERENCES = {"general.name": "the build's name (`<name>-lora`), else the adapter folder's; the reference "
                                         "guesses one from the folder name ('adapter' -> 'Adapter')"}
# gguf-py's Metadata.load reads the adapter folder's model card (README.md, which peft's save_pretrained writes and
# edgezh's training stages delete): base_model entries (a local base becomes a huggingface.co URL of a local path)
# and tags. edgezh writes none of them.
MODEL_CARD_KEYS = re.compile(r"^general\.(base_model\.|tags$|license|languages$|datasets)")


@pytest.mark.parametrize("case", ["tiny-all_linear", "tiny-embedding", "quickstart"])
def test_matches_llama_cpp_convert_lora_to_gguf(case, tiny_llama3, smollm2, tiny_adapters, request, tmp_path) -> None:
    import gguf

    script = _reference_lora_converter()
    if script is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not found: `make test` fetches it into .cache/llama.cpp "
                    "(or set EDGEZH_LLAMA_CPP_CONVERT to its convert_hf_to_gguf.py)")
    if case == "quickstart":
        base, adapter = smollm2, request.getfixturevalue("quickstart_adapter")
    else:
        base, adapter = tiny_llama3, tiny_adapters[case.removeprefix("tiny-")]
    theirs_path, ours_path = tmp_path / "reference.gguf", tmp_path / "ours.gguf"
    proc = subprocess.run([sys.executable, str(script), "--outtype", "f16", "--outfile", str(theirs_path), "--base",
                           str(base), str(adapter)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = lora_gguf.convert(base, adapter, ours_path, "f16")
    theirs, ours = gguf.GGUFReader(theirs_path), gguf.GGUFReader(ours_path)

    keys = {k for k in theirs.fields if not k.startswith("GGUF.")}
    assert {k for k in ours.fields if not k.startswith("GGUF.")} == ADAPTER_KEYS
    card = {k for k in keys if MODEL_CARD_KEYS.match(k)}
    assert keys - card == ADAPTER_KEYS and bool(card) is (adapter / "README.md").is_file(), sorted(keys)
    for key in ADAPTER_KEYS - set(REFERENCE_DIFFERENCES):
        assert (theirs.fields[key].types, theirs.fields[key].contents()) == (ours.fields[key].types,
                                                                             ours.fields[key].contents()), key
    a, b = {t.name: t for t in theirs.tensors}, {t.name: t for t in ours.tensors}
    assert set(a) == set(b) and len(b) == facts["tensors"] == 2 * facts["pairs"]
    for name in a:
        assert (list(a[name].shape), a[name].tensor_type) == (list(b[name].shape), b[name].tensor_type), name
        assert b[name].tensor_type == gguf.GGMLQuantizationType.F16
        np.testing.assert_allclose(np.asarray(b[name].data, np.float32), np.asarray(a[name].data, np.float32),
                                   rtol=2.0 ** -10, atol=0, err_msg=name)
    if case == "tiny-embedding":
        assert {"token_embd.weight.lora_a", "token_embd.weight.lora_b"} <= set(b)


# ---------------------------------------------------------------- base + adapter vs the merged model


def _chinese_windows(folder: Path, template: str):
    from edgezh.data.corpora import peoples_daily
    from edgezh.eval import perplexity
    from edgezh.eval.tokens import EvalTokenizer

    tok = EvalTokenizer(folder, template)
    ids = tok.encode(peoples_daily(max_chars=6000))[:CHINESE_TOKENS + 64]
    assert len(ids) >= CHINESE_TOKENS + 64
    return perplexity.windows(ids, 256, 192, tok.bos_id)


def _against_merged(merged: Path, base: Path, adapter: Path, wins, *, control: bool = True) -> dict[str, dict]:
    """KLD / top-1 of base + adapter (and, with `control`, of the base alone) against the merged GGUF, all in llama.cpp."""
    from edgezh.eval import kld
    from edgezh.eval.backends import GGUFBackend

    backends = {"reference": GGUFBackend(merged, n_ctx=256), "adapter": GGUFBackend(base, n_ctx=256, adapters=[(adapter, 1.0)])}
    if control:
        backends["base"] = GGUFBackend(base, n_ctx=256)
    try:
        _, comparisons = kld.compare(backends["reference"], {k: b for k, b in backends.items() if k != "reference"}, wins)
    finally:
        for backend in backends.values():
            backend.close()
    return {name: kld.stats(*[c.arrays()[i] for i in (1, 2)]) for name, c in comparisons.items()}


@pytest.fixture(scope="module")
def tiny_base_f16(tiny_llama3: Path, tmp_path_factory) -> Path:
    from edgezh.export.gguf_writer import convert

    path = tmp_path_factory.mktemp("tiny-base") / "tiny-base-f16.gguf"
    convert(tiny_llama3, path, "f16", template="llama3")
    return path


@pytest.mark.parametrize("variant", ["all_linear", "rslora", "embedding"])
def test_tiny_base_plus_adapter_in_llama_cpp_is_the_merged_model(variant, tiny_llama3, tiny_adapters, tiny_base_f16,
                                                                 tmp_path) -> None:
    from edgezh.export.gguf_writer import convert
    from edgezh.export.lora import LoraAdapter

    merged = tmp_path / "merged-f16.gguf"  # the streaming merge fused into conversion: same bytes as merge + convert
    convert(tiny_llama3, merged, "f16", template="llama3", adapter=LoraAdapter.load(tiny_adapters[variant]))
    facts = lora_gguf.convert(tiny_llama3, tiny_adapters[variant], tmp_path / "lora.gguf", "f16")
    assert (facts["folded"] > 0) is (variant == "rslora")  # rank/alpha patterns and rslora: the scale is in lora_b
    stats = _against_merged(merged, tiny_base_f16, tmp_path / "lora.gguf", _chinese_windows(tiny_llama3, "llama3"))
    assert stats["adapter"]["tokens"] >= CHINESE_TOKENS
    assert stats["adapter"]["top1"] >= 0.99 and stats["adapter"]["mean"] <= 1e-3, stats
    assert stats["base"]["mean"] > 100 * stats["adapter"]["mean"], stats  # the adapter is what makes them equal


@pytest.mark.slow
def test_quickstart_base_plus_adapter_in_llama_cpp_is_the_merged_model(smollm2, quickstart_adapter, tmp_path) -> None:
    from edgezh.export.gguf_writer import convert
    from edgezh.export.lora import LoraAdapter

    base, merged = tmp_path / "base-f16.gguf", tmp_path / "merged-f16.gguf"
    convert(smollm2, base, "f16", template="chatml")
    convert(smollm2, merged, "f16", template="chatml", adapter=LoraAdapter.load(quickstart_adapter))
    lora_gguf.convert(smollm2, quickstart_adapter, tmp_path / "lora.gguf", "f16")
    stats = _against_merged(merged, base, tmp_path / "lora.gguf", _chinese_windows(smollm2, "chatml"), control=False)
    assert stats["adapter"]["tokens"] >= CHINESE_TOKENS
    assert stats["adapter"]["top1"] >= 0.99 and stats["adapter"]["mean"] <= 1e-3, stats


def test_several_adapters_with_scales_in_one_context(tiny_llama3, tiny_adapters, tiny_base_f16, tmp_path) -> None:
    """What the runtime does with `--lora A.gguf:0.5 --lora B.gguf:0.5`: every adapter loaded once, switched on
    together with its scale, switched off with an empty list."""
    from edgezh.eval.backends import GGUFBackend

    adapter = tmp_path / "lora.gguf"
    lora_gguf.convert(tiny_llama3, tiny_adapters["all_linear"], adapter, "f32")
    ids = [128000, 57668, 53901, 3922, 9906, 1917, 0, 42]
    with GGUFBackend(tiny_base_f16, n_ctx=64) as plain, GGUFBackend(tiny_base_f16, n_ctx=64, adapters=[(adapter, 1.0)]) as one:
        base_lp, one_lp = plain.log_probs(ids), one.log_probs(ids)
        with GGUFBackend(tiny_base_f16, n_ctx=64) as two:
            handles = lora_gguf.attach(two.llm, [(adapter, 0.5), (adapter, 0.5)])  # two handles, half each
            assert len(handles) == 2
            halves = two.log_probs(ids)
            lora_gguf.set_scales(two.llm, [], [])
            off = two.log_probs(ids)
            lora_gguf.set_scales(two.llm, handles[:1], [1.0])
            again = two.log_probs(ids)
    assert float((one_lp - base_lp).abs().max()) > 0.05  # the adapter changes the model…
    assert float((halves - one_lp).abs().max()) < 1e-3  # …and two halves are one whole
    assert float((off - base_lp).abs().max()) < 1e-5 and float((again - one_lp).abs().max()) < 1e-5


def test_llama_cpp_refusing_an_adapter_is_a_user_error(tiny_base_f16, smollm2, quickstart_adapter, tmp_path) -> None:
    from edgezh.eval.backends import GGUFBackend

    other = tmp_path / "smol-lora.gguf"  # made for SmolLM2, put on the tiny Llama 3
    lora_gguf.convert(smollm2, quickstart_adapter, other, "f16")
    with pytest.raises(UserError, match=r"smol-lora\.gguf: llama\.cpp cannot put this LoRA adapter on tiny-base-f16\.gguf: "
                                        r"tensor 'blk\.0\.\w+\.weight' has incorrect shape"):
        GGUFBackend(tiny_base_f16, n_ctx=64, adapters=[(other, 1.0)])


# ---------------------------------------------------------------- bad input


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["convert", *args])
    return code, capsys.readouterr().err


def test_adapter_for_another_base_exits_2_naming_the_tensor(tiny_llama3, tmp_path, capsys) -> None:
    from peft import LoraConfig

    adapter = save_adapter(small_llama(hidden=128), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", seed=1)
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    code, err = _cli(capsys, str(tiny_llama3), "--lora", str(adapter), "-o", str(out))
    assert code == 2 and re.search(r"error: .*model\.layers\.0\.self_attn\.q_proj\.weight.*\[128, 128\].*\[256, 256\]", err), err
    assert list(out.parent.iterdir()) == []


def test_non_peft_folder_and_missing_base_exit_2_naming_the_file(tiny_llama3, tiny_adapters, tmp_path, capsys) -> None:
    out = tmp_path / "x.gguf"
    code, err = _cli(capsys, str(tiny_llama3), "--lora", str(tiny_llama3), "-o", str(out))  # a model, not an adapter
    assert code == 2 and f"{tiny_llama3}: no adapter_config.json — not a peft adapter folder" in err, err
    code, err = _cli(capsys, str(tmp_path / "nowhere"), "--lora", str(tiny_adapters["all_linear"]), "-o", str(out))
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such base model folder" in err, err
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, str(tmp_path / "empty"), "--lora", str(tiny_adapters["all_linear"]), "-o", str(out))
    assert code == 2 and f"{tmp_path / 'empty'}: no config.json" in err, err
    code, err = _cli(capsys, str(tiny_llama3), "--lora", str(tiny_adapters["all_linear"]), "-o", str(out), "--outtype", "q8_0")
    assert code == 2 and "an adapter GGUF is f32, f16, bf16" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_modules_to_save_and_tied_heads_are_refused_pointing_to_the_merged_export(tiny_llama3, tiny_adapters, smollm2,
                                                                                tmp_path) -> None:
    from peft import LoraConfig

    with pytest.raises(UserError, match=r"modules_to_save: lm_head\.weight.*only lora_a/lora_b pairs.*merged model"):
        lora_gguf.convert(tiny_llama3, tiny_adapters["lm_head"], tmp_path / "x.gguf")
    # SmolLM2 ties its head to the embedding: llama.cpp's head would be the embedding's tensor
    tied = save_adapter(load_base(smollm2), LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path / "emb", seed=3)
    with pytest.raises(UserError, match=r"LoRA on embed_tokens.*tie_word_embeddings: true.*merged model"):
        lora_gguf.convert(smollm2, tied, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_changed_embedding_copy_is_refused(tiny_llama3, tiny_adapters, tmp_path) -> None:
    """peft saves a targeted embedding in full; when that copy is not the base's, only the merge can carry it."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapters["embedding"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key][5, :] += 1.0
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(UserError, match=rf"{re.escape(key)} differs from the base's model\.embed_tokens\.weight "
                                        r"\(from row 0\).*merged model"):
        lora_gguf.convert(tiny_llama3, folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------- recipe, stage, Modelfiles, report


def test_recipe_section_and_stage_table(tmp_path) -> None:
    from edgezh.recipe_load import RecipeError, load_recipe
    from edgezh.stages import STAGES, folder_name

    recipe = load_recipe(QUICKSTART, [])
    assert recipe.export.adapter is not None and recipe.export.adapter.base_quantize == ["q4_k_m"]
    spec = {s.name: s for s in STAGES}
    assert spec["adapter"].enabled(recipe) and spec["adapter"].available and folder_name("adapter") == "11-adapter"
    assert spec["adapter"].needs(recipe) == ["base", "sft", "dpo"] and "adapter" in spec["modelfile"].needs(recipe)
    with pytest.raises(RecipeError, match=r"sft\.lora\.modules_to_save \(lm_head\).*merged model"):
        load_recipe(QUICKSTART, ["sft.lora.modules_to_save=[lm_head]", "dpo.lora.modules_to_save=[lm_head]"])
    full = tmp_path / "full.yaml"
    full.write_text("name: full\nbase: {init: {}, tokenizer: llama3}\ndata: {sources: [{builtin: hsk-chat}]}\n"
                    "sft: {method: full}\nexport: {adapter: {}}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"sft\.method is full: it trains no adapter"):
        load_recipe(full, [])
    with pytest.raises(RecipeError, match=r"export\.adapter: an adapter GGUF needs a LoRA training stage"):
        load_recipe(ROOT / "recipes" / "tiny-llama3.yaml", ["export.adapter.outtype=f16"])
    with pytest.raises(RecipeError, match=r"iq4_xs need\(s\) an importance matrix"):
        load_recipe(QUICKSTART, ["export.adapter.base_quantize=[iq4_xs]"])


@pytest.fixture(scope="module")
def adapter_stage(tiny_llama3, tiny_adapters, tmp_path_factory) -> dict:
    """The adapter stage and the modelfile stage run on the tiny Llama 3 and an SFT artifact holding a LoRA adapter."""
    import shutil

    from edgezh.artifacts import Artifact
    from edgezh.export import adapter_stage, modelfile_stage
    from edgezh.recipe import AdapterExportConfig, ModelfileConfig

    build = tmp_path_factory.mktemp("builds") / "tiny"
    sft = build / "04-sft"
    shutil.copytree(tiny_adapters["all_linear"], sft / "adapter")
    inputs = {"base": Artifact("base", tiny_llama3, {}, {"template": "llama3"}),
              "sft": Artifact("sft", sft, {}, {"method": "lora"})}
    out = build / "11-adapter.tmp"
    out.mkdir()
    info = adapter_stage.run(AdapterExportConfig(ollama_base="llama3.2:1b"), inputs, out)
    inputs["adapter"] = Artifact("adapter", out, {}, info)
    inputs["gguf"] = Artifact("gguf", out, {}, {"file": "tiny-base-f16.gguf", "outtype": "f16"})
    modelfiles = build / "12-modelfile.tmp"
    modelfiles.mkdir()
    models = modelfile_stage.run(ModelfileConfig(), inputs, modelfiles)
    return {"info": info, "out": out, "inputs": inputs, "modelfiles": modelfiles, "models": models}


def test_adapter_stage_writes_the_adapter_and_its_bases(adapter_stage) -> None:
    info, out = adapter_stage["info"], adapter_stage["out"]
    assert info["exports"] == ["tiny-lora-f16.gguf", "tiny-base-f16.gguf", "tiny-base-q4_k_m.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted(info["exports"])
    assert info["pairs"] == 14 and info["ranks"] == [8] and info["alpha"] == 16 and info["trained_from"] == "base"
    assert set(info["bases"]) == {"f16", "q4_k_m"} and info["bases"]["q4_k_m"]["bytes"] < info["bases"]["f16"]["bytes"]
    assert info["bytes"] == (out / "tiny-lora-f16.gguf").stat().st_size < info["bases"]["q4_k_m"]["bytes"] / 50


def test_adapter_modelfiles_name_the_base_and_the_adapter(adapter_stage) -> None:
    fmt, folder, info = templates.get("llama3"), adapter_stage["modelfiles"], adapter_stage["models"]
    assert {"Modelfile.lora-f16", "Modelfile.lora-q4_k_m", "Modelfile.lora"} <= set(info["exports"])
    assert info["models"]["lora-q4_k_m"] == "tiny-lora:q4_k_m" and info["models"]["lora"] == "tiny-lora"
    text = (folder / "Modelfile.lora-q4_k_m").read_text(encoding="utf-8")
    assert re.search(r"^FROM \./tiny-base-q4_k_m\.gguf\nADAPTER \./tiny-lora-f16\.gguf$", text, re.M), text[:600]
    assert f'TEMPLATE """{fmt.ollama}"""' in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == list(fmt.stop_tokens)
    assert "LoRA adapters are no longer supported" in text  # which Ollama takes ADAPTER, said where it is used
    tagged = (folder / "Modelfile.lora").read_text(encoding="utf-8")
    assert re.search(r"^FROM llama3\.2:1b\nADAPTER \./tiny-lora-f16\.gguf$", tagged, re.M)


def test_report_line_base_plus_adapter_against_the_merged_model(adapter_stage, tiny_llama3, tiny_adapters, tmp_path) -> None:
    """The eval stage's variants and the report's line: base-f16+lora and base-q4_k_m+lora in lockstep with the
    merged f16 GGUF."""
    from edgezh.artifacts import Artifact
    from edgezh.eval import passes, report
    from edgezh.eval.tokens import EvalTokenizer
    from edgezh.eval.variants import discover
    from edgezh.export.gguf_writer import convert
    from edgezh.export.lora import LoraAdapter

    merged = tmp_path / "tiny-f16.gguf"
    convert(tiny_llama3, merged, "f16", template="llama3", adapter=LoraAdapter.load(tiny_adapters["all_linear"]))
    inputs = {"base": adapter_stage["inputs"]["base"], "gguf": Artifact("gguf", tmp_path, {}, {"file": merged.name, "outtype": "f16"}),
              "adapter": adapter_stage["inputs"]["adapter"]}
    variants, reference, _ = discover(inputs, n_ctx=256)
    assert reference == "f16" and [v.name for v in variants if v.facts.get("adapter_file")] == ["base-f16+lora", "base-q4_k_m+lora"]
    tok = EvalTokenizer(tiny_llama3, "llama3")
    wins = {"peoples-daily": _chinese_windows(tiny_llama3, "llama3")}
    facts = {"peoples-daily": {"source": "People's Daily", "tokens": sum(len(w.rows) for w in wins["peoples-daily"]), "windows": 6}}
    results = passes.new_results("tiny", "llama3", tok, variants, reference, context_length=256, stride=192, max_tokens=2000,
                                 tokenizer=str(tiny_llama3), corpus_facts=facts, mc_sets=[], reply_prompts=[], reply_source="",
                                 reply_max_tokens=8, notes=[])
    by_name = {v.name: v for v in variants}
    passes.lockstep(results, by_name["f16"], [v for v in variants if v.quantized], wins, facts, tok,
                    lambda backend, variant: None, run_reference_tasks=False)
    results["adapter"] = {k: adapter_stage["info"][k] for k in ("file", "bytes", "outtype", "alpha", "ranks", "pairs",
                                                                 "bases", "ollama_base")}
    f16 = results["kld"]["variants"]["base-f16+lora"]["all"]
    assert f16["tokens"] >= CHINESE_TOKENS and f16["top1"] >= 0.99 and f16["mean"] <= 1e-3
    text = "\n".join(report._adapter(results))
    assert text.startswith("### LoRA adapter on the base\n\n`tiny-lora-f16.gguf`")
    assert re.search(rf"^\| base-f16\+lora \| .* \| {f16['mean']:.2e} \| .* \| {f16['top1']:.2%} \| {f16['tokens']} \| — \(the reference\) \|$",
                     text, re.M), text
    assert re.search(r"^\| base-q4_k_m\+lora \| [\d.,]+ MiB \+ [\d.,]+ MiB \| ", text, re.M) and "`llama3.2:1b`" in text
    assert "`tiny-base-q4_k_m.gguf` + `tiny-lora-f16.gguf`" in "\n".join(report._variants(results))
