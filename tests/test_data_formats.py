"""Readers: small files in every layout and container (JSON, JSONL, Parquet, CSV) → the expected conversations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgezh import templates
from edgezh.data import formats, sources
from edgezh.data.conversation import ControlTokens, Conversation, Pair, Span
from edgezh.data.problems import Problems
from edgezh.errors import UserError
from edgezh.recipe import DataSource

CONTROL = ControlTokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"])
WEATHER = {"type": "function", "function": {"name": "weather", "description": "查询天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def load(path: Path, fmt: str = "auto", template: str = "llama3.1", on_error: str = "fail"):
    problems = Problems(on_error)
    loaded = sources.load(DataSource(path=str(path), format=fmt), path.name, templates.get(template), CONTROL, problems, 0)
    problems.check()
    return loaded, problems


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def call(name, **arguments):
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def test_openai_messages_jsonl_with_tools(tmp_path: Path) -> None:
    record = {"messages": [{"role": "system", "content": "你是助手。"}, user("北京天气？"),
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"北京\"}"}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": {"sky": "晴"}}, assistant("晴天。")],
              "tools": [WEATHER]}
    loaded, _ = load(write_jsonl(tmp_path / "m.jsonl", [record, {"messages": [user("你好"), assistant("你好！")]}]))
    assert loaded.format == "function_calling" and loaded.kind == "sft" and loaded.read == 2
    first, second = loaded.conversations
    assert first.messages == [{"role": "system", "content": "你是助手。"}, user("北京天气？"), call("weather", city="北京"),
                              {"role": "tool", "content": '{"sky":"晴"}'}, assistant("晴天。")]
    assert first.tools == [WEATHER] and first.origin.endswith("m.jsonl:1")
    assert second.messages == [user("你好"), assistant("你好！")] and second.tools is None
    assert first.source == "m.jsonl"


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_list_or_data_object(tmp_path: Path, wrapped: bool) -> None:
    records = [{"messages": [user("一"), assistant("二")]}, {"messages": [user("三"), assistant("四")]}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"data": records} if wrapped else records, ensure_ascii=False), encoding="utf-8")
    loaded, _ = load(path)
    assert loaded.format == "messages"
    assert [c.messages for c in loaded.conversations] == [r["messages"] for r in records]
    assert loaded.conversations[1].origin.endswith("m.json record 2")


def test_jsonl_named_json_is_read_as_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"messages": [user("一"), assistant("二")]}] * 2)
    loaded, _ = load(path)
    assert len(loaded.conversations) == 2 and loaded.conversations[1].origin.endswith("lines.json:2")


def test_sharegpt_with_function_call_and_observation(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "human", "value": "上海天气？"},
                                {"from": "function_call", "value": "{\"name\": \"weather\", \"arguments\": {\"city\": \"上海\"}}"},
                                {"from": "observation", "value": "{\"sky\": \"雨\"}"},
                                {"from": "gpt", "value": "下雨。"}],
              "system": "你是天气助手。", "tools": json.dumps([WEATHER["function"]], ensure_ascii=False)}
    plain = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps([record, plain], ensure_ascii=False), encoding="utf-8")
    loaded, _ = load(path)
    assert loaded.format == "function_calling"  # a tools column and function_call turns
    assert loaded.conversations[0].messages == [{"role": "system", "content": "你是天气助手。"}, user("上海天气？"),
                                                call("weather", city="上海"), {"role": "tool", "content": "{\"sky\": \"雨\"}"},
                                                assistant("下雨。")]
    assert loaded.conversations[0].tools == [WEATHER]
    loaded, _ = load(path, fmt="sharegpt")
    assert loaded.conversations[1].messages == [user("你好"), assistant("你好！")]


def test_plain_sharegpt_is_detected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "简短回答。"},
                                                                 {"from": "human", "value": "天空什么颜色？"},
                                                                 {"from": "gpt", "value": "蓝色。"}]}])
    loaded, _ = load(path)
    assert loaded.format == "sharegpt"
    assert loaded.conversations[0].messages == [{"role": "system", "content": "简短回答。"}, user("天空什么颜色？"), assistant("蓝色。")]


def test_alpaca_csv(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow(["翻译成英文", "你好", "Hello"])
        writer.writerow(["写一句话，\n关于春天", "", "春天来了。"])  # a quoted field over two lines
        writer.writerow(["说再见", "", "再见！"])
    loaded, _ = load(path)
    assert loaded.format == "alpaca"
    assert [c.messages for c in loaded.conversations] == [
        [user("翻译成英文\n你好"), assistant("Hello")],
        [user("写一句话，\n关于春天"), assistant("春天来了。")],
        [user("说再见"), assistant("再见！")],
    ]
    # the line each record starts on (the header is line 1; record 2 spans lines 3–4)
    assert [c.origin.rsplit(":", 1)[1] for c in loaded.conversations] == ["2", "3", "5"]


def test_alpaca_parquet_with_history_and_system(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"instruction": ["再说一个"], "input": [None], "output": ["三"], "system": ["数数"],
                             "history": [[["说一个数", "一"], ["再说一个", "二"]]]}), path)
    loaded, _ = load(path)
    assert loaded.conversations[0].messages == [{"role": "system", "content": "数数"}, user("说一个数"), assistant("一"),
                                                user("再说一个"), assistant("二"), user("再说一个"), assistant("三")]
    assert loaded.conversations[0].origin.endswith("a.parquet row 1")


def test_dpo_strings_and_conversations(tmp_path: Path) -> None:
    records = [
        {"prompt": "你好吗？", "chosen": "我很好。", "rejected": "I am fine."},
        # conversations that repeat the prompt are cut after it
        {"prompt": [user("天气？")], "chosen": [user("天气？"), assistant("晴。")], "rejected": [user("天气？"), assistant("Sunny.")]},
        # no prompt: the shared first turns are the prompt
        {"chosen": [{"role": "system", "content": "中文"}, user("早"), assistant("早上好！")],
         "rejected": [{"role": "system", "content": "中文"}, user("早"), assistant("Good morning!")]},
    ]
    loaded, _ = load(write_jsonl(tmp_path / "p.jsonl", records))
    assert loaded.kind == "pairs" and loaded.format == "dpo"
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [
        ([user("你好吗？")], [assistant("我很好。")], [assistant("I am fine.")]),
        ([user("天气？")], [assistant("晴。")], [assistant("Sunny.")]),
        ([{"role": "system", "content": "中文"}, user("早")], [assistant("早上好！")], [assistant("Good morning!")]),
    ]


def test_dpo_parquet_with_message_lists(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["你是谁？"], "chosen": [[assistant("我是助手。")]], "rejected": [[assistant("I'm an assistant.")]]}), path)
    loaded, _ = load(path)
    assert loaded.pairs[0].chosen == [assistant("我是助手。")] and loaded.pairs[0].prompt == [user("你是谁？")]


def test_agent_flan_react_keeps_text_and_records_spans(tmp_path: Path) -> None:
    reply = "Thought: 需要查询\nAction: weather\nAction Input: {\"city\": \"北京\"}"
    record = {"id": "x", "conversation": [
        {"role": "system", "content": "你可以使用工具。", "loss": False},
        {"role": "user", "content": "北京天气？", "loss": False},
        {"role": "assistant", "content": reply, "loss": True},
        {"role": "user", "content": "Observation: 晴", "loss": False},
        {"role": "assistant", "content": "Thought: 好了\nFinal Answer: 晴天。", "loss": True}]}
    loaded, _ = load(write_jsonl(tmp_path / "agent.jsonl", [record]), template="llama3")  # text: fine without tools
    assert loaded.format == "react"
    conversation = loaded.conversations[0]
    assert conversation.messages[2] == assistant(reply) and conversation.messages[3] == user("Observation: 晴")
    assert conversation.spans == [Span(2, 0, 13, "thought"), Span(2, 14, 29, "action"), Span(2, 30, 58, "action_input"),
                                  Span(4, 0, 11, "thought"), Span(4, 12, 29, "final_answer")]
    assert reply[30:58] == "Action Input: {\"city\": \"北京\"}" and reply[14:29] == "Action: weather"


def test_hermes_function_calling(tmp_path: Path) -> None:
    system = ("You are a function calling AI model. <tools> [" + json.dumps(WEATHER, ensure_ascii=False) + "] </tools> "
              "Use <tool_call></tool_call> tags.")
    record = {"conversations": [
        {"from": "system", "value": system},
        {"from": "human", "value": "广州天气？"},
        {"from": "gpt", "value": "<tool_call>\n{'arguments': {'city': '广州'}, 'name': 'weather'}\n</tool_call>"},
        {"from": "tool", "value": "<tool_response>\n{\"sky\": \"多云\"}\n</tool_response>"},
        {"from": "gpt", "value": "多云。"}]}
    loaded, _ = load(write_jsonl(tmp_path / "hermes.jsonl", [record]))
    assert loaded.format == "function_calling"
    conversation = loaded.conversations[0]
    assert conversation.tools == [WEATHER]
    assert conversation.messages == [user("广州天气？"), call("weather", city="广州"),
                                     {"role": "tool", "content": "{\"sky\": \"多云\"}"}, assistant("多云。")]


def test_glaive_function_calling(tmp_path: Path) -> None:
    record = {"system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
                        + json.dumps(WEATHER["function"], indent=4, ensure_ascii=False),
              "chat": "USER: 深圳天气？\n\n\nASSISTANT: <functioncall> {\"name\": \"weather\", \"arguments\": '{\"city\": \"深圳\"}'} <|endoftext|>\n\n\n"
                      "FUNCTION RESPONSE: {\"sky\": \"晴\"}\n\n\nASSISTANT: 深圳晴。 <|endoftext|>\n"}
    loaded, _ = load(write_jsonl(tmp_path / "glaive.jsonl", [record]))
    conversation = loaded.conversations[0]
    assert conversation.tools == [WEATHER]
    assert conversation.messages == [user("深圳天气？"), call("weather", city="深圳"), {"role": "tool", "content": "{\"sky\": \"晴\"}"},
                                     assistant("深圳晴。")]


@pytest.mark.parametrize("columns, expected", [
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "dpo"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"system": "SYSTEM: x", "chat": "USER: a ASSISTANT: b"}, "function_calling"),
    ({"messages": [user("a"), assistant("b")]}, "messages"),
    ({"conversation": [user("a"), assistant("b")]}, "messages"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
    ({"messages": [user("a"), assistant("Action: x\nAction Input: {}")]}, "react"),
    ({"messages": [user("a"), assistant("<tool_call>{}</tool_call>")]}, "function_calling"),
    ({"messages": [user("a"), assistant("b")], "tools": [WEATHER]}, "function_calling"),
])
def test_detection_rules(columns: dict, expected: str) -> None:
    assert formats.detect([columns], "f") == expected


def test_detection_failure_names_found_columns_and_expectations() -> None:
    with pytest.raises(UserError) as info:
        formats.detect([{"question": "a", "answer": "b"}], "qa.jsonl")
    message = str(info.value)
    assert "qa.jsonl" in message and "found: answer, question" in message
    assert "alpaca: `instruction` and `output`" in message and "dpo: `chosen` and `rejected`" in message


def test_records_are_the_conversation_type(tmp_path: Path) -> None:
    loaded, _ = load(write_jsonl(tmp_path / "m.jsonl", [{"messages": [user("a"), assistant("b")]}]))
    assert isinstance(loaded.conversations[0], Conversation) and not isinstance(loaded.conversations[0], Pair)
    assert loaded.conversations[0].to_json() == {"messages": [user("a"), assistant("b")], "source": "m.jsonl"}
