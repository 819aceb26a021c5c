"""A conversation over the engine: history as JSONL (resumable) and the tool loop.

`ChatSession.run_turn(text)` yields events while it works — text deltas, a notice when old turns
were left out to fit the context, each tool call before it runs (after `confirm(call)` says yes),
its result, and the finished turn with its stats. The conversation is kept in OpenAI form
(`tool_calls`, `tool` results) and rendered for the model's format by `toolcalls.prepare`.

History file: one JSON object per line. The first line is `{"type": "edgezh-chat", ...}` (model,
format, created); each later line is a message `{"role", "content", ...}`, an assistant message
may carry `"meta"` (stats, cancelled, the LoRA adapter set it was answered with). The file is rewritten atomically after every turn.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from edgezh.errors import UserError
from edgezh.jsonl import numbered_records
from edgezh.runtime.engine import Engine, SamplingParams, Stats
from edgezh.runtime.toolcalls import Reply, interpret, prepare
from edgezh.runtime.tools import ToolCall, ToolError, Toolbox

MAX_TOOL_STEPS = 6
DECLINED = "用户拒绝运行这个工具（the user declined to run this tool）。请不用它回答。"
HISTORY_TYPE = "edgezh-chat"


@dataclass
class Delta:
    text: str


@dataclass
class Notice:
    text: str
    severity: str = "warning"


@dataclass
class ToolRequest:
    call: ToolCall


@dataclass
class ToolResult:
    call: ToolCall
    result: str
    ran: bool


@dataclass
class StepDone:
    """One generation ended; `tool_calls` non-empty means the turn continues after them."""

    text: str
    stats: Stats
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class TurnDone:
    text: str
    stats: Stats
    finish_reason: str


Event = Delta | Notice | ToolRequest | ToolResult | StepDone | TurnDone


def default_history_path() -> Path:
    from edgezh.paths import cache_dir

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return cache_dir() / "chats" / f"chat-{stamp}.jsonl"


class ChatSession:
    """The messages of one chat (system prompt first), the tools it may call, where it is saved."""

    def __init__(self, engine: Engine, *, system: str | None = None, toolbox: Toolbox | None = None,
                 confirm: Callable[[ToolCall], bool] | None = None, history: Path | None = None,
                 messages: list[dict[str, Any]] | None = None):
        self.engine = engine
        self.toolbox = toolbox or Toolbox()
        self.confirm = confirm or (lambda call: False)
        self.history = history
        self.adapters: str | None = None
        """The engine's LoRA adapter set the next answers use (None: the base alone)."""
        self.coalesce = 0.0
        """Seconds of text gathered into one `Delta` (0: a delta per piece; see `Generation.deltas`)."""
        self.messages: list[dict[str, Any]] = []
        self.created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        if messages:
            self.messages = [dict(m) for m in messages]
        self.set_system(system if system is not None else self.system or engine.format.default_system)

    # --- state ---------------------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0].get("role") == "system":
            return self.messages[0].get("content")
        return None

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (empty: none)."""
        if self.messages and self.messages[0].get("role") == "system":
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def new_chat(self, history: Path | None = None) -> None:
        system = self.system
        self.messages = []
        self.set_system(system)
        self.history = history
        self.created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")

    def last_answer(self) -> str | None:
        for message in reversed(self.messages):
            if message.get("role") == "assistant" and message.get("content") and not message.get("tool_calls"):
                return message["content"]
        return None

    # --- history -------------------------------------------------------------------------------------

    def save(self) -> None:
        """Rewrite the history file (atomically); nothing when the session has no file."""
        if self.history is None:
            return
        self.history.parent.mkdir(parents=True, exist_ok=True)
        header = {"type": HISTORY_TYPE, "version": 1, "model": self.engine.name,
                  "format": self.engine.format.name, "created": self.created}
        lines = [json.dumps(header, ensure_ascii=False)] + [json.dumps(m, ensure_ascii=False) for m in self.messages]
        part = self.history.with_name(self.history.name + ".part")
        part.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(part, self.history)

    @staticmethod
    def load_history(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(header, messages) of a history file; UserError naming the line for anything wrong."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such chat history file")
        header: dict[str, Any] = {}
        messages: list[dict[str, Any]] = []
        for number, item in numbered_records(path):
            if not isinstance(item, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            if item.get("type") == HISTORY_TYPE:
                header = item
                continue
            role = item.get("role")
            if role not in ("system", "user", "assistant", "tool", "ipython"):
                raise UserError(f"{path}:{number}: unknown role {role!r}")
            if role != "assistant" and not isinstance(item.get("content"), str):
                raise UserError(f"{path}:{number}: a {role} message needs a text 'content'")
            messages.append(item)
        systems = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        return header, (systems[-1:] + rest)

    @classmethod
    def resume(cls, engine: Engine, path: Path, **kwargs: Any) -> "ChatSession":
        header, messages = cls.load_history(path)
        session = cls(engine, history=Path(path), messages=messages, **kwargs)
        session.created = header.get("created", session.created)
        return session

    # --- a turn --------------------------------------------------------------------------------------

    def run_turn(self, text: str, params: SamplingParams = SamplingParams(), *,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """Add the user's message and answer it, calling tools as the model asks. If the engine
        refuses before any output (the message cannot fit, a template error) the message is taken
        back out and the error raised, so the caller can give the text back to the user."""
        cancel = cancel or threading.Event()
        self.messages.append({"role": "user", "content": text})
        mark = len(self.messages)
        tools = self.toolbox.schemas() if self.toolbox else None
        for step in range(MAX_TOOL_STEPS):
            prepared = prepare(self._plain(self.messages), self.engine.format.supports_tools, tools)
            try:
                generation = self.engine.chat(prepared.messages, replace(params, stop=params.stop + prepared.stop),
                                              tools=prepared.tools, cancel=cancel, adapters=self.adapters)
            except UserError:
                if len(self.messages) == mark:
                    self.messages.pop()
                raise
            if generation.dropped:
                yield Notice(f"上下文已满：较早的 {generation.dropped} 条消息未发送给模型（系统提示保留）。"
                             f" Context full: the oldest {generation.dropped} messages were left out.")
            for delta in generation.deltas(self.coalesce):
                yield Delta(delta)
            stats = generation.stats
            if generation.finish_reason == "cancelled":
                self._finish(Reply(generation.text, [], {"role": "assistant", "content": generation.text}),
                             stats, cancelled=True)
                yield TurnDone(generation.text, stats, "cancelled")
                return
            reply = interpret(generation.text, prepared)
            if not reply.tool_calls:
                self._finish(reply, stats)
                yield StepDone(reply.content, stats)
                yield TurnDone(reply.content, stats, generation.finish_reason)
                return
            self.messages.append(reply.message)
            yield StepDone(reply.content, stats, reply.tool_calls)
            for call in reply.tool_calls:
                try:
                    self.toolbox.check(call)
                    problem = None
                except ToolError as exc:
                    problem = f"error: {exc}"
                if problem is not None:
                    result, ran = problem, False
                else:
                    yield ToolRequest(call)  # shown before the user is asked
                    if cancel.is_set() or not self.confirm(call):
                        result, ran = DECLINED, False
                    else:
                        result, ran = self.toolbox.run(call), True
                self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
                yield ToolResult(call, result, ran)
            self.save()
            if cancel.is_set():
                yield TurnDone("", stats, "cancelled")
                return
        yield Notice(f"stopped after {MAX_TOOL_STEPS} rounds of tool calls", "warning")
        yield TurnDone("", Stats(n_ctx=self.engine.n_ctx), "tool_limit")

    def _finish(self, reply: Reply, stats: Stats, cancelled: bool = False) -> None:
        meta: dict[str, Any] = {"stats": stats.as_dict()}
        if self.adapters is not None:
            meta["lora"] = self.adapters
        if cancelled:
            meta["cancelled"] = True
        self.messages.append({**reply.message, "meta": meta})
        self.save()

    @staticmethod
    def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages without edgezh's bookkeeping keys."""
        return [{k: v for k, v in m.items() if k != "meta"} for m in messages]
