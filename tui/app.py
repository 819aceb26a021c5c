"""`edgezh chat`: a Textual chat over the runtime engine.

One thread worker per answer iterates `ChatSession.run_turn`, which gathers the text of 50 ms into one
delta (`Generation.deltas`: the worker does not wake, nor take the GIL from llama.cpp's decode thread,
once per token). Text deltas are not messages: the worker appends them to a buffer and a UI timer
shows what arrived at most `STREAM_REFRESH_HZ` times a second, as plain text that only grows
(`StreamingAnswer`, which grows a few lines at a time so that most repaints need no layout pass);
the answer is rendered as Markdown once, when it is complete, and the prompt's cursor does not blink
meanwhile. So the UI costs a few screen refreshes a second however fast the model decodes, and
llama.cpp's threads keep the cores (the status line's tok/s is the engine's own decode rate). Every
other event (tool calls, notices, the end of a step) is a typed message whose handler first shows
the buffered text. The UI never waits for llama.cpp. Errors are notifications
(`notify(severity="error")`), and a message that could not be answered goes back into the input
box, so nothing typed is lost.

LoRA adapter sets (`--lora`): the status line says which one the answers use ("LoRA: zh ×0.8",
"LoRA: off"), and Ctrl+L cycles base → set 1 → set 2 → …; the next answer uses the new set and the
conversation stays. Without adapter sets neither the binding nor the status part is shown.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Footer, Header, Static

from edgezh.errors import UserError
from edgezh.runtime import chat as chat_events
from edgezh.runtime.adapters import AdapterSet
from edgezh.runtime.chat import ChatSession, default_history_path
from edgezh.runtime.engine import Engine, SamplingParams, Stats
from edgezh.runtime.tools import ToolCall, Toolbox

from .widgets import (AnswerMessage, ConfirmTool, NoticeMessage, PromptInput, SettingsPanel, StreamingAnswer, ToolMessage,
                      UserMessage)

STREAM_REFRESH_HZ = 5
"""Repaints a second while an answer streams. Each is a Textual screen refresh (a few ms on one core),
time that llama.cpp's threads lose on a 2-core machine; what 10 against 5 a second costs the decode
rate is measured in docs/benchmarks.md ("Chat app")."""


@dataclass
class ChatConfig:
    """Everything `edgezh chat` was asked for."""

    model: Path
    template: str | None = None
    system: str | None = None
    n_ctx: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    """None: every layer on the GPU when llama.cpp can offload, else 0."""
    params: SamplingParams = field(default_factory=SamplingParams)
    resume: Path | None = None
    history: Path | None = None
    """Where to save the chat (default: a new file under the cache's chats/)."""
    toolbox: Toolbox = field(default_factory=Toolbox)
    auto_confirm: bool = False
    """--yes: run tool calls without asking."""
    repack: bool = False
    """--repack: llama.cpp's repacked CPU weights (see `edgezh.runtime.loader`)."""
    adapters: tuple[AdapterSet, ...] = ()
    """--lora: LoRA adapter sets to load with the model (Ctrl+L switches between them)."""


class EngineLoaded(Message):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine


class EngineFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class TurnEvent(Message):
    """One event of `ChatSession.run_turn`, carried from the worker to the UI."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


class TurnFailed(Message):
    def __init__(self, error: str, text: str):
        super().__init__()
        self.error = error
        self.text = text


class ChatApp(App[int]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses live elsewhere
    TITLE = "edgezh chat"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", priority=True, show=False),
        Binding("ctrl+c", "cancel", "Cancel", priority=True),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "copy_last", "Copy answer"),
        Binding("f2", "toggle_settings", "Settings"),
        Binding("ctrl+l", "cycle_lora", "LoRA", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, config: ChatConfig, *, engine: Engine | None = None,
                 loader: Callable[..., Engine] = Engine.load):
        super().__init__()
        self.config = config
        self.engine = engine
        self.loader = loader
        self.session: ChatSession | None = None
        self.generating = False
        self.cancel_event = threading.Event()
        self.last_stats: Stats | None = None
        self._answer: StreamingAnswer | None = None
        self._finished_answer: AnswerMessage | None = None
        self._incoming: list[str] = []
        self._incoming_lock = threading.Lock()
        self._tool_widgets: dict[str, ToolMessage] = {}
        self._pending_text = ""
        self._confirm_done: threading.Event | None = None
        self._user_widget: UserMessage | None = None

    # --- layout --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        config = self.config
        yield Header(show_clock=False, icon="⌂")
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield VerticalScroll(id="conversation")
                yield PromptInput(id="prompt", placeholder="输入消息，Enter 发送，Ctrl+J 换行 · Type a message")
            yield SettingsPanel(config.system or "", config.params, config.n_ctx, config.threads,
                                config.gpu_layers, id="settings")
        yield Static("", id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.config.model.name
        self.query_one("#conversation", VerticalScroll).anchor()
        self.query_one(PromptInput).focus()
        self._repaint = self.set_interval(1 / STREAM_REFRESH_HZ, self._show_incoming, pause=True)
        if self.engine is not None:
            self._engine_ready(self.engine)
        else:
            self._set_status(f"正在加载 {self.config.model.name} … · loading")
            self._load(self.config.n_ctx, self.config.threads, self.config.gpu_layers)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load(self, n_ctx: int | None, threads: int | None, gpu_layers: int | None) -> None:
        try:
            engine = self.loader(self.config.model, template=self.config.template, n_ctx=n_ctx,
                                 n_threads=threads, n_gpu_layers=gpu_layers, repack=self.config.repack,
                                 adapters=self.config.adapters)
        except UserError as exc:
            self.post_message(EngineFailed(str(exc)))
        except Exception as exc:  # a bug, but the user keeps the app and what they typed
            self.post_message(EngineFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self.post_message(EngineLoaded(engine))

    @on(EngineLoaded)
    def _on_engine_loaded(self, message: EngineLoaded) -> None:
        old = self.engine
        self._engine_ready(message.engine)
        if old is not None and old is not message.engine:
            old.close()

    @on(EngineFailed)
    def _on_engine_failed(self, message: EngineFailed) -> None:
        self.notify(message.error, title="无法加载模型 · cannot load the model", severity="error", timeout=15)
        if self.engine is None:
            self._set_status(f"没有加载模型 · no model loaded: {self.config.model.name}")
        else:
            self._show_context()

    def _engine_ready(self, engine: Engine) -> None:
        self.engine = engine
        panel = self.query_one(SettingsPanel)
        panel.set_load_values(engine.n_ctx, engine.n_threads, engine.n_gpu_layers)
        if self.session is None:
            self._start_session(engine)
        else:
            self.session.engine = engine
        self.sub_title = f"{engine.name} · {engine.format.name}"
        self.refresh_bindings()  # Ctrl+L shows when the engine has adapter sets
        self._show_context()

    def _start_session(self, engine: Engine) -> None:
        config = self.config
        options = dict(toolbox=config.toolbox, confirm=self._confirm_from_worker)
        try:
            if config.resume is not None:
                self.session = ChatSession.resume(engine, config.resume, **options)
                if config.system:
                    self.session.set_system(config.system)
            else:
                self.session = ChatSession(engine, system=config.system, history=config.history or default_history_path(),
                                           **options)
        except UserError as exc:
            self.notify(str(exc), title="无法恢复对话 · cannot resume", severity="error", timeout=15)
            self.session = ChatSession(engine, system=config.system, history=config.history or default_history_path(),
                                       **options)
        self.session.coalesce = 1 / (2 * STREAM_REFRESH_HZ)  # the worker wakes at most twice per repaint
        system = self.session.system or ""
        from textual.widgets import TextArea

        self.query_one("#system", TextArea).text = system
        self._render_history()

    def _render_history(self) -> None:
        conversation = self.query_one("#conversation", VerticalScroll)
        conversation.remove_children()
        assert self.session is not None
        widgets = []
        results = {m.get("tool_call_id"): m.get("content", "") for m in self.session.messages if m.get("role") == "tool"}
        for message in self.session.messages:
            role = message.get("role")
            if role == "user":
                widgets.append(UserMessage(message.get("content", "")))
            elif role == "assistant" and message.get("tool_calls"):
                for call in message["tool_calls"]:
                    function = call.get("function", call)
                    text = ToolCall(function["name"], _as_dict(function.get("arguments"))).describe()
                    widgets.append(ToolMessage(text, results.get(call.get("id")), status="已运行 · done"))
            elif role == "assistant":
                cancelled = (message.get("meta") or {}).get("cancelled")
                widgets.append(AnswerMessage(message.get("content") or "", note="已取消 · cancelled" if cancelled else None))
        if widgets:
            conversation.mount_all(widgets)
        conversation.scroll_end(animate=False)

    # --- sending -------------------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    def _on_submit(self, message: PromptInput.Submitted) -> None:
        text = message.text.strip()
        if self.generating:
            self.notify("还在回答中，Esc 取消 · still answering; Esc cancels", severity="warning")
            return
        if self.engine is None or self.session is None:
            self.notify(f"没有加载模型 · no model is loaded ({self.config.model.name})", severity="error")
            return
        settings = self._read_settings()
        if settings is None:
            return
        if settings.system != (self.session.system or ""):
            self.session.set_system(settings.system or None)
        self.query_one(PromptInput).clear()
        self._pending_text = message.text
        self._user_widget = UserMessage(text)
        self.query_one("#conversation", VerticalScroll).mount(self._user_widget)
        self.cancel_event = threading.Event()
        self._answer = None
        self._set_status("生成中… Esc 取消 · generating, Esc cancels")
        self._streaming(True)
        self._run_turn(text, settings.params)

    @work(thread=True, group="turn", exit_on_error=False)
    def _run_turn(self, text: str, params: SamplingParams) -> None:
        assert self.session is not None
        try:
            for event in self.session.run_turn(text, params, cancel=self.cancel_event):
                if isinstance(event, chat_events.Delta):
                    with self._incoming_lock:  # shown by the UI timer, not one message per token
                        self._incoming.append(event.text)
                else:
                    self.post_message(TurnEvent(event))
        except UserError as exc:
            self.post_message(TurnFailed(str(exc), text))
        except Exception as exc:
            self.post_message(TurnFailed(f"{type(exc).__name__}: {exc}", text))

    def _confirm_from_worker(self, call: ToolCall) -> bool:
        """Called in the worker thread: ask on the UI thread and wait for the answer (or a cancel)."""
        if self.config.auto_confirm:
            return True
        answer: list[bool] = []
        done = threading.Event()
        self._confirm_done = done

        def ask() -> None:
            def dismissed(value: bool | None) -> None:
                answer.append(bool(value))
                done.set()

            self.push_screen(ConfirmTool(call.describe()), dismissed)

        try:
            self.call_from_thread(ask)
            while not done.wait(0.05):
                if self.cancel_event.is_set():
                    self.call_from_thread(self._dismiss_confirm)
                    done.wait(1)
                    return False
        except RuntimeError:  # the app is gone
            return False
        return bool(answer and answer[0])

    def _dismiss_confirm(self) -> None:
        if isinstance(self.screen, ConfirmTool):
            self.screen.dismiss(False)

    def _streaming(self, on: bool) -> None:
        """An answer starts or ends: the repaint timer runs only meanwhile, and the prompt's cursor
        stops blinking (each blink is a screen refresh, time the cores would not decode)."""
        self.generating = on
        if on:
            self._repaint.resume()
        else:
            self._repaint.pause()
        self.query_one(PromptInput).cursor_blink = not on

    async def _show_incoming(self) -> None:
        """Append what the worker buffered to the streaming answer (the UI timer, and before events)."""
        with self._incoming_lock:
            text, self._incoming = "".join(self._incoming), []
        if not text:
            return
        if self._answer is None:
            self._answer = StreamingAnswer()
            await self.query_one("#conversation", VerticalScroll).mount(self._answer)
        self._answer.append(text)

    async def _finish_answer(self, text: str | None) -> AnswerMessage | None:
        """Replace the streaming text by the answer rendered as Markdown (`text`: what to show,
        the ReAct final answer for instance; None: drop it, a tool widget shows the call)."""
        streaming, self._answer = self._answer, None
        if streaming is None:
            return None
        answer = None
        if text is not None:
            answer = AnswerMessage(text)
            await self.query_one("#conversation", VerticalScroll).mount(answer, before=streaming)
        await streaming.remove()
        return answer

    @on(TurnEvent)
    async def _on_turn_event(self, message: TurnEvent) -> None:
        event = message.event
        conversation = self.query_one("#conversation", VerticalScroll)
        await self._show_incoming()
        if isinstance(event, chat_events.Notice):
            await conversation.mount(NoticeMessage(event.text))
            self.notify(event.text, severity=event.severity)  # type: ignore[arg-type]
        elif isinstance(event, chat_events.StepDone):
            finished = await self._finish_answer(None if event.tool_calls else event.text)
            self._finished_answer = None if event.tool_calls else finished
            self._show_stats(event.stats)
        elif isinstance(event, chat_events.ToolRequest):
            widget = ToolMessage(event.call.describe())
            self._tool_widgets[event.call.id] = widget
            await conversation.mount(widget)
        elif isinstance(event, chat_events.ToolResult):
            widget = self._tool_widgets.get(event.call.id)
            status = "已运行 · ran" if event.ran else "未运行 · not run"
            if widget is None:
                widget = ToolMessage(event.call.describe(), event.result, status=status)
                await conversation.mount(widget)
            else:
                widget.show(event.result, status)
        elif isinstance(event, chat_events.TurnDone):
            answer = await self._finish_answer(event.text) or self._finished_answer
            if event.finish_reason == "cancelled":
                if answer is not None:
                    answer.border_subtitle = "已取消 · cancelled"
                else:
                    await conversation.mount(NoticeMessage("已取消 · cancelled"))
            elif event.finish_reason == "length" and answer is not None:
                answer.border_subtitle = "达到长度上限 · max tokens reached"
            self._answer = self._finished_answer = None
            self._streaming(False)
            self._pending_text = ""
            self._show_stats(event.stats)

    @on(TurnFailed)
    async def _on_turn_failed(self, message: TurnFailed) -> None:
        await self._show_incoming()
        await self._finish_answer(None)
        self._streaming(False)
        if self._user_widget is not None and self.session is not None and \
                not any(m.get("role") == "user" and m.get("content") == message.text for m in self.session.messages[-1:]):
            await self._user_widget.remove()
        prompt = self.query_one(PromptInput)
        if not prompt.text.strip():  # give the message back
            prompt.text = self._pending_text or message.text
            prompt.move_cursor(prompt.document.end)
        self.notify(message.error, title="无法回答 · cannot answer", severity="error", timeout=15)
        self._show_context()

    # --- actions -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.generating  # when idle, Esc and Ctrl+C keep their usual meaning
        if action == "cycle_lora":
            return bool(self.engine is not None and self.engine.adapter_sets)
        return True

    async def action_quit(self) -> None:
        self.cancel_event.set()  # a running answer stops instead of generating on after the UI is gone
        await super().action_quit()

    def on_unmount(self) -> None:
        self.cancel_event.set()

    def action_cancel(self) -> None:
        self.cancel_event.set()
        self._set_status("正在取消… · cancelling")

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("先取消当前回答（Esc）· cancel the answer first (Esc)", severity="warning")
            return
        if self.session is None:
            return
        self.session.new_chat(default_history_path() if self.config.history is None or self.config.resume
                              else _numbered(self.config.history))
        self.config.resume = None
        self._render_history()
        self.last_stats = None
        self._show_context()
        self.notify("新对话 · new chat")

    def action_copy_last(self) -> None:
        answer = self.session.last_answer() if self.session else None
        if not answer:
            self.notify("还没有回答可复制 · no answer to copy yet", severity="warning")
            return
        self.copy_to_clipboard(answer)
        self.notify("已复制最后的回答 · last answer copied")

    def action_cycle_lora(self) -> None:
        """The next LoRA adapter set (after the last one: the base alone) for the next answers."""
        if self.engine is None or self.session is None or not self.engine.adapter_sets:
            return
        names = [None] + [item.name for item in self.engine.adapter_sets]
        current = names.index(self.session.adapters) if self.session.adapters in names else 0
        self.session.adapters = names[(current + 1) % len(names)]
        self.notify(f"{self._lora_text()} · 下一个回答使用 · the next answer uses it")
        if not self.generating:
            self._show_context()

    def _lora_text(self) -> str:
        """`LoRA: zh ×0.8` or `LoRA: off` ('' when the engine has no adapter sets)."""
        if self.engine is None or not self.engine.adapter_sets:
            return ""
        active = self.engine.adapter_set(self.session.adapters if self.session else None)
        return f"LoRA: {active.label() if active else 'off'}"

    def action_toggle_settings(self) -> None:
        panel = self.query_one(SettingsPanel)
        panel.display = not panel.display

    @on(Button.Pressed, "#reload")
    def _on_reload(self) -> None:
        if self.generating:
            self.notify("先取消当前回答（Esc）· cancel the answer first (Esc)", severity="warning")
            return
        settings = self._read_settings()
        if settings is None:
            return
        self._set_status("正在重新加载… · reloading")
        self._load(settings.n_ctx, settings.threads, settings.gpu_layers)

    def _read_settings(self):
        """The settings panel's values, or None after telling the user what is wrong with them."""
        try:
            return self.query_one(SettingsPanel).read()
        except ValueError as exc:
            self.notify(str(exc), title="设置有误 · settings", severity="error")
            return None

    # --- status line ---------------------------------------------------------------------------------

    def _set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def _show_stats(self, stats: Stats) -> None:
        self.last_stats = stats
        engine = self.engine
        prefix = f"{engine.name} · {engine.format.name} · " if engine else ""
        lora = self._lora_text()
        self._set_status(prefix + stats.summary() + (f" · {lora}" if lora else ""))

    def _show_context(self) -> None:
        """Context in use by the conversation so far (before any answer in this run)."""
        if self.engine is None or self.session is None:
            return
        try:
            used = len(self.engine.prompt_tokens(ChatSession._plain(self.session.messages)))
        except UserError:
            used = 0
        gpu = "GPU" if self.engine.n_gpu_layers else "CPU"
        lora = self._lora_text()
        self._set_status(f"{self.engine.name} · {self.engine.format.name} · {gpu} · ctx {used}/{self.engine.n_ctx}"
                         + (f" · {lora}" if lora else ""))


def _as_dict(arguments: object) -> dict:
    import json

    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return {"arguments": arguments}
        return value if isinstance(value, dict) else {"arguments": value}
    return arguments if isinstance(arguments, dict) else {}


def _numbered(path: Path) -> Path:
    """`chat.jsonl` → `chat-2.jsonl` (the first free number): a new chat never overwrites the old one."""
    number = 2
    while True:
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        if not candidate.exists():
            return candidate
        number += 1
