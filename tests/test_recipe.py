"""Recipes: every shipped recipe parses; every bad recipe exits 2 naming the place, writing nothing."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from edgezh.cli import main
from edgezh.recipe_load import RecipeError, explain, load_recipe

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = "name: t\nbase:\n  init: {hidden_size: 256}\n  tokenizer: llama3\n"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.base is not None


def test_there_are_shipped_recipes() -> None:
    assert {"quickstart.yaml", "tiny-llama3.yaml"} <= {p.name for p in SHIPPED}


# (recipe text, extra CLI args, text that the error must contain: the dotted path and the reason)
BAD = {
    "not-yaml": ("name: x\nbase: [unclosed\n", [], "not valid YAML"),
    "top-level-list": ("- a\n- b\n", [], "YAML mapping"),
    "no-base": ("name: x\n", [], "base: required but missing"),
    "two-sources": ("name: x\nbase: {hub: a/b, init: {}}\ntokenizer: llama3\n", [], "give exactly one of path, hub, init"),
    "no-source": ("name: x\nbase: {template: llama3}\n", [], "give exactly one of path, hub, init (got none)"),
    "init-without-tokenizer": ("name: x\nbase: {init: {}}\n", [], "`init` needs `tokenizer`"),
    "missing-base-file": ("name: x\nbase: {path: missing/model}\n", [], "base.path: missing/model: no such file or folder"),
    "missing-package": ("name: x\nbase: {path: 'pkg://no_such_pkg_zz/m.gguf'}\n", [], "package 'no_such_pkg_zz' is not installed"),
    "unknown-top-key": (TINY + "sfft: {}\n", [], "unknown key 'sfft'; did you mean 'sft'?"),
    "unknown-nested-key": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {lroa: {rank: 8}}\n", [], "sft.lroa: unknown key 'lroa'; did you mean 'lora'?"),
    "bad-int": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {lora: {rank: eight}}\n", [], "sft.lora.rank: Input should be a valid integer"),
    "negative-batch": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {batch_size: -2}\n", [], "sft.batch_size: Input should be greater than 0"),
    "bad-method": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {method: qlor}\n", [], "sft.method: Input should be 'full', 'lora' or 'qlora'"),
    "bad-template": ("name: x\nbase: {init: {}, tokenizer: llama3, template: llama2}\n", [], "base.template: Input should be 'llama3', 'llama3.1' or 'chatml'"),
    "bad-quant": (TINY + "export: {gguf: {quantize: [q4_k_x]}}\n", [], "export.gguf.quantize.0: Input should be"),
    "bad-outtype": (TINY + "export: {gguf: {outtype: q4_k_m}}\n", [], "export.gguf.outtype"),
    "gate-out-of-range": (TINY + "eval: {gates: {min_top1: 1.5}}\n", [], "eval.gates.min_top1: Input should be less than or equal to 1"),
    "lora-with-full": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {method: full, lora: {rank: 8}}\n", [], "`lora` settings given but method is `full`"),
    "qlora-settings-with-lora": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {method: lora, qlora: {quant_type: nf4}}\n", [], "`qlora` settings given but method is `lora`"),
    "training-without-data": (TINY + "sft: {max_steps: 3}\n", [], "data: training (sft/dpo) needs a `data` section"),
    "modelfile-without-gguf": (TINY + "modelfile: {}\n", [], "modelfile: Modelfiles need `export.gguf`"),
    "gptq-without-data": (TINY + "export: {gptq: {}}\n", [], "export.gptq: GPTQ calibrates on the recipe's data"),
    "bad-deepspeed": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {deepspeed: zero9}\n", [], "deepspeed must be zero2, zero3, zero2_offload"),
    "nodes-without-hostfile": (TINY + "data: {sources: [{builtin: hsk-chat}]}\nsft: {num_nodes: 2}\n", [], "num_nodes > 1 needs a hostfile"),
    "missing-data-file": (TINY + "data: {sources: [{path: nope.jsonl}]}\n", [], "data.sources.0.path: nope.jsonl: no such file"),
    "empty-sources": (TINY + "data: {sources: []}\n", [], "data.sources: List should have at least 1 item"),
    "weight-and-samples": (TINY + "data: {sources: [{builtin: hsk-chat, weight: 1, samples: 5}]}\n", [], "give `weight` or `samples`, not both"),
    "eval-ratio-too-big": (TINY + "data: {sources: [{builtin: hsk-chat}], eval_ratio: 0.9}\n", [], "data.eval_ratio: Input should be less than 0.5"),
    "bad-name": ("name: 'has space'\nbase: {init: {}, tokenizer: llama3}\n", [], "name: String should match pattern"),
    "heads-do-not-divide": ("name: x\nbase: {init: {num_attention_heads: 4, num_key_value_heads: 3}, tokenizer: llama3}\n", [], "num_key_value_heads must divide num_attention_heads"),
    "bad-override-value": (TINY, ["base.init.hidden_size=wide"], "<command line>: base.init.hidden_size: Input should be a valid integer"),
    "bad-override-syntax": (TINY, ["hidden_size"], "override 'hidden_size' is not key.path=value"),
    "unknown-override-key": (TINY, ["sft.lora.rnak=4"], "unknown key 'rnak'; did you mean 'rank'?"),
    "mc-both-sources": (TINY + "eval: {multiple_choice: [{builtin: hsk-translate, path: x}]}\n", [], "eval.multiple_choice.0"),
    "until-unknown-stage": (TINY, ["--until", "merge"], "--until merge: the recipe does not enable stage 'merge'"),
    "until-typo": (TINY, ["--until", "bsae"], "--until bsae: no such stage"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_recipe_exits_2_naming_the_place(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    text, extra, expected = BAD[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["build", str(recipe), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_bad_recipe_corpus_is_large_enough() -> None:
    assert len(BAD) >= 25


def test_all_problems_reported_at_once_with_lines(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: many
        base:
          init: {hidden_size: 256}
          tokenizer: llama3
        data:
          sources: [{builtin: hsk-chat}]
        sft:
          method: lora
          lora:
            rank: abc
          batch_size: 0
        export:
          gguf: {quantize: [q9]}
        """), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    found = {(p.path, p.line) for p in info.value.problems}
    assert ("sft.lora.rank", 10) in found
    assert ("sft.batch_size", 11) in found
    assert ("export.gguf.quantize.0", 13) in found
    assert all(str(p).startswith("r.yaml:") for p in info.value.problems)


def test_cli_bad_recipe_has_no_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbase: {init: {}, tokenizer: llama3}\nsft: {epochs: many}\n", encoding="utf-8")
    result = run_cli("build", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "sft.epochs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "builds").exists()


def test_missing_recipe_file(tmp_path: Path, capsys) -> None:
    assert main(["build", str(tmp_path / "none.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_overrides_apply_and_create_sections(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY, encoding="utf-8")
    loaded = load_recipe(recipe, ["base.init.num_hidden_layers=3", "data.sources=[{builtin: hsk-chat}]", "sft.lora.rank=16"])
    assert loaded.base.init.num_hidden_layers == 3
    assert loaded.sft.lora.rank == 16 and loaded.sft.method == "lora"
    assert loaded.data.sources[0].builtin == "hsk-chat"


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY, encoding="utf-8")
    loaded = load_recipe(recipe)
    with pytest.raises(Exception):
        loaded.base.init.hidden_size = 512


def test_relative_paths_resolve_against_the_recipe(tmp_path: Path, tiny_llama3: Path) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "r.yaml").write_text(f"name: r\nbase: {{path: {tiny_llama3}}}\n", encoding="utf-8")
    assert load_recipe(sub / "r.yaml").base.path == str(tiny_llama3)
    (tmp_path / "model").symlink_to(tiny_llama3)
    (sub / "rel.yaml").write_text("name: rel\nbase: {path: ../model}\n", encoding="utf-8")
    assert load_recipe(sub / "rel.yaml").base.path == str(sub / ".." / "model")


def test_explain_documents_every_field() -> None:
    rows = explain("sft.lora")
    names = [r[0] for r in rows]
    assert names == ["rank", "alpha", "dropout", "target_modules", "modules_to_save"]
    assert all(r[3] for r in rows)  # every field has a doc
    rank = rows[0]
    assert rank[2] == "8" and "rank" in rank[3].lower()


@pytest.mark.parametrize("section", ["", "base", "base.init", "data", "sft", "sft.lora", "sft.qlora", "dpo", "merge",
                                     "export", "export.gguf", "export.gptq", "modelfile", "eval", "eval.gates", "output"])
def test_every_section_is_documented(section: str) -> None:
    for name, _type, _default, doc in explain(section):
        assert doc, f"{section}.{name} has no docstring"


def test_explain_unknown_section(capsys) -> None:
    assert main(["explain", "sft.lroa"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_dry_runs(path: Path, tmp_path: Path) -> None:
    result = run_cli("build", str(path), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "plan for" in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "builds").exists()  # a dry run writes nothing


def test_dry_run_shows_the_deepspeed_launch(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "llama3-8b-agentflan-qlora.yaml"
    result = run_cli("build", str(recipe), "--dry-run", "sft.num_processes=2", "sft.num_nodes=2",
                     f"sft.hostfile={recipe}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"sft launches: deepspeed --num_gpus 2 --num_nodes 2 --hostfile \S+ ", result.stdout), result.stdout
