"""The terminal chat, driven by Textual's Pilot on real GGUFs: type Chinese and watch the answer stream,
cancel mid-stream, resume a saved chat, keep what was typed when something fails, confirm a tool call;
snapshots with a fixed configuration; and one smoke test of the real app under tmux."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.content import Content

from conftest import ROOT, run_cli
from edgezh.runtime.engine import Engine, SamplingParams
from edgezh.runtime.tools import Toolbox, builtin_tools
from edgezh.tui import ChatApp, ChatConfig
from edgezh.tui.widgets import (AnswerMessage, ConfirmTool, NoticeMessage, PromptInput, StreamingAnswer, ToolMessage,
                               UserMessage)
from test_runtime_fixtures import ScriptedEngine, engine_for, tiny31_gguf, tiny_gguf  # noqa: F401

SIZE = (110, 34)


class RecordingApp(ChatApp):
    """The app, remembering its notifications (message, severity)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes: list[tuple[str, str]] = []

        self.seen: list[tuple[str, int]] = []
        self.fitted: list[bool] = []
        self.blinking: list[bool] = []

    def notify(self, message, *, title="", severity="information", timeout=None, markup=True):  # noqa: D401
        self.notes.append((message, severity))
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    async def _show_incoming(self) -> None:
        """The app's repaint of the streaming answer, remembering how much it showed each time and
        whether the box holds its whole text with at most `GROW_LINES` blank lines below it, or has a
        layout pass coming (the box grows a few lines at a time, repaints in between skip the layout
        pass; on a busy machine the pass may still be pending)."""
        streaming = [w for w in answers(self) if isinstance(w, StreamingAnswer)]
        if streaming and streaming[-1].content_size.width:
            box = streaming[-1]
            pending = box._layout_required or self.screen._layout_required
            needed = Content(box.source).get_height(box.styles, box.content_size.width)
            self.fitted.append(pending or needed <= box.content_size.height <= needed + box.GROW_LINES)
        self.blinking.append(self.query_one(PromptInput).cursor_blink)
        await super()._show_incoming()
        shown = answers(self)
        self.seen.append((type(shown[-1]).__name__ if shown else "", len(shown[-1].source) if shown else 0))


async def until(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def type_text(pilot, text: str) -> None:
    """Type `text` key by key, as a terminal delivers what an input method commits. (Pilot's `press`
    maps punctuation to key names and back, which loses full-width marks such as '，'.)"""
    from textual import events

    for character in text:
        if character.isalnum() or character.isspace():
            await pilot.press(character if not character.isspace() else "space")
        else:
            pilot.app._driver.send_message(events.Key(character, character))
            await pilot.pause()


def answers(app: ChatApp) -> list[AnswerMessage | StreamingAnswer]:
    """The answers on screen, the one streaming included."""
    return list(app.query("AnswerMessage, StreamingAnswer"))


def config(model: Path, tmp_path: Path, **changes) -> ChatConfig:
    return ChatConfig(model=model, history=tmp_path / "chat.jsonl", threads=2, **changes)


# --- Pilot ---------------------------------------------------------------------------------------------

def test_type_chinese_and_see_the_answer_stream(tiny_gguf: Path, tmp_path: Path) -> None:
    """The app loads the model itself (in a worker), takes Chinese typed key by key, streams the answer."""
    async def scenario() -> None:
        app = RecordingApp(config(tiny_gguf, tmp_path, params=SamplingParams(max_tokens=240, seed=5)))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.session is not None, what="the model to load")
            await type_text(pilot, "你好，世界！")
            assert app.query_one(PromptInput).text == "你好，世界！"
            await pilot.press("enter")
            assert app.query_one(PromptInput).text == ""
            await until(pilot, lambda: not app.generating and answers(app), timeout=300, what="the answer")
            final = len(answers(app)[0].source)
            partial = {n for kind, n in app.seen if kind == "StreamingAnswer" and 0 < n < final}
            assert len(partial) > 1  # the box grew while the answer streamed, before it was complete
            assert len(app.fitted) > 1 and all(app.fitted)  # and was laid out to hold its text
            assert not any(app.blinking) and app.query_one(PromptInput).cursor_blink  # still while streaming
            assert isinstance(answers(app)[0], AnswerMessage)  # then rendered once as Markdown
            assert [w.text for w in app.query(UserMessage)] == ["你好，世界！"]
            assert answers(app)[0].source == app.session.messages[-1]["content"]
            status = str(app.query_one("#status").render())
            assert "tok/s" in status and "TTFT" in status and f"/{app.engine.n_ctx}" in status
            assert not [n for n in app.notes if n[1] == "error"]
        saved = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [m.get("role") for m in saved[1:]] == ["system", "user", "assistant"] and saved[2]["content"] == "你好，世界！"

    asyncio.run(scenario())


def test_cancel_mid_stream_and_keep_chatting(tiny_gguf: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        app = RecordingApp(config(tiny_gguf, tmp_path, params=SamplingParams(max_tokens=1500, seed=2)),
                           engine=engine_for(tiny_gguf))
        async with app.run_test(size=SIZE) as pilot:
            await type_text(pilot, "写一篇很长的文章")
            await pilot.press("enter")
            await until(pilot, lambda: answers(app) and len(answers(app)[0].source) > 20, what="streaming")
            await pilot.press("escape")
            await until(pilot, lambda: not app.generating, timeout=20, what="the cancel")
            last = app.session.messages[-1]
            assert last["meta"]["cancelled"] and last["meta"]["stats"]["completion_tokens"] < 1500
            assert answers(app)[0].border_subtitle == "已取消 · cancelled"
            # Ctrl+C cancels too, and the app is still there to take the next message
            await type_text(pilot, "再来")
            await pilot.press("enter")
            await until(pilot, lambda: len(answers(app)) == 2, what="the second answer")
            await pilot.press("ctrl+c")
            await until(pilot, lambda: not app.generating, timeout=20, what="the second cancel")
            assert app.is_running and app.session.messages[-1]["meta"]["cancelled"]

    asyncio.run(scenario())


HISTORY = [
    {"type": "edgezh-chat", "version": 1, "model": "tiny-llama3-f16.gguf", "format": "llama3",
     "created": "2026-11-26T10:00:00+08:00"},
    {"role": "system", "content": "你是一个简洁的助手。"},
    {"role": "user", "content": "北京有哪些名胜？"},
    {"role": "assistant", "content": "北京的名胜有：\n\n- **故宫**\n- 长城\n- 颐和园",
     "meta": {"stats": {"prompt_tokens": 30, "completion_tokens": 20}}},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气！"},
]


def write_history(path: Path) -> Path:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in HISTORY), encoding="utf-8")
    return path


def test_resume_a_saved_chat(tiny_gguf: Path, tmp_path: Path) -> None:
    saved = write_history(tmp_path / "old.jsonl")

    async def scenario() -> None:
        app = RecordingApp(config(tiny_gguf, tmp_path, resume=saved, params=SamplingParams(max_tokens=8)),
                           engine=engine_for(tiny_gguf))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert [w.text for w in app.query(UserMessage)] == ["北京有哪些名胜？", "谢谢"]
            assert [a.source for a in answers(app)] == [HISTORY[3]["content"], "不客气！"]
            assert app.session.system == "你是一个简洁的助手。"
            await type_text(pilot, "还有呢？")
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and len(answers(app)) == 3, what="the answer")
            # the new turn saw the old ones
            assert "故宫" in app.engine.detokenize(app.engine.prompt_tokens(app.session._plain(app.session.messages)))
        lines = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
        assert lines[0]["created"] == HISTORY[0]["created"]
        assert [m["content"] for m in lines[1:6]] == [m["content"] for m in HISTORY[1:]]
        assert lines[6]["content"] == "还有呢？" and lines[7]["role"] == "assistant"

    asyncio.run(scenario())


def test_a_message_that_cannot_be_answered_goes_back_to_the_input(tiny_gguf: Path, tmp_path: Path) -> None:
    """A message longer than the context is refused: an error notification, and the text is typed back."""
    async def scenario() -> None:
        app = RecordingApp(config(tiny_gguf, tmp_path), engine=engine_for(tiny_gguf, n_ctx=256))
        long = "很长的消息" * 120
        async with app.run_test(size=SIZE) as pilot:
            app.query_one(PromptInput).insert(long)
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and app.notes, timeout=20, what="the error")
            assert app.notes[-1][1] == "error" and "context" in app.notes[-1][0]
            assert app.query_one(PromptInput).text == long
            assert not list(app.query(UserMessage)) and [m["role"] for m in app.session.messages] == ["system"]

    asyncio.run(scenario())


def test_a_broken_model_file_is_an_error_in_the_ui(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)

    async def scenario() -> None:
        app = RecordingApp(config(broken, tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.notes, timeout=30, what="the load error")
            assert app.notes[0][1] == "error" and "corrupt" in app.notes[0][0]
            await type_text(pilot, "还在吗")
            await pilot.press("enter")
            assert app.notes[-1][1] == "error" and "no model" in app.notes[-1][0]
            assert app.query_one(PromptInput).text == "还在吗"  # kept
            assert app.is_running

    asyncio.run(scenario())


def test_tool_call_needs_confirmation(tiny31_gguf: Path, tmp_path: Path) -> None:
    engine = ScriptedEngine(engine_for(tiny31_gguf),
                            ['{"name": "calculator", "parameters": {"expression": "6*7"}}', "答案是 **42**。"])

    async def scenario() -> None:
        app = RecordingApp(config(tiny31_gguf, tmp_path, toolbox=Toolbox(builtin_tools()),
                                  params=SamplingParams(max_tokens=64)), engine=engine)
        async with app.run_test(size=SIZE) as pilot:
            await type_text(pilot, "6乘以7")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ConfirmTool), what="the confirmation")
            assert 'calculator({"expression": "6*7"})' in app.screen.call_text
            await pilot.press("y")
            await until(pilot, lambda: not app.generating, what="the answer")
            tool = app.query_one(ToolMessage)
            assert "→ 42" in str(tool.render()) and tool.border_subtitle == "已运行 · ran"
            assert answers(app)[-1].source == "答案是 **42**。"
            # copy the last answer, then start a new chat
            await pilot.press("ctrl+o")
            assert app.clipboard == "答案是 **42**。"
            await pilot.press("ctrl+n")
            await pilot.pause()
            assert not list(app.query(UserMessage)) and [m["role"] for m in app.session.messages] == ["system"]
            assert app.session.history != tmp_path / "chat.jsonl"

    asyncio.run(scenario())


def test_multiline_input_settings_panel_and_reload(tiny_gguf: Path, tmp_path: Path) -> None:
    from textual.widgets import Input

    async def scenario() -> None:
        own = Engine.load(tiny_gguf, n_threads=2)  # not the shared one: a reload closes the engine it replaces
        app = RecordingApp(config(tiny_gguf, tmp_path, params=SamplingParams(max_tokens=64)), engine=own)
        async with app.run_test(size=SIZE) as pilot:
            await type_text(pilot, "第一行")
            await pilot.press("ctrl+j")
            await type_text(pilot, "第二行")
            assert app.query_one(PromptInput).text == "第一行\n第二行"
            app.query_one("#temperature", Input).value = "hot"
            await pilot.press("enter")
            assert app.notes[-1][1] == "error" and "temperature" in app.notes[-1][0]
            assert app.query_one(PromptInput).text == "第一行\n第二行" and not app.generating  # kept, not sent
            app.query_one("#temperature", Input).value = "0.5"
            app.query_one("#max_tokens", Input).value = "3"
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and answers(app), what="the answer")
            assert [w.text for w in app.query(UserMessage)] == ["第一行\n第二行"]
            assert app.session.messages[-1]["meta"]["stats"]["completion_tokens"] <= 3
            app.query_one("#n_ctx", Input).value = "512"
            app.query_one("#reload").press()
            await until(pilot, lambda: app.engine is not None and app.engine.n_ctx == 512, what="the reload")
            assert app.session.engine is app.engine and len(app.session.messages) == 3  # the chat goes on
            assert app.engine is not own  # the old one was closed by the app
            app.engine.close()

    asyncio.run(scenario())


def test_context_overflow_is_shown_in_the_ui(tiny_gguf: Path, tmp_path: Path) -> None:
    history = tmp_path / "long.jsonl"
    lines = [HISTORY[0], {"role": "system", "content": "你是助手。"}]
    for i in range(10):
        lines += [{"role": "user", "content": f"问题{i}：" + "北京" * 10}, {"role": "assistant", "content": "上海" * 10}]
    history.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")

    async def scenario() -> None:
        app = RecordingApp(config(tiny_gguf, tmp_path, resume=history, params=SamplingParams(max_tokens=32)),
                           engine=engine_for(tiny_gguf, n_ctx=256))
        async with app.run_test(size=SIZE) as pilot:
            await type_text(pilot, "最后一个问题")
            await pilot.press("enter")
            await until(pilot, lambda: not app.generating and len(answers(app)) == 11, what="the answer")
            notice = app.query_one(NoticeMessage)
            assert "上下文已满" in str(notice.render()) and any(n[1] == "warning" for n in app.notes)
            assert len(app.session.messages) == 23  # the history keeps every message; only the prompt left some out

    asyncio.run(scenario())


# --- snapshots (fixed configuration: size, model file name, settings, history) -------------------------

def stable_engine(gguf: Path, folder: Path, name: str) -> Engine:
    """`gguf` under a stable file name (it shows in the header), on the CPU, 2 threads, 2048 context."""
    link = folder / name
    link.symlink_to(gguf)
    return Engine.load(link, n_threads=2, n_gpu_layers=0, n_ctx=2048)


def test_snapshot_resumed_chat(snap_compare, tiny_gguf: Path, tmp_path: Path) -> None:
    engine = stable_engine(tiny_gguf, tmp_path, "tiny-llama3-f16.gguf")
    app = ChatApp(ChatConfig(model=engine.path, resume=write_history(tmp_path / "old.jsonl"), threads=2,
                             gpu_layers=0, params=SamplingParams(max_tokens=256)), engine=engine)
    async def still(pilot) -> None:  # a blinking cursor would make the frame depend on timing
        app.query_one(PromptInput).cursor_blink = False
        await pilot.pause()

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=still)
    finally:
        engine.close()


def test_snapshot_tool_confirmation(snap_compare, tiny31_gguf: Path, tmp_path: Path) -> None:
    real = stable_engine(tiny31_gguf, tmp_path, "tiny-llama3.1-f16.gguf")
    engine = ScriptedEngine(real, ['{"name": "calculator", "parameters": {"expression": "6*7"}}'])
    app = ChatApp(ChatConfig(model=real.path, history=tmp_path / "chat.jsonl", threads=2, gpu_layers=0,
                             toolbox=Toolbox(builtin_tools())), engine=engine)

    async def ask(pilot) -> None:
        app.query_one(PromptInput).cursor_blink = False
        await type_text(pilot, "6乘以7")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmTool), what="the confirmation")
        await pilot.pause(0.2)

    try:
        assert snap_compare(app, terminal_size=SIZE, run_before=ask)
    finally:
        app.cancel_event.set()
        real.close()


# --- the real terminal ---------------------------------------------------------------------------------

def tmux(*args: str, socket: Path) -> str:
    return subprocess.run(["tmux", "-u", "-S", str(socket), *args], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_smoke_real_terminal_under_tmux(tiny_gguf: Path, tmp_path: Path) -> None:
    socket = tmp_path / "tmux.sock"  # a private tmux server, gone with the test's folder
    history = tmp_path / "chat.jsonl"
    command = [sys.executable, "-m", "edgezh.cli", "chat", str(tiny_gguf), "--max-tokens", "24", "--threads", "2",
               "--history", str(history)]
    shell = f"cd {ROOT} && env LANG=C.UTF-8 TERM=xterm-256color {' '.join(map(_quote, command))}; echo EXITED=$?; sleep 30"
    tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "36", shell, socket=socket)
    try:
        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", "chat", socket=socket)

        def wait_for(text: str, timeout: float = 60) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                shown = screen()
                if text in shown:
                    return shown
                time.sleep(0.2)
            raise AssertionError(f"{text!r} never appeared; the screen:\n{screen()}")

        wait_for("ctx ")  # loaded: the status line shows the context in use
        tmux("send-keys", "-t", "chat", "-l", "你好", socket=socket)
        tmux("send-keys", "-t", "chat", "Enter", socket=socket)
        shown = wait_for("tok/s")
        assert "你好" in shown and "Assistant" in shown
        tmux("send-keys", "-t", "chat", "C-q", socket=socket)
        wait_for("EXITED=0", timeout=20)
    finally:
        tmux("kill-server", socket=socket)
    lines = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines()]
    assert lines[2] == {"role": "user", "content": "你好"} and lines[3]["role"] == "assistant"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_truncated_model_on_a_terminal_is_one_line_before_any_ui(tiny_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:tiny_gguf.stat().st_size // 3])
    socket = tmp_path / "tmux.sock"
    command = [sys.executable, "-m", "edgezh.cli", "chat", str(cut), "--threads", "2"]
    shell = f"cd {ROOT} && env LANG=C.UTF-8 TERM=xterm-256color {' '.join(map(_quote, command))}; echo EXITED=$?; sleep 30"
    tmux("new-session", "-d", "-s", "chat", "-x", "200", "-y", "20", shell, socket=socket)
    try:
        deadline = time.monotonic() + 60
        while "EXITED=" not in (shown := tmux("capture-pane", "-p", "-t", "chat", socket=socket)):
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
    finally:
        tmux("kill-server", socket=socket)
    lines = [line for line in shown.splitlines() if line.strip()]
    assert lines[-1] == "EXITED=2" and len(lines) == 2, shown  # the error line, then the exit code: no app drawn
    assert lines[0].startswith("error:") and "corrupt or truncated" in lines[0]


def test_chat_without_a_terminal_is_a_plain_line_by_line_chat(tiny_gguf: Path, tmp_path: Path) -> None:
    """stdin and stdout are pipes: no Textual app (it would spin without a terminal); one answer per line read,
    then exit 0 at the end of input."""
    history = tmp_path / "plain.jsonl"
    result = subprocess.run([sys.executable, "-m", "edgezh.cli", "chat", str(tiny_gguf), "--max-tokens", "8",
                             "--threads", "2", "--seed", "3", "--history", str(history)],
                            cwd=ROOT, input="你好\n\n再见\n", capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    saved = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines()]
    assert [m.get("role") for m in saved[1:]] == ["system", "user", "assistant", "user", "assistant"]
    assert result.stdout == saved[3]["content"] + "\n" + saved[5]["content"] + "\n"
    assert "tok/s" in result.stderr and "\x1b[" not in result.stdout  # stats on stderr, no terminal codes
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:tiny_gguf.stat().st_size // 3])
    failed = run_cli("chat", str(cut), cwd=ROOT, timeout=60)
    output = (failed.stdout + failed.stderr).strip()
    assert failed.returncode == 2 and output.startswith("error:") and output.count("\n") == 0


def test_chat_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model")
    for args, message in [([str(tmp_path / "missing.gguf")], "no such file"), ([str(bad)], "not a GGUF file"),
                          ([str(tmp_path)], "not an edgezh build")]:
        result = run_cli("chat", *args, cwd=ROOT, timeout=60)
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2 and message in output and "Traceback" not in output
        assert output.startswith("error:") and output.count("\n") == 0


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
