"""Agent data: ReAct text spans, and hermes / glaive tool-call markup turned into structured tool calls.

ReAct (Agent-FLAN, LangChain): assistant turns hold lines ``Thought: …``, ``Action: …``,
``Action Input: …``, ``Final Answer: …`` and observations come back as user turns ``Observation: …``.
The text stays as it is (every chat format can render it); `react_spans` records which characters of
each assistant turn are which field, so `loss_scale` can weight them.

Function calling:

- hermes: tools as JSON inside ``<tools>…</tools>`` in the system turn; calls as
  ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` in assistant turns (JSON or Python-literal
  dicts); results as ``<tool_response>…</tool_response>`` in tool (or user) turns.
- glaive: a ``system`` string ``SYSTEM: … -`` followed by tool JSON objects, and a ``chat`` string of
  ``USER:`` / ``ASSISTANT:`` / ``FUNCTION RESPONSE:`` turns, calls written
  ``<functioncall> {"name": …, "arguments": '{…}'}``.

A system turn that carried the tool list is dropped once the tools are extracted: it only explains the
dataset's own call syntax, which the chat format replaces with its own.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from edgezh.data.conversation import RecordError, Span, normalise_tools, tool_call

_FIELD = re.compile(r"^[ \t]*(Thought|Action Input|Action|Observation|Final Answer)[ \t]*[:：]", re.M)
_FIELD_NAMES = {"Thought": "thought", "Action": "action", "Action Input": "action_input",
                "Observation": "observation", "Final Answer": "final_answer"}
_ACTION = re.compile(r"^[ \t]*Action[ \t]*[:：]", re.M)
_ACTION_INPUT = re.compile(r"^[ \t]*Action Input[ \t]*[:：]", re.M)
TOOL_TAGS = ("<tool_call>", "<tools>", "<tool_response>", "<functioncall>")
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_TOOL_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)
_TOOLS = re.compile(r"<tools>(.*?)</tools>", re.S)
_GLAIVE_TURN = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE)\s*:", re.S)
_GLAIVE_END = "<|endoftext|>"


def is_react(text: str) -> bool:
    """An assistant text with both an ``Action:`` line and an ``Action Input:`` line."""
    return bool(_ACTION.search(text)) and bool(_ACTION_INPUT.search(text))


def field_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, field)`` for each ReAct field of ``text``: from its label to the next label
    (trailing whitespace excluded)."""
    matches = list(_FIELD.finditer(text))
    spans = []
    for k, match in enumerate(matches):
        start = match.start(1)
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end, _FIELD_NAMES[match.group(1)]))
    return spans


def react_spans(messages: list[dict[str, Any]]) -> list[Span]:
    """Field spans of every assistant text turn, relative to its stripped content."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message.get("tool_calls"):
            spans += [Span(i, s, e, f) for s, e, f in field_spans(message["content"].strip())]
    return spans


def has_tool_markup(text: str) -> bool:
    return any(tag in text for tag in TOOL_TAGS)


def loads_lenient(text: str, what: str) -> Any:
    """JSON, glaive's ``"arguments": '{…}'`` quoting, or a Python-literal dict (hermes)."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    fixed = re.sub(r"'(\{.*\})'", r"\1", text, flags=re.S)
    try:
        return json.loads(fixed)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise RecordError("bad_tool_call", f"{what} is neither JSON nor a Python literal: {text[:80]!r}") from None


def _calls_from(blocks: list[str], where: str) -> list[dict[str, Any]]:
    calls = []
    for block in blocks:
        data = loads_lenient(block, f"{where}: tool call")
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict):
                raise RecordError("bad_tool_call", f"{where}: a tool call must be an object")
            calls.append(tool_call(item.get("name"), item.get("arguments", item.get("parameters")), where))
    return calls


def _tools_from(block: str, where: str) -> list[dict[str, Any]]:
    """Tool schemas from a ``<tools>`` block or glaive's system text: one JSON list, or objects in a row."""
    decoder, tools, pos, text = json.JSONDecoder(), [], 0, block.strip()
    try:
        parsed = loads_lenient(text, f"{where}: tools")
        tools = parsed if isinstance(parsed, list) else [parsed]
    except RecordError:
        while pos < len(text):
            start = text.find("{", pos)
            if start < 0:
                break
            try:
                obj, pos = decoder.raw_decode(text, start)
            except ValueError as exc:
                raise RecordError("bad_tools", f"{where}: tool schema is not valid JSON ({exc})") from None
            tools.append(obj)
    return normalise_tools(tools) or []


def function_calling(messages: list[dict[str, Any]], tools: list | None) -> tuple[list[dict[str, Any]], list | None]:
    """Hermes markup → tool calls, tool messages and ``tools``."""
    result: list[dict[str, Any]] = []
    found_tools: list[dict[str, Any]] = list(tools or [])
    for n, message in enumerate(messages, start=1):
        role, content = message["role"], message["content"]
        where = f"message {n}"
        if role == "system" and "<tools>" in content:
            for block in _TOOLS.findall(content):
                found_tools += _tools_from(block, where)
            continue
        if role == "assistant" and ("<tool_call>" in content or "<functioncall>" in content):
            if "<tool_call>" in content:
                blocks = _TOOL_CALL.findall(content)
                rest = _TOOL_CALL.sub("", content)
            else:
                head, _, tail = content.partition("<functioncall>")
                blocks, rest = [tail.replace(_GLAIVE_END, "")], head
            if not blocks:
                raise RecordError("bad_tool_call", f"{where}: unclosed <tool_call> tag")
            if rest.strip():
                raise RecordError("text_and_tool_calls", f"{where}: an assistant turn has text besides its tool calls "
                                  "(chat formats render calls as a turn of their own)")
            result.append({"role": "assistant", "content": "", "tool_calls": _calls_from(blocks, where)})
            continue
        if role in ("tool", "user") and "<tool_response>" in content:
            blocks = _TOOL_RESPONSE.findall(content)
            if role == "user" and _TOOL_RESPONSE.sub("", content).strip():
                result.append(message)  # a user turn that merely quotes the tag
                continue
            result += [{"role": "tool", "content": block.strip()} for block in blocks]
            continue
        result.append(message)
    return result, (found_tools or None)


def glaive(system: Any, chat: Any) -> tuple[list[dict[str, Any]], list | None]:
    """glaive-function-calling's ``system`` and ``chat`` strings → messages (markup still in place) and tools."""
    if not isinstance(system, str) or not isinstance(chat, str):
        raise RecordError("wrong_type", "glaive layout: system and chat must be text")
    system_text = re.sub(r"^\s*SYSTEM\s*:\s*", "", system)
    messages: list[dict[str, Any]] = []
    tools = None
    if "{" in system_text:
        tools = _tools_from(system_text[system_text.index("{"):], "system")
    elif system_text.strip():
        messages.append({"role": "system", "content": system_text.strip()})
    marks = list(_GLAIVE_TURN.finditer(chat))
    if not marks:
        raise RecordError("missing_roles", "glaive chat has no USER:/ASSISTANT: turns")
    roles = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(chat)
        text = chat[mark.end():end].replace(_GLAIVE_END, "").strip()
        role = roles[mark.group(1)]
        if role == "assistant" and "<functioncall>" in text:
            head, _, tail = text.partition("<functioncall>")
            if head.strip():
                raise RecordError("text_and_tool_calls", f"message {len(messages) + 1}: an assistant turn has text "
                                  "besides its tool call")
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls_from([tail], f"message {len(messages) + 1}")})
        else:
            messages.append({"role": role, "content": text})
    return messages, tools
