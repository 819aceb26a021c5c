"""Tool calls in model output, and the prompt layout that asks for them.

Two dialects:

- **Llama 3.1 JSON** (format `llama3.1`, whose template renders `tools`): the model answers
  `{"name": ..., "parameters": {...}}`, one call per line, and ends the turn with `<|eom_id|>`
  (some models end with `<|eot_id|>`; a reply that is nothing but calls is read as calls either
  way). `<|python_tag|>` before the JSON is accepted.
- **ReAct** (every other format): the system prompt lists the tools and asks for
  `Thought: … / Action: name / Action Input: {json}`; generation stops at `Observation:`, the tool
  result comes back as a user turn `Observation: …`, and `Final Answer: …` ends the loop.

A conversation is kept in OpenAI form (assistant `tool_calls`, `tool` results) whatever the
format; `prepare` turns it into what the format's template renders.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgezh.runtime.tools import ToolCall

PYTHON_TAG = "<|python_tag|>"
REACT_STOP = "Observation:"

REACT_INSTRUCTIONS = """你可以使用下列工具（You can use these tools）：

{tools}

需要使用工具时，严格按照下面的格式回复，然后停下等待结果：
Thought: 你的思考
Action: 工具名，必须是 [{names}] 之一
Action Input: 工具参数，一个 JSON 对象

工具结果会以 "Observation: ..." 的形式给你。知道答案后，这样回复：
Thought: 我知道答案了
Final Answer: 给用户的最终回答"""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _arguments(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _call_from_object(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        return _call_from_object(obj["function"])
    arguments = _arguments(obj.get("parameters", obj.get("arguments", {})))
    if arguments is None:
        return None
    return ToolCall(obj["name"], arguments, new_call_id())


def parse_llama31(text: str) -> list[ToolCall] | None:
    """The calls in a Llama 3.1 reply, or None when the reply is not (only) tool calls."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    try:
        objects = [json.loads(body)]
    except json.JSONDecodeError:
        objects = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError:
                return None
    calls = [_call_from_object(obj) for obj in objects]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


@dataclass
class ReactStep:
    thought: str = ""
    call: ToolCall | None = None
    final: str | None = None
    text: str = ""
    """The whole reply, stripped."""


_FINAL = re.compile(r"Final Answer\s*[:：]\s*", re.I)
_ACTION = re.compile(r"^\s*Action\s*[:：]\s*(.+?)\s*$", re.M | re.I)
_INPUT = re.compile(r"^\s*Action Input\s*[:：]\s*", re.M | re.I)
_THOUGHT = re.compile(r"Thought\s*[:：]\s*(.*?)(?=^\s*(?:Action|Final Answer)\s*[:：]|\Z)", re.S | re.M | re.I)


def parse_react(text: str, tool_parameters: dict[str, dict[str, Any]] | None = None) -> ReactStep:
    """A ReAct reply: a final answer, a tool call, or (neither) plain text."""
    step = ReactStep(text=text.strip())
    thought = _THOUGHT.search(text)
    if thought:
        step.thought = thought.group(1).strip()
    final = _FINAL.search(text)
    action = _ACTION.search(text)
    if final and (not action or final.start() < action.start()):
        step.final = text[final.end():].strip()
        return step
    if not action:
        return step
    name = action.group(1).strip().strip("`'\"[]")
    after = text[action.end():]
    given = _INPUT.search(after)
    raw = after[given.end():].strip() if given else ""
    raw = raw.split(REACT_STOP)[0].strip().strip("`").removeprefix("json").strip()
    arguments = _react_arguments(raw, (tool_parameters or {}).get(name))
    step.call = ToolCall(name, arguments, new_call_id())
    return step


def _react_arguments(raw: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    if raw:
        decoder = json.JSONDecoder()
        try:
            value, _ = decoder.raw_decode(raw)
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
    # A bare value for a tool with one required parameter: `Action Input: 2+3` for the calculator.
    required = (schema or {}).get("required") or list((schema or {}).get("properties") or {})
    if raw and len(required) == 1:
        return {required[0]: raw.splitlines()[0].strip().strip("\"'")}
    return {"input": raw} if raw else {}


def react_system(tools: list[dict[str, Any]], system: str | None) -> str:
    """The system prompt with the ReAct instructions and one line per tool."""
    lines, names = [], []
    for tool in tools:
        function = tool.get("function", tool)
        names.append(function["name"])
        parameters = json.dumps(function.get("parameters") or {}, ensure_ascii=False, separators=(",", ":"))
        lines.append(f"- {function['name']}: {function.get('description', '')} 参数 (JSON schema): {parameters}")
    block = REACT_INSTRUCTIONS.format(tools="\n".join(lines), names=", ".join(names))
    return f"{system}\n\n{block}" if system else block


def _react_assistant(message: dict[str, Any]) -> str:
    parts = [message["content"].strip()] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        if not any(part.lstrip().startswith("Thought") or "Action:" in part for part in parts):
            parts.append("Thought: 我需要使用工具。")
        parts.append(f"Action: {function['name']}\nAction Input: {arguments}")
    return "\n".join(parts)


@dataclass
class Prepared:
    """What to hand the engine for one generation."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    stop: tuple[str, ...] = ()
    dialect: str | None = None
    """"llama3.1", "react" or None (no tools)."""
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


def prepare(messages: list[dict[str, Any]], format_supports_tools: bool,
            tools: list[dict[str, Any]] | None) -> Prepared:
    """OpenAI-form messages (+ tool declarations) → the messages, tools and stop strings to render."""
    parameters = {t.get("function", t)["name"]: t.get("function", t).get("parameters") or {} for t in tools or []}
    if format_supports_tools:  # the template renders tools itself; a call turn carries no text there
        out = [{**m, "content": None} if m.get("role") == "assistant" and m.get("tool_calls") else m for m in messages]
        return Prepared(out, tools or None, (), "llama3.1" if tools else None, parameters)
    uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not uses_tools:
        return Prepared(list(messages))
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": _react_assistant(message)})
        elif role in ("tool", "ipython"):
            content = message.get("content")
            content = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            out.append({"role": "user", "content": f"{REACT_STOP} {content}"})
        else:
            out.append(dict(message))
    if tools:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": react_system(tools, out[0].get("content"))}
        else:
            out.insert(0, {"role": "system", "content": react_system(tools, None)})
    return Prepared(out, None, (REACT_STOP,) if tools else (), "react" if tools else None, parameters)


@dataclass
class Reply:
    """A finished generation read as the assistant's turn."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    message: dict[str, Any] = field(default_factory=dict)
    """The assistant message to append to the conversation (OpenAI form)."""


def interpret(text: str, prepared: Prepared) -> Reply:
    """Read the model's reply: tool calls (in the prepared dialect) or the answer."""
    if prepared.dialect == "llama3.1":
        calls = parse_llama31(text)
        if calls:
            return Reply("", calls, {"role": "assistant", "content": None, "tool_calls": [openai_call(c) for c in calls]})
    elif prepared.dialect == "react":
        step = parse_react(text, prepared.parameters)
        if step.final is not None:
            return Reply(step.final, [], {"role": "assistant", "content": step.final})
        if step.call is not None:
            thought = step.thought or ""
            message = {"role": "assistant", "content": f"Thought: {thought}" if thought else None,
                       "tool_calls": [openai_call(step.call)]}
            return Reply(thought, [step.call], message)
    return Reply(text, [], {"role": "assistant", "content": text})


def openai_call(call: ToolCall, *, arguments_as_string: bool = False) -> dict[str, Any]:
    arguments: Any = json.dumps(call.arguments, ensure_ascii=False) if arguments_as_string else call.arguments
    return {"id": call.id or new_call_id(), "type": "function", "function": {"name": call.name, "arguments": arguments}}
