"""The bad-data corpus, through the CLI as a user meets it.

Each case writes one bad file beside a good one. With ``on_error: fail`` the build exits 2 with one
clear message naming the place (file:line, record, row) and the reason, no traceback, and no data
artifact left behind. With ``on_error: skip`` malformed records are dropped and counted per reason in
stats.json and the manifest — or, where nothing can be skipped (an unreadable file, an unknown format,
an unreachable hub, everything too long), the same clear exit 2. Never a crash.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgezh.cli import main

GOOD = [{"messages": [{"role": "user", "content": f"你好{i}"}, {"role": "assistant", "content": f"你好！{i}"}]} for i in range(4)]


def line(record) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def chat(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass
class Case:
    id: str
    file: str
    content: bytes | str | None  # None: no file (hub)
    fail: list[str]  # substrings of the error with on_error: fail ("{file}" = the bad file's path)
    skipped: dict[str, int] | None = None  # reason → count with on_error: skip; None: fails in skip mode too
    source: dict = field(default_factory=dict)  # extra source keys
    data: dict = field(default_factory=dict)  # extra data keys


OK1 = chat(("user", "一"), ("assistant", "二"))
CASES = [
    Case("wrong-columns", "qa.jsonl", line({"question": "q", "answer": "a"}) * 2,
         ["{file}", "cannot tell the data format", "found: answer, question", "alpaca: `instruction` and `output`"]),
    Case("empty-file", "empty.jsonl", "", ["{file}: empty file (no records)"]),
    Case("blank-file", "blank.jsonl", "\n  \n", ["{file}: empty file (no records)"]),
    Case("binary-file", "model.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ["{file}: looks binary (NUL bytes"]),
    Case("gbk-file", "gbk.jsonl", line(chat(("user", "你好，请介绍一下北京。"), ("assistant", "北京是中国的首都，有很多名胜古迹。"))).encode("gbk") * 3,
         ["{file}: not UTF-8 text", "looks like GBK/GB18030 Chinese text", "encoding: gb18030"]),
    Case("bad-line-in-the-middle", "mid.jsonl", line(OK1) * 700 + "{broken\n" + line(chat(("user", "三"), ("assistant", "四"))) * 700,
         ["{file}:701: invalid JSON", "bad_json"], {"bad_json": 1}),
    Case("bad-json-line", "lines.jsonl", line(OK1) + line(OK1 | {"x": 1}) + '{"messages": [\n',
         ["{file}:3: invalid JSON", "bad_json"], {"bad_json": 1}),
    Case("broken-json-document", "doc.json", '[\n  {"messages": []},\n  {"messages": ]\n]\n',
         ["{file}:3:16: invalid JSON"]),
    Case("missing-roles", "noroles.jsonl", line(OK1) + line({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}),
         ["{file}:2: message 1 has no `role`", "missing_roles"], {"missing_roles": 1}),
    Case("unknown-role", "roles.jsonl", line(chat(("user", "a"), ("bot", "b"))),
         ["{file}:1: message 2: unknown role 'bot'", "unknown_role"], {"unknown_role": 1}),
    Case("alternation", "alt.jsonl", line(OK1) + line(chat(("user", "a"), ("user", "b"), ("assistant", "c"))),
         ["{file}:2: message 2: user turn after a user turn", "alternation"], {"alternation": 1}),
    Case("last-not-assistant", "last.jsonl", line(chat(("user", "a"), ("assistant", "b"), ("user", "c"))),
         ["{file}:1: the last turn is user", "last_not_assistant"], {"last_not_assistant": 1}),
    Case("empty-content", "emptyc.jsonl", line(chat(("user", "a"), ("assistant", "  "))),
         ["{file}:1: message 2 (assistant) has empty content", "empty_content"], {"empty_content": 1}),
    Case("system-in-the-middle", "sys.jsonl", line(chat(("user", "a"), ("system", "s"), ("assistant", "b"))),
         ["{file}:1: message 2: a system message may only come first"], {"system_position": 1}),
    Case("tool-result-without-call", "tool.jsonl", line(chat(("user", "a"), ("tool", "42"), ("assistant", "b"))),
         ["{file}:1: message 2: a tool result must follow an assistant tool call"], {"tool_result_without_call": 1}),
    Case("tools-in-a-format-without-tools", "calls.jsonl",
         line({"messages": [{"role": "user", "content": "a"},
                            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]}),
         ["{file}:1: uses tools, which the chat format 'llama3' cannot render"], {"tools_unsupported": 1}),
    Case("control-token-in-text", "ctl.jsonl", line(chat(("user", "a<|eot_id|>"), ("assistant", "b"))),
         ["{file}:1: message 1 contains the special token '<|eot_id|>' as text"], {"control_token": 1}),
    Case("dpo-identical", "pairs.jsonl", line({"prompt": "p", "chosen": "same", "rejected": "same"})
         + line({"prompt": "p", "chosen": "好", "rejected": "good"}),
         ["{file}:1: chosen and rejected are identical", "identical_pair"], {"identical_pair": 1}),
    Case("bad-tool-call-json", "badcall.jsonl",
         line({"messages": [{"role": "user", "content": "a"},
                            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
                            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]}),
         ["{file}:1: message 2: arguments of 'f' are not valid JSON"], {"bad_tool_call": 1}),
    Case("not-an-object", "list.jsonl", line(OK1) + line([1, 2]), ["{file}:2: a record must be an object, got list"], {"not_an_object": 1}),
    Case("csv-without-headers", "qa.csv", "q,a\nx,y\nz,w\n",
         ["{file}:2: no `instruction`, `output` (found: a, q; alpaca expects"], {"missing_columns": 2}, {"format": "alpaca"}),
    Case("csv-extra-field", "extra.csv", "instruction,input,output\na,,b\nc,,d,e\n", ["{file}:3: row has 4 fields, the header has 3"], {"bad_csv": 1}),
    Case("parquet-wrong-types", "types.parquet", parquet_bytes(pa.table({"instruction": ["a", "b"], "output": [1, 2]})),
         ["{file} row 1: `output` must be text, got int", "wrong_type"], {"wrong_type": 2}),
    Case("not-parquet", "fake.parquet", b"PAR1 this is not parquet", ["{file}: not a readable Parquet file"]),
    Case("not-utf8", "latin.jsonl", "é".encode("latin-1") + b"\n", ["{file}: not UTF-8 text"]),
    Case("unknown-extension", "data.xml", "hello", ["{file}: unknown file type '.xml'"]),
    Case("hub-offline-not-cached", "", None, ["hub dataset nobody-edgezh/missing-set:train cannot be loaded", "HF_HUB_OFFLINE is set"],
         source={"hub": "nobody-edgezh/missing-set"}),
    Case("all-too-long", "long.jsonl", line(chat(("user", "讲故事"), ("assistant", "很久很久以前" * 20))),
         ["no training SFT examples left", "data.max_length=30"], None, data={"max_length": 30}),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builds")


def recipe_for(case: Case, folder: Path, tiny_llama3: Path, on_error: str) -> Path:
    (folder / "good.jsonl").write_text("".join(line(r) for r in GOOD), encoding="utf-8")
    if case.content is not None:
        target = folder / case.file
        target.write_bytes(case.content if isinstance(case.content, bytes) else case.content.encode("utf-8"))
    bad = dict(case.source) if case.content is None else {"path": case.file, **case.source}
    data = {"sources": [{"path": "good.jsonl"}, bad], "on_error": on_error, "eval_ratio": 0.0, **case.data}
    if case.id == "all-too-long":
        data["sources"] = [bad]
    recipe = folder / f"{on_error}.yaml"
    recipe.write_text(json.dumps({"name": "bad", "base": {"path": str(tiny_llama3), "template": "llama3"}, "data": data}), encoding="utf-8")
    return recipe


def build(recipe: Path, root: Path, capsys) -> tuple[int, str]:
    code = main(["build", str(recipe), "--until", "data", f"output.root={root}"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data(case: Case, tiny_llama3: Path, root: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path
    artifact = root / "bad" / "02-data"
    shutil.rmtree(artifact, ignore_errors=True)

    code, err = build(recipe_for(case, folder, tiny_llama3, "fail"), root, capsys)
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    for expected in case.fail:
        assert expected.replace("{file}", str(folder / case.file)) in err, err
    assert not artifact.exists() and not artifact.with_name("02-data.tmp").exists()

    code, err = build(recipe_for(case, folder, tiny_llama3, "skip"), root, capsys)
    assert "Traceback" not in err
    if case.skipped is None:
        assert code == 2 and case.fail[0].replace("{file}", str(folder / case.file)) in err, err
        assert not artifact.exists()
        return
    assert code == 0, err
    stats = json.loads((artifact / "stats.json").read_text(encoding="utf-8"))
    bad_name = case.file
    assert stats["sources"][bad_name]["skipped"] == case.skipped
    assert stats["totals"]["skipped_by_reason"] == case.skipped
    assert stats["sources"]["good.jsonl"]["train"] == len(GOOD)
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["info"]["sources"][bad_name]["skipped"] == case.skipped
    kept = stats["sources"][bad_name]["valid"]
    assert kept == stats["sources"][bad_name]["read"] - sum(case.skipped.values())


def test_unknown_format_value_is_a_recipe_error(tiny_llama3: Path, root: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "good.jsonl").write_text("".join(line(r) for r in GOOD), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: bad\nbase: {{path: {tiny_llama3}}}\ndata:\n  sources:\n    - path: good.jsonl\n      format: chatgpt\n",
                      encoding="utf-8")
    code, err = build(recipe, root, capsys)
    assert code == 2 and "Traceback" not in err
    assert "r.yaml:6" in err and "data.sources.0.format" in err and "'messages'" in err and "'sharegpt'" in err


def test_many_problems_are_listed_once_with_a_count(tiny_llama3: Path, root: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "good.jsonl").write_text("".join(line(r) for r in GOOD), encoding="utf-8")
    lines = [line(chat(("user", "a"), ("user", "b"), ("assistant", "c")))] * 12 + ["{oops\n"] * 3
    (tmp_path / "many.jsonl").write_text("".join(lines), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "bad", "base": {"path": str(tiny_llama3)},
                                  "data": {"sources": [{"path": "good.jsonl"}, {"path": "many.jsonl"}]}}), encoding="utf-8")
    code, err = build(recipe, root, capsys)
    assert code == 2
    assert "15 malformed record(s)" in err and f"{tmp_path / 'many.jsonl'}:10:" in err
    assert f"{tmp_path / 'many.jsonl'}:11:" not in err  # only the first ten are shown
    assert "and 5 more (alternation: 12, bad_json: 3)" in err
