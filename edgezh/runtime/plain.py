"""The plain chat: `edgezh chat` without a terminal (stdin or stdout is a pipe or a file), or `--plain`.

Each line read from stdin is one user message; the answer streams to stdout as it is decoded and
ends with a newline. At the end of input it exits 0. Stats and notices go to stderr, so stdout
holds only the answers. A tool call runs only with `--yes` (stdin carries the messages, so there
is nobody to ask); otherwise it is declined and the model answers without it. The conversation
is saved like the app's (a history file, `--resume` continues one). With tools, each reply is
printed when its step ends (the raw call text is not shown). With `--lora` adapter sets, a line
`/lora NAME` makes the next answers use that set and `/lora off` the base alone (`/lora`: which
one is on, and the sets there are); such a line is not a message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from edgezh.errors import UserError
from edgezh.runtime import chat as events
from edgezh.runtime.chat import ChatSession, default_history_path


def plain_chat(engine: Any, params: Any, *, system: str | None = None, toolbox: Any = None,
               resume: Path | None = None, history: Path | None = None, auto_confirm: bool = False,
               stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    options = dict(toolbox=toolbox, confirm=lambda call: auto_confirm)
    if resume is not None:
        session = ChatSession.resume(engine, resume, **options)
        if system:
            session.set_system(system)
    else:
        session = ChatSession(engine, system=system, history=history or default_history_path(), **options)
    streaming = not session.toolbox  # with tools, raw call text is not an answer: print each step's reply
    print(f"edgezh chat (plain): {engine.name} · {engine.format.name} · one message per line, end of input quits",
          file=stderr, flush=True)
    try:
        for line in stdin:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.strip() == "/lora" or text.strip().startswith("/lora "):
                print(_switch_lora(session, text.strip().removeprefix("/lora").strip()), file=stderr, flush=True)
                continue
            try:
                for event in session.run_turn(text, params):
                    if isinstance(event, events.Delta) and streaming:
                        stdout.write(event.text)
                        stdout.flush()
                    elif isinstance(event, events.StepDone) and not streaming and not event.tool_calls:
                        stdout.write(event.text)
                    elif isinstance(event, events.Notice):
                        print(f"note: {event.text}", file=stderr, flush=True)
                    elif isinstance(event, events.ToolRequest):
                        print(f"tool: {event.call.describe()}{'' if auto_confirm else ' (declined: run with --yes)'}",
                              file=stderr, flush=True)
                    elif isinstance(event, events.TurnDone):
                        stdout.write("\n")
                        stdout.flush()
                        print(event.stats.summary(), file=stderr, flush=True)
            except UserError as exc:
                print(f"error: {exc}", file=stderr, flush=True)
    except KeyboardInterrupt:
        stdout.write("\n")
        return 130
    finally:
        engine.close()
    if session.history is not None and session.history.exists():
        print(f"saved: {session.history}", file=stderr, flush=True)
    return 0


def _switch_lora(session: ChatSession, name: str) -> str:
    """`/lora NAME|off`: the line to show (the change made, or what is wrong)."""
    names = [item.name for item in session.engine.adapter_sets]
    if not names:
        return "note: no LoRA adapter sets were loaded (edgezh chat MODEL --lora FILE.gguf)"
    if name:
        try:
            session.adapters = None if name == "off" else session.engine.adapter_set(name).name
        except UserError as exc:
            return f"error: {exc}"
    active = session.engine.adapter_set(session.adapters)
    return f"LoRA: {active.label() if active else 'off'} (sets: {', '.join(names)}; /lora NAME|off)"
