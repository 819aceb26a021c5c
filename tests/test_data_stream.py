"""The streaming data stage: batch encoding equals one-by-one encoding, worker processes give the same
bytes as one process, the held-out split stays put as a source grows, dedup on disk equals dedup in
memory, text sources become fully trained blocks, and files in other encodings are named or decoded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from edgezh.data import mix, sources, stream
from edgezh.data.encode import IGNORE, Encoder
from edgezh.data.problems import Problems
from edgezh.pipeline import make_plan, run_plan
from edgezh.recipe import DataSource
from edgezh.recipe_load import load_recipe


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def chat(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"第{i}个问题：今天天气怎么样？"},
                              {"from": "gpt", "value": f"第{i}个回答。" + "天气很好。" * (i % 7)}]}


def react(i: int) -> dict:
    return {"conversation": [
        {"role": "user", "content": f"查{i}号订单"},
        {"role": "assistant", "content": f"Thought: 需要查询\nAction: lookup\nAction Input: {{\"id\": {i}}}"},
        {"role": "user", "content": f"Observation: 订单{i}已发货"},
        {"role": "assistant", "content": f"Final Answer: 订单{i}已经发货了。"}]}


def build(folder: Path, recipe_text: str, root: Path, env=None, monkeypatch=None):
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    plan = make_plan(load_recipe(recipe, [f"output.root={root}"]), until="data")
    run_plan(plan)
    return plan.step("data").artifact


def test_batch_encoding_equals_one_by_one(tiny_llama3: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "agent.jsonl", [react(i) for i in range(40)])
    encoder = Encoder(tiny_llama3, "llama3", {"action": 2.0, "action_input": 3.0})
    loaded = sources.load(DataSource(path=str(path)), "agent", encoder.format, encoder.control_tokens(), Problems("fail"), 0)
    plain = sources.load(DataSource(path=str(write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(40)]))), "chat",
                         encoder.format, encoder.control_tokens(), Problems("fail"), 0)
    records = loaded.conversations + plain.conversations
    assert any(c.spans for c in records)
    batched = encoder.encode_many(records)
    single = [encoder.encode(c) for c in records]
    assert batched == single
    for conversation, encoded in zip(records, batched):  # the mask transformers' own path computes
        out = encoder.tokenizer.apply_chat_template(conversation.messages, chat_template=encoder.format.training, tokenize=True,
                                                    return_dict=True, return_assistant_tokens_mask=True)
        assert encoded.input_ids == list(out["input_ids"])
        assert [label != IGNORE for label in encoded.labels] == [bool(m) for m in out["assistant_masks"]]
    assert {w for e in batched[:40] for w in e.loss_scale} == {0.0, 1.0, 2.0, 3.0}


def test_worker_processes_give_the_same_bytes(tiny_llama3: Path, tmp_path: Path, monkeypatch) -> None:
    write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(1500)] + [chat(3)])
    write_jsonl(tmp_path / "agent.jsonl", [react(i) for i in range(1300)])
    recipe = f"""name: pool
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: chat.jsonl}}, {{path: agent.jsonl, weight: 1}}, {{path: chat.jsonl, name: again, weight: 1}}]
  max_length: 96
  loss_scale: {{action: 2.0}}
"""
    one = build(tmp_path, recipe, tmp_path / "one", {"EDGEZH_DATA_WORKERS": "1"}, monkeypatch)
    two = build(tmp_path, recipe, tmp_path / "two", {"EDGEZH_DATA_WORKERS": "2"}, monkeypatch)
    assert one.files == two.files
    from edgezh.data import shards

    monkeypatch.setattr(shards, "BUCKET", 50)  # many buckets in the external shuffle: the same rows, in the same order
    many = build(tmp_path, recipe, tmp_path / "many", {"EDGEZH_DATA_WORKERS": "2"}, monkeypatch)
    assert many.files["train.jsonl"] == one.files["train.jsonl"] and many.files["eval.jsonl"] == one.files["eval.jsonl"]
    assert pq.read_table(many.file("train.parquet")).equals(pq.read_table(one.file("train.parquet")))
    info = one.info
    assert info["duplicates"] == 1 + 1501 and info["sources"]["again"]["train"] == 0  # `again` repeats chat.jsonl
    rows = pq.read_table(one.file("train.parquet")).to_pylist()
    assert len(rows) == info["train"] and {r["source"] for r in rows} == {"chat.jsonl", "agent.jsonl"}
    for row in rows:
        assert row["input_ids"][0] == 128000 and row["labels"][-1] == 128009
        assert all((label == IGNORE) == (scale == 0.0) for label, scale in zip(row["labels"], row["loss_scale"]))
    assert {s for r in rows if r["source"] == "agent.jsonl" for s in r["loss_scale"]} == {0.0, 1.0, 2.0}
    assert pq.ParquetFile(one.file("train.parquet")).metadata.num_row_groups >= 1


def test_held_out_split_is_stable_as_a_source_grows(tiny_llama3: Path, tmp_path: Path) -> None:
    recipe = f"""name: grow
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: grow.jsonl}}]
  eval_ratio: 0.1
"""
    sides = []
    for count in (300, 600):
        write_jsonl(tmp_path / "grow.jsonl", [chat(i) for i in range(count)])
        artifact = build(tmp_path, recipe, tmp_path / str(count))
        side = {}
        for split in ("train", "eval"):
            for line in artifact.file(f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                side[json.loads(line)["messages"][0]["content"]] = split
        sides.append(side)
    small, large = sides
    assert all(large[question] == split for question, split in small.items())
    held = sum(split == "eval" for split in large.values())
    assert 30 <= held <= 90  # ~10% of 600


def test_split_scores_are_uniform_and_seeded() -> None:
    keys = np.array([stream.hash64(f"record {i}") for i in range(20000)], dtype=np.uint64)
    train, held = mix.select(keys, len(keys), 0.05, False, 42, "s")
    assert abs(len(held) / len(keys) - 0.05) < 0.006 and len(train) + len(held) == len(keys)
    other = mix.select(keys, len(keys), 0.05, False, 7, "s")[1]
    assert set(held) != set(other)
    again = mix.select(keys, len(keys), 0.05, False, 42, "renamed")[1]
    assert set(held) == set(again)  # a record's side depends on its content and the seed, not on the source name


def test_dedup_moves_to_disk_and_gives_the_same_answers(tmp_path: Path) -> None:
    keys = [stream.hash64(str(i % 700)) for i in range(1000)] + [2**64 - 1, 0, 2**64 - 1]
    memory, disk = mix.Seen(tmp_path), mix.Seen(tmp_path, limit=100)
    assert [memory.add(k) for k in keys] == [disk.add(k) for k in keys]
    assert disk.db is not None and (tmp_path / "seen.sqlite").is_file()
    disk.close()


def test_text_sources_become_fully_trained_blocks(smollm2: Path, tmp_path: Path) -> None:
    paragraphs = [f"第{i}段。" + "中国的经济发展很快。" * (i % 9 + 1) for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"文档{i}：人民日报报道了新闻。", "id": i} for i in range(30)] + [{"text": "文档0：人民日报报道了新闻。"}])
    recipe = f"""name: text
base: {{path: {smollm2}}}
data:
  sources: [{{path: corpus.txt}}, {{path: docs.jsonl}}, {{builtin: peoples-daily, samples: 200}}]
  max_length: 64
  eval_ratio: 0.1
"""
    artifact = build(tmp_path, recipe, tmp_path / "b")
    info = artifact.info
    sources_info = info["sources"]
    assert sources_info["corpus.txt"]["kind"] == "text" and sources_info["corpus.txt"]["read"] == 60
    assert sources_info["docs.jsonl"]["duplicates"] == 1
    assert sources_info["peoples-daily"]["train"] + sources_info["peoples-daily"]["eval"] == 200
    assert info["end_of_text"] == "<|endoftext|>"
    eot = 0  # SmolLM2's <|endoftext|>
    rows = pq.read_table(artifact.file("text_train.parquet")).to_pylist()
    assert len(rows) == info["text_train"] and sum(len(r["input_ids"]) for r in rows) == info["text_tokens_train"]
    assert all(len(r["input_ids"]) == 64 for r in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 64
    assert all(r["labels"] == r["input_ids"] and set(r["loss_scale"]) == {1.0} for r in rows)
    documents = sum(s["train"] for s in sources_info.values())
    assert sum(r["input_ids"].count(eot) for r in rows) == documents
    held = pq.read_table(artifact.file("text_eval.parquet")).to_pylist()
    assert held and info["text_eval"] == len(held)
    assert not (artifact.path / "train.parquet").exists() or pq.ParquetFile(artifact.file("train.parquet")).metadata.num_rows == 0


def test_a_gbk_file_is_decoded_when_the_source_says_so(tiny_llama3: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"北京{i}"}, {"role": "assistant", "content": f"首都{i}。"}]} for i in range(5)]
    (tmp_path / "gbk.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("gbk"))
    recipe = f"""name: gbk
base: {{path: {tiny_llama3}, template: llama3}}
data:
  sources: [{{path: gbk.jsonl, encoding: gb18030}}]
  eval_ratio: 0
"""
    artifact = build(tmp_path, recipe, tmp_path / "b")
    lines = [json.loads(x) for x in artifact.file("train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(line["messages"][0]["content"] for line in lines) == [f"北京{i}" for i in range(5)]


@pytest.mark.parametrize("text,error", [("", "empty file"), ("\x00\x01\x02", "looks binary")])
def test_text_files_that_cannot_be_read(tiny_llama3: Path, tmp_path: Path, text: str, error: str) -> None:
    from edgezh.errors import UserError

    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=error):
        list(sources.documents(DataSource(path=str(tmp_path / "c.txt"), format="text")))
