"""The one conversation type every reader produces, and the checks every record passes.

A conversation is OpenAI-style: ``messages`` with roles ``system`` / ``user`` / ``assistant`` / ``tool``;
an assistant turn that calls tools carries ``tool_calls`` =
``[{"type": "function", "function": {"name": str, "arguments": dict}}]`` (and ``content`` ""); a tool
result is a ``tool`` message whose ``content`` is text. ``tools`` (optional) lists OpenAI tool schemas
``{"type": "function", "function": {"name", "description", "parameters"}}``.

A preference pair is ``prompt`` (messages ending with a user turn), ``chosen`` and ``rejected`` (the
assistant turns that answer it).

A record that breaks a rule raises `RecordError(reason, detail)`: ``reason`` is a short slug that the
stage counts (``alternation``, ``empty_content``…), ``detail`` says what exactly was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edgezh.recipe import LOSS_SCALE_FIELDS

ROLES = ("system", "user", "assistant", "tool")
SPAN_FIELDS = LOSS_SCALE_FIELDS
"""Agent fields a `loss_scale` can weight (ReAct lines inside assistant text, tool-call JSON)."""


class RecordError(ValueError):
    """One malformed record: ``reason`` (a slug, counted in stats) and a human ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the *stripped* content of message ``message`` that hold agent field ``field``."""

    message: int
    start: int
    end: int
    field: str


@dataclass
class Conversation:
    """An SFT example. ``origin`` says where it came from (``file.jsonl:12``, ``org/ds:train row 4``)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    spans: list[Span] = field(default_factory=list)
    source: str = ""
    origin: str = ""

    def key(self) -> str:
        """Identity for exact-duplicate detection (what is trained on, not where it came from)."""
        return json.dumps({"messages": self.messages, "tools": self.tools}, sort_keys=True, ensure_ascii=False)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": self.messages, "source": self.source}
        if self.tools:
            data["tools"] = self.tools
        return data


@dataclass
class Pair:
    """A preference pair for DPO."""

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    source: str = ""
    origin: str = ""

    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True, ensure_ascii=False)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "source": self.source}


# ---------------------------------------------------------------- building blocks


def text_of(value: Any, what: str) -> str:
    """A text field: str kept as is; anything else is a `wrong_type` problem."""
    if isinstance(value, str):
        return value
    raise RecordError("wrong_type", f"{what} must be text, got {type(value).__name__}")


def parse_json_text(value: Any, what: str) -> Any:
    """Columns that hold structures may arrive as JSON text (CSV cells, hub string columns)."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise RecordError("bad_json", f"{what} is not valid JSON ({exc})") from None
    return value


def tool_call(name: Any, arguments: Any, where: str) -> dict[str, Any]:
    """A normalised tool call; ``arguments`` may be a dict or JSON text of one."""
    if not isinstance(name, str) or not name.strip():
        raise RecordError("bad_tool_call", f"{where}: a tool call needs a non-empty function name")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise RecordError("bad_tool_call", f"{where}: arguments of {name!r} are not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise RecordError("bad_tool_call", f"{where}: arguments of {name!r} must be an object, got {type(arguments).__name__}")
    return {"type": "function", "function": {"name": name.strip(), "arguments": arguments}}


def normalise_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (or bare ``{"name", "arguments"}`` objects) → the normalised list."""
    calls = parse_json_text(calls, f"{where} tool_calls")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RecordError("bad_tool_call", f"{where}: tool_calls must be a non-empty list")
    result = []
    for call in calls:
        if not isinstance(call, dict):
            raise RecordError("bad_tool_call", f"{where}: a tool call must be an object, got {type(call).__name__}")
        function = call.get("function", call)
        if not isinstance(function, dict):
            raise RecordError("bad_tool_call", f"{where}: tool call 'function' must be an object")
        result.append(tool_call(function.get("name"), function.get("arguments", function.get("parameters")), where))
    return result


def normalise_tools(tools: Any) -> list[dict[str, Any]] | None:
    """OpenAI tool schemas; bare ``{"name", "description", "parameters"}`` objects are wrapped."""
    tools = parse_json_text(tools, "tools")
    if tools is None or tools == [] or tools == "":
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RecordError("bad_tools", f"tools must be a list of tool schemas, got {type(tools).__name__}")
    result = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise RecordError("bad_tools", f"a tool schema must be an object, got {type(tool).__name__}")
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError("bad_tools", "a tool schema needs type 'function' and a function name")
        result.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return result


def tool_result_text(value: Any) -> str:
    """A tool result as text: dicts/lists become compact JSON (as the llama3.1 template prints them)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text_of(value, "tool result")


# ---------------------------------------------------------------- checks


def check_messages(messages: list[dict[str, Any]], *, final: str = "assistant") -> None:
    """Roles and order: optional system first, then user; user → assistant; assistant → user, or → tool
    after tool calls; tool → tool or assistant. Non-empty content. The last turn is ``final``
    ("assistant" for SFT and answers, "user" for a DPO prompt, None for any)."""
    if not messages:
        raise RecordError("empty_conversation", "the conversation has no messages")
    previous = None
    for i, message in enumerate(messages):
        n = i + 1
        role = message["role"]
        if role not in ROLES:
            raise RecordError("unknown_role", f"message {n}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
        calls = message.get("tool_calls")
        if not calls and not message["content"].strip():
            raise RecordError("empty_content", f"message {n} ({role}) has empty content")
        if role == "system":
            if i != 0:
                raise RecordError("system_position", f"message {n}: a system message may only come first")
        elif role == "user":
            if previous not in (None, "system", "assistant"):
                raise RecordError("alternation", f"message {n}: user turn after a {previous} turn "
                                  "(expected user and assistant turns to alternate)")
        elif role == "assistant":
            if previous in (None, "system"):
                raise RecordError("first_not_user", f"message {n}: the conversation must start with a user turn "
                                  "(after an optional system message), not assistant")
            if previous == "assistant":
                raise RecordError("alternation", f"message {n}: two assistant turns in a row")
            if previous == "assistant_call":
                raise RecordError("tool_call_without_result", f"message {n}: an assistant turn follows a tool call "
                                  "with no tool result in between")
        elif role == "tool":
            if previous not in ("assistant_call", "tool"):
                raise RecordError("tool_result_without_call", f"message {n}: a tool result must follow an assistant "
                                  "tool call (or another tool result)")
        previous = "assistant_call" if (role == "assistant" and calls) else role
    last = messages[-1]["role"]
    if previous == "system":
        raise RecordError("first_not_user", "the conversation has only a system message")
    if previous == "assistant_call" and final == "user":
        raise RecordError("tool_call_without_result", "the prompt ends with a tool call that has no result")
    if final == "assistant" and last != "assistant":
        raise RecordError("last_not_assistant", f"the last turn is {last}, not assistant (nothing to train on)")
    if final == "user" and last not in ("user", "tool"):
        raise RecordError("prompt_not_user_last", f"the prompt ends with a {last} turn; it must end with the user's turn")


def check_answer(messages: list[dict[str, Any]], which: str) -> None:
    """``chosen`` / ``rejected``: one or more assistant turns (tool results between calls allowed)."""
    if not messages:
        raise RecordError("empty_content", f"{which} is empty")
    if messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant":
        raise RecordError("alternation", f"{which} must start and end with an assistant turn")
    for i, message in enumerate(messages):
        if message["role"] in ("system", "user"):
            raise RecordError("alternation", f"{which} message {i + 1}: a {message['role']} turn inside an answer")
        if not message.get("tool_calls") and not message["content"].strip():
            raise RecordError("empty_content", f"{which} message {i + 1} has empty content")


def uses_tools(messages: list[dict[str, Any]], tools: list | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


class ControlTokens:
    """Special tokens of the tokenizer: a message that contains one as text would be encoded as that
    token (transformers cannot both sanitize and return the assistant mask), so such records are refused."""

    def __init__(self, tokens: list[str]):
        tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None

    def check(self, text: str, where: str) -> None:
        if self.pattern is None:
            return
        found = self.pattern.search(text)
        if found:
            raise RecordError("control_token", f"{where} contains the special token {found.group(0)!r} as text")


def check_encodable(messages: list[dict[str, Any]], tools: list | None, chat_format, control: ControlTokens | None,
                    where: str = "") -> None:
    """What the chat format and tokenizer need: tool use only in formats with tools; no special tokens in text."""
    prefix = f"{where} " if where else ""
    if chat_format is not None and not chat_format.supports_tools and uses_tools(messages, tools):
        raise RecordError("tools_unsupported", f"{prefix}uses tools, which the chat format {chat_format.name!r} cannot "
                          "render (use a base with the llama3.1 format)")
    if control is None:
        return
    for i, message in enumerate(messages):
        control.check(message["content"], f"{prefix}message {i + 1}")
        for call in message.get("tool_calls") or []:
            control.check(json.dumps(call, ensure_ascii=False), f"{prefix}message {i + 1} tool call")
    if tools:
        control.check(json.dumps(tools, ensure_ascii=False), f"{prefix}tools")
