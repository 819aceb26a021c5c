"""Dataset layouts → one conversation type (`Conversation`, or `Pair` for preference data).

Formats (``DataSource.format``):

- ``messages``: a ``messages`` column (also Agent-FLAN's ``conversation`` or a ``conversations`` column)
  of OpenAI messages ``{role, content[, tool_calls]}``; optional ``tools``. Roles ``function`` and
  ``ipython`` are read as ``tool``.
- ``sharegpt``: ``conversations`` of ``{from, value}``; ``from`` is human/user, gpt/assistant, system,
  function_call (value: a JSON call or list of calls → an assistant tool-call turn), observation / tool
  (→ a tool result). Optional ``system`` and ``tools`` columns (LLaMA-Factory's layout).
- ``alpaca``: ``instruction`` + ``output``, optional ``input`` (joined to the instruction with a newline),
  ``system`` and ``history`` (``[[query, answer], …]`` before the last exchange).
- ``dpo``: ``chosen`` and ``rejected`` (text, or messages), usually ``prompt`` (text or messages), optional
  ``system``. Conversations that repeat the prompt are cut after it; without a ``prompt`` column the
  common first turns of chosen and rejected are the prompt.
- ``react``: a ``messages`` or ``conversations`` layout whose assistant turns hold ReAct lines; kept as text,
  field spans recorded for `loss_scale`.
- ``function_calling``: a ``messages`` / ``conversations`` layout with hermes markup (``<tools>``,
  ``<tool_call>``, ``<tool_response>``) or structured tool calls, or glaive's ``system`` + ``chat`` text.

``format: auto`` looks at the columns (keys) of the first 100 records of a file, in this order:

1. ``chosen`` and ``rejected`` → ``dpo``;
2. ``instruction`` and ``output`` → ``alpaca``;
3. ``system`` and ``chat`` → ``function_calling`` (glaive);
4. ``messages``, ``conversation`` or ``conversations`` → a conversation; then, still over those records:
   a non-empty ``tools`` column, a tool tag in any turn, ShareGPT roles ``function_call`` / ``observation``,
   or OpenAI ``tool_calls`` / ``tool`` turns → ``function_calling``; an assistant turn with both an
   ``Action:`` and an ``Action Input:`` line → ``react``; turns keyed ``from``/``value`` → ``sharegpt``;
   otherwise ``messages``;
5. a ``text`` column → ``text`` (documents for continued pre-training; another column: ``format: text``
   with ``text_field``);
6. anything else: an error naming the columns found and what each format expects.
"""

from __future__ import annotations

from typing import Any, Iterable

from edgezh.data import agent
from edgezh.data.conversation import (Conversation, Pair, RecordError, check_answer, check_messages, normalise_tool_calls,
                                      normalise_tools, parse_json_text, text_of, tool_result_text)
from edgezh.errors import UserError

FORMATS = ("messages", "sharegpt", "alpaca", "dpo", "react", "function_calling")
EXPECTS = {
    "messages": "`messages` (a list of {role, content}), or Agent-FLAN's `conversation`",
    "sharegpt": "`conversations` (a list of {from, value}), optional `system`, `tools`",
    "alpaca": "`instruction` and `output`, optional `input`, `system`, `history`",
    "dpo": "`chosen` and `rejected` (text or messages), usually `prompt`",
    "react": "`messages` or `conversations` with Thought/Action/Action Input lines in assistant turns",
    "function_calling": "`messages` or `conversations` with tools or <tool_call> markup, or glaive's `system` and `chat`",
    "text": "`text` (one document per record; another column with `text_field`), or a .txt file",
}
CONVERSATION_KEYS = ("messages", "conversation", "conversations")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
                  "function_response": "tool"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool",
                 "ipython": "tool"}
DETECT_RECORDS = 100


def expectations() -> str:
    return "; ".join(f"{name}: {what}" for name, what in EXPECTS.items())


def detect(rows: Iterable[dict[str, Any]], where: str) -> str:
    """The format of a file from its first records (rules in the module docstring)."""
    rows = [r for r in rows if isinstance(r, dict)][:DETECT_RECORDS]
    columns = sorted({k for r in rows for k in r})
    have = set(columns)
    if {"chosen", "rejected"} <= have:
        return "dpo"
    if {"instruction", "output"} <= have:
        return "alpaca"
    if {"system", "chat"} <= have:
        return "function_calling"
    if have & set(CONVERSATION_KEYS):
        turns = [t for r in rows for t in _raw_turns(r)]
        if any(r.get("tools") not in (None, "", "[]", []) for r in rows) or any(_tool_turn(t) for t in turns):
            return "function_calling"
        if any(_turn_role(t) in ("gpt", "assistant") and agent.is_react(_turn_text(t)) for t in turns):
            return "react"
        if any("from" in t for t in turns):
            return "sharegpt"
        return "messages"
    if "text" in have:
        return "text"
    found = ", ".join(columns) if columns else "none"
    raise UserError(f"{where}: cannot tell the data format from the columns (found: {found}); "
                    f"set `format` or use one of — {expectations()}")


def _raw_turns(row: dict[str, Any]) -> list[dict]:
    for key in CONVERSATION_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            try:
                value = parse_json_text(value, key)
            except RecordError:
                return []
        if isinstance(value, list):
            return [t for t in value if isinstance(t, dict)]
    return []


def _turn_role(turn: dict) -> str:
    return str(turn.get("role", turn.get("from", "")))


def _turn_text(turn: dict) -> str:
    value = turn.get("content", turn.get("value"))
    return value if isinstance(value, str) else ""


def _tool_turn(turn: dict) -> bool:
    return (_turn_role(turn) in ("function_call", "observation", "tool", "function", "ipython") or bool(turn.get("tool_calls"))
            or agent.has_tool_markup(_turn_text(turn)))


# ---------------------------------------------------------------- readers


def read(fmt: str, row: Any) -> Conversation | Pair:
    """One record in format ``fmt`` → a checked `Conversation` or `Pair` (RecordError if malformed)."""
    if not isinstance(row, dict):
        raise RecordError("not_an_object", f"a record must be an object, got {type(row).__name__}")
    if fmt == "dpo":
        return _dpo(row)
    if fmt == "alpaca":
        messages, tools = _alpaca(row), None
    elif fmt == "function_calling" and "chat" in row and not any(k in row for k in CONVERSATION_KEYS):
        _need(row, ("system", "chat"), fmt)
        messages, tools = agent.function_calling(*agent.glaive(row["system"], row["chat"]))
    else:
        messages, tools = _conversation(row, fmt)
        if fmt == "function_calling":
            messages, tools = agent.function_calling(messages, tools)
    check_messages(messages, final="assistant")
    spans = agent.react_spans(messages) if fmt == "react" else []
    return Conversation(messages, tools, spans)


def _need(row: dict, columns: tuple[str, ...], fmt: str) -> None:
    missing = [c for c in columns if c not in row or row[c] is None]
    if missing:
        raise RecordError("missing_columns", f"no {', '.join(f'`{c}`' for c in missing)} (found: "
                          f"{', '.join(sorted(row)) or 'none'}; {fmt} expects {EXPECTS[fmt]})")


def _conversation(row: dict, fmt: str) -> tuple[list[dict], list | None]:
    key = next((k for k in CONVERSATION_KEYS if row.get(k) is not None), None)
    if key is None:
        _need(row, ("conversations",) if fmt == "sharegpt" else ("messages",), fmt)
    turns = parse_json_text(row[key], key)
    if not isinstance(turns, list):
        raise RecordError("wrong_type", f"`{key}` must be a list of turns, got {type(turns).__name__}")
    sharegpt = fmt == "sharegpt" or (fmt != "messages" and any(isinstance(t, dict) and "from" in t for t in turns))
    messages = [_sharegpt_turn(t, n) if sharegpt else _message(t, n) for n, t in enumerate(turns, start=1)]
    system = row.get("system")
    if system not in (None, "") and sharegpt:
        if messages and messages[0]["role"] == "system":
            raise RecordError("system_position", "a `system` column and a system turn both given")
        messages.insert(0, {"role": "system", "content": text_of(system, "`system`")})
    return messages, normalise_tools(row.get("tools"))


def _message(turn: Any, n: int) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RecordError("wrong_type", f"message {n} must be an object, got {type(turn).__name__}")
    if "role" not in turn:
        hint = " (from/value turns are ShareGPT: set format: sharegpt)" if "from" in turn else ""
        raise RecordError("missing_roles", f"message {n} has no `role`{hint}")
    raw = turn["role"]
    role = MESSAGE_ROLES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise RecordError("unknown_role", f"message {n}: unknown role {raw!r} (allowed: {', '.join(MESSAGE_ROLES)})")
    if role == "assistant" and turn.get("tool_calls"):
        content = turn.get("content") or ""
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"message {n}: content must be text")
        calls = normalise_tool_calls(turn["tool_calls"], f"message {n}")
        if content.strip():
            raise RecordError("text_and_tool_calls", f"message {n}: an assistant turn has text besides its tool calls "
                              "(chat formats render calls as a turn of their own)")
        return {"role": "assistant", "content": "", "tool_calls": calls}
    if "content" not in turn or turn["content"] is None:
        raise RecordError("empty_content", f"message {n} ({role}) has no content")
    content = tool_result_text(turn["content"]) if role == "tool" else text_of(turn["content"], f"message {n} content")
    return {"role": role, "content": content}


def _sharegpt_turn(turn: Any, n: int) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RecordError("wrong_type", f"turn {n} must be an object, got {type(turn).__name__}")
    if "from" not in turn:
        hint = " (role/content turns are OpenAI messages: set format: messages)" if "role" in turn else ""
        raise RecordError("missing_roles", f"turn {n} has no `from`{hint}")
    raw = turn["from"]
    role = SHAREGPT_ROLES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise RecordError("unknown_role", f"turn {n}: unknown `from` {raw!r} (allowed: {', '.join(SHAREGPT_ROLES)})")
    value = turn.get("value")
    if value is None:
        raise RecordError("empty_content", f"turn {n} ({raw}) has no value")
    if raw == "function_call":
        calls = agent.loads_lenient(value, f"turn {n}: function_call") if isinstance(value, str) else value
        return {"role": "assistant", "content": "", "tool_calls": normalise_tool_calls(calls, f"turn {n}")}
    return {"role": role, "content": tool_result_text(value) if role == "tool" else text_of(value, f"turn {n} value")}


def _alpaca(row: dict) -> list[dict[str, Any]]:
    _need(row, ("instruction", "output"), "alpaca")
    instruction = text_of(row["instruction"], "`instruction`")
    extra = row.get("input")
    extra = "" if extra is None else text_of(extra, "`input`")
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if system not in (None, ""):
        messages.append({"role": "system", "content": text_of(system, "`system`")})
    history = parse_json_text(row.get("history"), "`history`") or []
    if not isinstance(history, list):
        raise RecordError("wrong_type", f"`history` must be a list of (query, answer) pairs, got {type(history).__name__}")
    for k, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError("wrong_type", f"`history` item {k} must be a (query, answer) pair")
        messages += [{"role": "user", "content": text_of(pair[0], f"`history` item {k} query")},
                     {"role": "assistant", "content": text_of(pair[1], f"`history` item {k} answer")}]
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": text_of(row["output"], "`output`")}]
    return messages


def _turns_of(value: Any, what: str, role: str) -> list[dict[str, Any]]:
    """A DPO field: text (one ``role`` turn), one message object, or a list of messages / ShareGPT turns."""
    value = parse_json_text(value, what)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"{what} must be text or a list of messages, got {type(value).__name__}")
    sharegpt = any(isinstance(t, dict) and "from" in t for t in value)
    try:
        return [_sharegpt_turn(t, n) if sharegpt else _message(t, n) for n, t in enumerate(value, start=1)]
    except RecordError as exc:
        raise RecordError(exc.reason, f"{what}: {exc.detail}") from None


def _dpo(row: dict) -> Pair:
    _need(row, ("chosen", "rejected"), "dpo")
    chosen = _turns_of(row["chosen"], "`chosen`", "assistant")
    rejected = _turns_of(row["rejected"], "`rejected`", "assistant")
    if row.get("prompt") not in (None, ""):
        prompt = _turns_of(row["prompt"], "`prompt`", "user")
        for name in ("chosen", "rejected"):
            answer = chosen if name == "chosen" else rejected
            if answer[:len(prompt)] == prompt:
                answer = answer[len(prompt):]
            if name == "chosen":
                chosen = answer
            else:
                rejected = answer
    else:
        common = 0
        while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
            common += 1
        while common > 0 and chosen[common - 1]["role"] == "assistant":
            common -= 1  # the answers start at an assistant turn
        prompt, chosen, rejected = chosen[:common], chosen[common:], rejected[common:]
        if not prompt:
            raise RecordError("missing_columns", "no `prompt` column and chosen/rejected share no prompt turns "
                              f"(found: {', '.join(sorted(row))}; dpo expects {EXPECTS['dpo']})")
    system = row.get("system")
    if system not in (None, ""):
        if prompt[0]["role"] == "system":
            raise RecordError("system_position", "a `system` column and a system turn both given")
        prompt = [{"role": "system", "content": text_of(system, "`system`")}] + prompt
    try:
        check_messages(prompt, final="user")
    except RecordError as exc:
        raise RecordError(exc.reason, f"`prompt`: {exc.detail}") from None
    check_answer(chosen, "`chosen`")
    check_answer(rejected, "`rejected`")
    if chosen == rejected:
        raise RecordError("identical_pair", "chosen and rejected are identical (nothing to prefer)")
    return Pair(prompt, chosen, rejected)
