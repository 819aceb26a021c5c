"""The data stage run through the pipeline on the tiny Llama 3: outputs, determinism, mixing, splits, stats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from edgezh.data.encode import IGNORE
from edgezh.pipeline import make_plan, run_plan
from edgezh.recipe_load import load_recipe

OUTPUTS = {"train.jsonl", "eval.jsonl", "train.parquet", "eval.parquet", "pairs_train.jsonl", "pairs_eval.jsonl",
           "stats.json", "lengths.png", "manifest.json"}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build(recipe_text: str, folder: Path, root: Path, *overrides: str):
    """Write the recipe into ``folder`` and build it until the data stage into ``root``."""
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    plan = make_plan(load_recipe(recipe, [f"output.root={root}", *overrides]), until="data")
    run_plan(plan)
    return plan.step("data").artifact


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    chat = [{"messages": [{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": f"第{i}个回答。"}]}
            for i in range(11)]
    write_jsonl(folder / "chat.jsonl", chat + [chat[3]])  # one exact duplicate
    rows = ["instruction,input,output"] + [f"把{i}翻译成英文,,number {i}" for i in range(6)]
    (folder / "alpaca.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_jsonl(folder / "prefs.jsonl", [{"prompt": f"用中文说{i}", "chosen": f"数字{i}", "rejected": f"number {i}"} for i in range(6)])
    write_jsonl(folder / "agent.jsonl", [{"conversation": [
        {"role": "user", "content": f"查{i}号"},
        {"role": "assistant", "content": f"Thought: 查询\nAction: lookup\nAction Input: {{\"id\": {i}}}"},
        {"role": "user", "content": "Observation: 好"},
        {"role": "assistant", "content": "Final Answer: 好。"}]} for i in range(4)])
    return folder


def mix_recipe(tiny_llama3: Path) -> str:
    return f"""name: mix
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources:
    - {{path: chat.jsonl, weight: 2}}
    - {{path: alpaca.csv, weight: 1}}
    - {{path: prefs.jsonl}}
    - {{path: agent.jsonl, samples: 3, name: agent}}
  eval_ratio: 0.25
  max_length: 512
  loss_scale: {{action: 2.0, action_input: 2.0}}
"""


@pytest.fixture(scope="module")
def mixed(tiny_llama3, data_dir, tmp_path_factory):
    first = build(mix_recipe(tiny_llama3), data_dir, tmp_path_factory.mktemp("one"))
    second = build(mix_recipe(tiny_llama3), data_dir, tmp_path_factory.mktemp("two"))
    return first, second


def test_outputs_and_byte_identical_rebuild(mixed) -> None:
    first, second = mixed
    assert {p.name for p in first.path.iterdir()} == OUTPUTS
    assert first.path != second.path
    assert first.files == second.files and first.hash == second.hash  # lengths.png and parquet included
    assert set(first.files) == OUTPUTS - {"manifest.json"}


def test_counts_follow_weights_samples_and_split(mixed) -> None:
    artifact = mixed[0]
    stats = json.loads(artifact.file("stats.json").read_text(encoding="utf-8"))
    sources = stats["sources"]
    # chat: 12 lines, 1 duplicate → 11; weights 2:1 with alpaca's 6 → the group is 16.5 → 11 and 5
    assert sources["chat.jsonl"]["read"] == 12 and sources["chat.jsonl"]["duplicates"] == 1
    # the held-out split is by record hash (stable as a source grows), so each source's eval count is near
    # eval_ratio of what it gives, at least one, never all
    for name, requested in (("chat.jsonl", 11), ("alpaca.csv", 5), ("agent", 3), ("prefs.jsonl", 6)):
        entry = sources[name]
        assert entry["requested"] == requested and entry["train"] + entry["eval"] == requested, (name, entry)
        assert 1 <= entry["eval"] < requested
    assert sources["prefs.jsonl"]["kind"] == "pairs"
    assert stats["totals"]["train"] + stats["totals"]["eval"] == 19 and stats["totals"]["duplicates"] == 1
    assert stats["totals"]["skipped"] == 0 and all(s["skipped"] == {} for s in sources.values())
    assert sources["agent"]["format"] == "react" and sources["alpaca.csv"]["format"] == "alpaca"
    info = artifact.info
    assert (info["template"], info["pad_token_id"], info["pad_token"], info["max_length"]) == ("llama3", 128004, "<|finetune_right_pad_id|>", 512)
    assert info["train"] == stats["totals"]["train"] and info["pairs_train"] == sources["prefs.jsonl"]["train"]
    assert info["sources"]["agent"]["train"] == sources["agent"]["train"]


def test_every_source_is_held_out_and_pairs_are_apart(mixed) -> None:
    artifact = mixed[0]
    train, held = jsonl(artifact.file("train.jsonl")), jsonl(artifact.file("eval.jsonl"))
    assert {r["source"] for r in held} == {"chat.jsonl", "alpaca.csv", "agent"}
    assert {r["source"] for r in train} == {"chat.jsonl", "alpaca.csv", "agent"}
    assert all(set(r) <= {"messages", "tools", "source"} for r in train + held)
    pairs_train, pairs_eval = jsonl(artifact.file("pairs_train.jsonl")), jsonl(artifact.file("pairs_eval.jsonl"))
    assert len(pairs_train) + len(pairs_eval) == 6 and pairs_eval
    assert all(set(p) == {"prompt", "chosen", "rejected", "source"} and p["source"] == "prefs.jsonl" for p in pairs_train + pairs_eval)
    # held-out records are not trained on
    keys = lambda rows: {json.dumps(r["messages"], sort_keys=True) for r in rows}  # noqa: E731
    assert not keys(train) & keys(held)
    assert not {json.dumps(p["prompt"]) for p in pairs_train} & {json.dumps(p["prompt"]) for p in pairs_eval}


def test_parquet_matches_jsonl_and_stats(mixed) -> None:
    artifact = mixed[0]
    stats = json.loads(artifact.file("stats.json").read_text(encoding="utf-8"))
    for split in ("train", "eval"):
        table = pq.read_table(artifact.file(f"{split}.parquet"))
        assert table.column_names == ["input_ids", "labels", "loss_scale", "source"]
        rows = table.to_pylist()
        lines = jsonl(artifact.file(f"{split}.jsonl"))
        assert [r["source"] for r in rows] == [line["source"] for line in lines]
        for row in rows:
            assert len(row["input_ids"]) == len(row["labels"]) == len(row["loss_scale"])
            assert row["input_ids"].count(128000) == 1 and row["labels"][-1] == 128009
            assert all((label == IGNORE) == (scale == 0.0) for label, scale in zip(row["labels"], row["loss_scale"]))
            weights = {s for s in row["loss_scale"] if s}
            assert weights == ({1.0, 2.0} if row["source"] == "agent" else {1.0})
        assert stats["totals"][f"tokens_{split}"] == sum(len(r["input_ids"]) for r in rows)
        assert stats["totals"][f"trained_tokens_{split}"] == sum(sum(t != IGNORE for t in r["labels"]) for r in rows)
        for name in ("chat.jsonl", "alpaca.csv", "agent"):
            assert stats["sources"][name]["tokens"][split] == sum(len(r["input_ids"]) for r in rows if r["source"] == name)


def test_png_is_a_real_histogram(mixed) -> None:
    data = mixed[0].file("lengths.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert b"Software" not in data and b"matplotlib" not in data  # no version string: reproducible across installs


def test_length_rule_drop_replaces_and_truncate_cuts(tiny_llama3, data_dir, tmp_path) -> None:
    long = [{"messages": [{"role": "user", "content": "讲个长故事"}, {"role": "assistant", "content": "很久以前，" * 40}]} for _ in range(1)]
    short = [{"messages": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"答{i}"}]} for i in range(5)]
    write_jsonl(data_dir / "lengths.jsonl", long + short)
    recipe = f"""name: lengths
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: lengths.jsonl}}]
  eval_ratio: 0
  max_length: 40
"""
    dropped = build(recipe, data_dir, tmp_path / "drop")
    stats = json.loads(dropped.file("stats.json").read_text(encoding="utf-8"))["sources"]["lengths.jsonl"]
    assert stats["too_long"] == {"dropped": 1, "truncated": 0}
    assert (stats["requested"], stats["train"], stats["short"]) == (6, 5, 1)
    assert all(len(r["input_ids"]) <= 40 for r in pq.read_table(dropped.file("train.parquet")).to_pylist())

    cut = build(recipe.replace("max_length: 40", "max_length: 40\n  too_long: truncate"), data_dir, tmp_path / "cut")
    stats = json.loads(cut.file("stats.json").read_text(encoding="utf-8"))["sources"]["lengths.jsonl"]
    assert stats["too_long"] == {"dropped": 0, "truncated": 1} and stats["train"] == 6
    rows = pq.read_table(cut.file("train.parquet")).to_pylist()
    assert sorted(len(r["input_ids"]) for r in rows)[-1] == 40
    full = [line for line in jsonl(cut.file("train.jsonl")) if line["messages"][0]["content"] == "讲个长故事"]
    assert full[0]["messages"][1]["content"] == "很久以前，" * 40  # the jsonl keeps the whole conversation


def test_replace_upsamples_without_leaking_held_out(tiny_llama3, data_dir, tmp_path) -> None:
    write_jsonl(data_dir / "small.jsonl", [{"messages": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"答{i}"}]}
                                           for i in range(4)])
    recipe = f"""name: up
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: small.jsonl, samples: 20, replace: true}}]
  eval_ratio: 0.1
"""
    artifact = build(recipe, data_dir, tmp_path)
    train, held = jsonl(artifact.file("train.jsonl")), jsonl(artifact.file("eval.jsonl"))
    assert len(train) + len(held) == 20 and 1 <= len(held) <= 3
    assert len({json.dumps(r["messages"]) for r in train}) == 4 - len(held)  # the records not held out, repeated
    assert not {json.dumps(r["messages"]) for r in train} & {json.dumps(r["messages"]) for r in held}


def test_samples_beyond_the_source_without_replace_is_an_error(tiny_llama3, data_dir, tmp_path) -> None:
    from edgezh.errors import UserError

    write_jsonl(data_dir / "few.jsonl", [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}])
    recipe = f"""name: few
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: few.jsonl, samples: 3}}]
"""
    with pytest.raises(UserError, match=r"samples: 3 but only 1 usable record.*replace: true"):
        build(recipe, data_dir, tmp_path)


def test_editing_a_data_file_invalidates_the_cache(tiny_llama3, data_dir, tmp_path) -> None:
    path = write_jsonl(data_dir / "edit.jsonl", [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}])
    recipe_text = f"name: edit\nbase: {{path: {tiny_llama3}, template: llama3}}\ndata:\n  sources: [{{path: edit.jsonl}}]\n"
    build(recipe_text, data_dir, tmp_path)
    recipe = data_dir / "recipe.yaml"
    assert make_plan(load_recipe(recipe, [f"output.root={tmp_path}"]), until="data").step("data").status == "cached"
    write_jsonl(path, [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "另一个答案"}]}])
    assert make_plan(load_recipe(recipe, [f"output.root={tmp_path}"]), until="data").step("data").status == "run"
