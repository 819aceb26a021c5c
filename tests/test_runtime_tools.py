"""Tools and the tool loop: the safe built-ins, user tools (YAML command argv, Python), the Llama 3.1
and ReAct parsers, and a scripted conversation: tool call → confirmation → result → continuation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgezh.errors import UserError
from edgezh.runtime.calculator import CalculatorError, evaluate
from edgezh.runtime.chat import DECLINED, ChatSession, Delta, StepDone, ToolRequest, ToolResult, TurnDone
from edgezh.runtime.engine import SamplingParams
from edgezh.runtime.toolcalls import interpret, parse_llama31, parse_react, prepare
from edgezh.runtime.tools import ToolCall, Toolbox, builtin_tools, load_tools_file
from test_runtime_fixtures import (ScriptedEngine, engine_for, grammar_for, smollm2_f16_gguf,  # noqa: F401
                                   tiny31_gguf, tiny_gguf)

# --- calculator ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("1+2*3", 7), ("(3+4)*2**3", 56), ("7/2", 3.5), ("7//2", 3), ("-2**2", -4), ("sqrt(16)+abs(-1)", 5),
    ("（3＋4）×2", 14), ("10÷4", 2.5), ("2^10", 1024), ("round(pi, 2)", 3.14), ("max(1, 5, 3)", 5),
])
def test_calculator(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "unknown function|not allowed"), ("open('x')", "unknown function"),
    ("(1).__class__", "not allowed"), ("x + 1", "unknown name"), ("9**9**9", "exponent|too large"),
    ("1/0", "division by zero"), ("[1, 2]", "not allowed"), ("'a' * 3", "only numbers"), ("", "empty"),
    ("factorial(10000)", "factorial"), ("lambda: 1", "not allowed"),
])
def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


# --- built-in tools -----------------------------------------------------------------------------------

def run(toolbox: Toolbox, tool: str, /, **arguments) -> str:
    return toolbox.run(ToolCall(tool, arguments))


def test_unit_conversion() -> None:
    toolbox = Toolbox(builtin_tools())
    assert run(toolbox, "convert_units", value=2, from_unit="斤", to_unit="kg") == "2 斤 = 1 kg"
    assert run(toolbox, "convert_units", value=100, from_unit="C", to_unit="F") == "100 C = 212 F"
    assert run(toolbox, "convert_units", value=1, from_unit="公里", to_unit="里") == "1 公里 = 2 里"
    assert run(toolbox, "convert_units", value=1, from_unit="亩", to_unit="m2").startswith("1 亩 = 666.66")
    assert "cannot convert" in run(toolbox, "convert_units", value=1, from_unit="kg", to_unit="m")
    assert "unknown unit" in run(toolbox, "convert_units", value=1, from_unit="furlong", to_unit="m")


def test_datetime_tool() -> None:
    toolbox = Toolbox(builtin_tools())
    result = json.loads(run(toolbox, "datetime", timezone="Asia/Shanghai"))
    assert result["timezone"] == "Asia/Shanghai" and result["weekday"].startswith("星期")
    assert "+08:00" in result["iso"]
    assert "unknown time zone" in run(toolbox, "datetime", timezone="Mars/Olympus")


def test_arguments_are_checked_against_the_schema() -> None:
    toolbox = Toolbox(builtin_tools())
    assert run(toolbox, "calculator") == "error: calculator: missing argument 'expression'"
    assert "must be number" in run(toolbox, "convert_units", value="two", from_unit="kg", to_unit="g")
    assert "unknown argument 'shell'" in run(toolbox, "calculator", expression="1", shell="rm")
    assert "unknown tool" in run(toolbox, "rm_rf")


def test_note_search_stays_inside_the_sandbox(tmp_path: Path) -> None:
    notes, outside = tmp_path / "notes", tmp_path / "secret"
    (notes / "sub").mkdir(parents=True)
    outside.mkdir()
    (notes / "旅行.md").write_text("# 计划\n周末去杭州看西湖\n", encoding="utf-8")
    (notes / "sub" / "work.txt").write_text("Meeting about 西湖 photos\n", encoding="utf-8")
    (outside / "password.txt").write_text("西湖 password=hunter2\n", encoding="utf-8")
    (notes / "link.txt").symlink_to(outside / "password.txt")
    (notes / "linkdir").symlink_to(outside, target_is_directory=True)
    toolbox = Toolbox(builtin_tools(notes))
    result = run(toolbox, "search_notes", query="西湖")
    assert "旅行.md:2: 周末去杭州看西湖" in result and "sub/work.txt:1" in result
    assert "hunter2" not in result and "password" not in result
    assert run(toolbox, "search_notes", query="nothing-here") == "no matches"
    with pytest.raises(UserError, match="notes folder does not exist"):
        builtin_tools(tmp_path / "missing")


# --- user tools ---------------------------------------------------------------------------------------

def test_yaml_command_tool_fills_argv_without_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "echo_args.py"
    script.write_text("import json, sys; print(json.dumps(sys.argv[1:]))\n")
    tools = tmp_path / "tools.yaml"
    tools.write_text(f"""
tools:
  - name: echo_args
    description: show the arguments
    parameters:
      type: object
      properties:
        text: {{type: string}}
        count: {{type: integer}}
      required: [text]
    command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}, "--text={{text}}", "{{count}}"]
""", encoding="utf-8")
    toolbox = Toolbox(load_tools_file(tools, cwd=tmp_path))
    hostile = "$(touch pwned); `id` && echo 中文 > x"
    assert json.loads(run(toolbox, "echo_args", text=hostile, count=3)) == [f"--text={hostile}", "3"]
    assert json.loads(run(toolbox, "echo_args", text="a")) == ["--text=a"]  # an absent optional argument is left out
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x").exists()


def test_yaml_python_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tools.py").write_text("def greet(name):\n    return {'greeting': f'你好，{name}'}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = tmp_path / "tools.yaml"
    tools.write_text("tools:\n  - name: greet\n    parameters: {type: object, properties: {name: {type: string}}}\n"
                     "    python: my_tools:greet\n", encoding="utf-8")
    assert json.loads(run(Toolbox(load_tools_file(tools)), "greet", name="小明")) == {"greeting": "你好，小明"}


@pytest.mark.parametrize("body, message", [
    ("tools:\n  - name: x\n    command: rm -rf {path}\n", "a shell string is not accepted"),
    ("tools:\n  - name: x\n    command: [cat, '{path}']\n", "not a declared parameter"),
    ("tools:\n  - name: x\n", "exactly one of 'command'"),
    ("tools:\n  - name: x\n    python: nowhere.module:f\n", "cannot load nowhere.module:f"),
    ("tools: {}\n", "top-level 'tools:' list"),
    ("tools:\n  - name: x\n    command: [ls]\n    shell: true\n", "unknown keys shell"),
])
def test_bad_tools_file(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_tools_file(path)


# --- parsers ------------------------------------------------------------------------------------------

def test_parse_llama31_calls() -> None:
    calls = parse_llama31('{"name": "calculator", "parameters": {"expression": "6*7"}}\n'
                          '{"name": "datetime", "parameters": {}}')
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "6*7"}), ("datetime", {})]
    assert parse_llama31('<|python_tag|>{"name": "f", "arguments": "{\\"a\\": 1}"}')[0].arguments == {"a": 1}
    assert parse_llama31("北京是中国的首都。") is None
    assert parse_llama31('{"name": "f", "parameters": {"a": 1}} and some text') is None
    assert parse_llama31('{"not": "a call"}') is None


def test_parse_react() -> None:
    step = parse_react("Thought: 需要计算\nAction: calculator\nAction Input: {\"expression\": \"6*7\"}\n")
    assert step.thought == "需要计算" and step.call.name == "calculator" and step.call.arguments == {"expression": "6*7"}
    bare = parse_react("Action: calculator\nAction Input: 2+3", {"calculator": {"required": ["expression"]}})
    assert bare.call.arguments == {"expression": "2+3"}
    final = parse_react("Thought: 我知道答案了\nFinal Answer: 答案是 42。")
    assert final.final == "答案是 42。" and final.call is None
    assert parse_react("只是普通回答").call is None


def test_prepare_renders_react_for_formats_without_tools() -> None:
    tools = Toolbox(builtin_tools()).schemas()
    messages = [{"role": "system", "content": "系统"}, {"role": "user", "content": "6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    react = prepare(messages, False, tools)
    assert react.dialect == "react" and react.stop == ("Observation:",) and react.tools is None
    assert react.messages[0]["content"].startswith("系统") and "calculator" in react.messages[0]["content"]
    assert react.messages[2]["content"].endswith('Action: calculator\nAction Input: {"expression": "6*7"}')
    assert react.messages[3] == {"role": "user", "content": "Observation: 42"}
    native = prepare(messages, True, tools)
    assert native.dialect == "llama3.1" and native.tools == tools and native.messages == messages
    assert interpret('{"name": "calculator", "parameters": {"expression": "1"}}', native).tool_calls[0].name == "calculator"


# --- the tool loop ------------------------------------------------------------------------------------

CALL = '{"name": "calculator", "parameters": {"expression": "6*7"}}'


def test_tool_loop_llama31_confirm_run_continue(tiny31_gguf: Path, tmp_path: Path) -> None:
    engine = ScriptedEngine(engine_for(tiny31_gguf), [CALL, "6 乘以 7 等于 **42**。"])
    asked: list[ToolCall] = []
    session = ChatSession(engine, toolbox=Toolbox(builtin_tools()), history=tmp_path / "chat.jsonl",
                          confirm=lambda call: asked.append(call) or True)
    events = list(session.run_turn("6 乘以 7 是多少？", SamplingParams(max_tokens=64)))
    kinds = [type(e).__name__ for e in events if not isinstance(e, Delta)]
    assert kinds == ["StepDone", "ToolRequest", "ToolResult", "StepDone", "TurnDone"]
    assert [c.describe() for c in asked] == ['calculator({"expression": "6*7"})']
    result = next(e for e in events if isinstance(e, ToolResult))
    assert result.result == "42" and result.ran
    assert isinstance(events[-1], TurnDone) and events[-1].text == "6 乘以 7 等于 **42**。"
    # the second prompt carried the call and its result the way the llama3.1 template renders them
    second = engine.engine.render(engine.prompts[1], Toolbox(builtin_tools()).schemas())
    assert '{"name": "calculator", "parameters": {"expression":"6*7"}}<|eom_id|>' in second
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>" in second
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    saved = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    assert saved[0]["type"] == "edgezh-chat" and saved[-1]["content"] == "6 乘以 7 等于 **42**。"


def test_tool_loop_declined_call_is_not_run(tiny31_gguf: Path) -> None:
    ran = []
    toolbox = Toolbox(builtin_tools())
    original = toolbox.tools["calculator"]
    toolbox.tools["calculator"] = type(original)(original.name, original.description, original.parameters,
                                                 lambda arguments: ran.append(arguments) or "42")
    engine = ScriptedEngine(engine_for(tiny31_gguf), [CALL, "好的，不用工具：42。"])
    session = ChatSession(engine, toolbox=toolbox, confirm=lambda call: False)
    events = list(session.run_turn("6*7?", SamplingParams(max_tokens=64)))
    result = next(e for e in events if isinstance(e, ToolResult))
    assert not result.ran and result.result == DECLINED and ran == []
    assert events[-1].text == "好的，不用工具：42。"


def test_tool_loop_unknown_tool_is_reported_to_the_model(tiny31_gguf: Path) -> None:
    engine = ScriptedEngine(engine_for(tiny31_gguf), ['{"name": "rm", "parameters": {"path": "/"}}', "抱歉。"])
    asked = []
    session = ChatSession(engine, toolbox=Toolbox(builtin_tools()), confirm=lambda call: asked.append(call) or True)
    events = list(session.run_turn("删除所有文件", SamplingParams(max_tokens=64)))
    assert asked == [] and not any(isinstance(e, ToolRequest) for e in events)
    assert next(e for e in events if isinstance(e, ToolResult)).result.startswith("error: unknown tool 'rm'")


def test_tool_loop_react_on_a_real_model(smollm2_f16_gguf: Path) -> None:
    """SmolLM2 (ChatML, no native tools) is steered by a grammar to write a ReAct step; llama.cpp stops at
    'Observation:', the calculator runs after confirmation, and the model writes the final answer."""
    real = engine_for(smollm2_f16_gguf)
    script = iter(['Thought: 需要计算。\nAction: calculator\nAction Input: {"expression": "6*7"}\nObservation:',
                   "Thought: 我知道答案了\nFinal Answer: 42"])

    class Steered:
        def __getattr__(self, name):
            return getattr(real, name)

        def chat(self, messages, params, **kwargs):
            return real.chat(messages, params.__class__(**{**params.__dict__, "grammar": grammar_for(next(script))}),
                             **kwargs)

    calculator = [tool for tool in builtin_tools() if tool.name == "calculator"]
    session = ChatSession(Steered(), system="你是助手。", toolbox=Toolbox(calculator), confirm=lambda call: True)
    events = list(session.run_turn("6 乘以 7 是多少？", SamplingParams(max_tokens=64, temperature=0)))
    steps = [e for e in events if isinstance(e, StepDone)]
    assert steps[0].tool_calls[0].arguments == {"expression": "6*7"}
    assert steps[0].stats.finish_reason == "stop"  # stopped at the stop string, not by length
    assert next(e for e in events if isinstance(e, ToolResult)).result == "42"
    assert events[-1].text == "42"
    assert session.messages[-2] == {"role": "tool", "tool_call_id": steps[0].tool_calls[0].id, "name": "calculator",
                                    "content": "42"}
