"""Widgets of the chat: messages, the prompt box, the settings panel, the tool confirmation."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, Static, TextArea

from edgezh.runtime.engine import SamplingParams


class UserMessage(Static):
    """What the user sent (plain text: no markup is interpreted)."""

    def __init__(self, text: str):
        super().__init__(text, markup=False)
        self.text = text
        self.border_title = "你 · You"


class StreamingAnswer(Static):
    """The answer while it streams: plain text that only grows (no Markdown parse per delta); the app
    replaces it by an `AnswerMessage` rendered once when the answer is complete. A repaint of the text
    alone costs ~4 ms of Textual's screen refresh; one that changes the box's height lays the whole
    screen out again (~9 ms on this app's 40 widgets, docs/benchmarks.md, "Chat app"). So the box grows
    `GROW_LINES` lines ahead of its text: the screen is laid out once every few lines, not at each."""

    GROW_LINES = 4
    """Blank lines the box keeps below its text when it grows (so at most this many show)."""

    def __init__(self) -> None:
        super().__init__("", markup=False)
        self.source = ""
        self.lines = 0
        """Text lines the box has room for (its content height once laid out)."""
        self.border_title = "助手 · Assistant"

    def append(self, text: str) -> None:
        self.source += text
        width = self.content_size.width
        if not width:  # not laid out yet: the first layout pass sizes the box
            self.update(self.source)
            return
        needed = Content(self.source).get_height(self.styles, width)
        resize = not self.lines - self.GROW_LINES <= needed <= self.lines  # more text, or a new width
        if resize:
            self.lines = needed + self.GROW_LINES
        self.update(self.source + "\n" * (self.lines - needed), layout=resize)


class AnswerMessage(Markdown):
    """The assistant's answer, rendered as Markdown (once, when it is complete)."""

    def __init__(self, text: str = "", *, note: str | None = None):
        super().__init__(text)
        self.border_title = "助手 · Assistant"
        if note:
            self.border_subtitle = note


class ToolMessage(Static):
    """A tool call the model asked for, and its result once it ran."""

    def __init__(self, call_text: str, result: str | None = None, *, status: str = "等待确认 · waiting for confirmation"):
        super().__init__(markup=False)
        self.call_text = call_text
        self.border_title = "工具 · Tool"
        self.show(result, status)

    def show(self, result: str | None, status: str) -> None:
        self.border_subtitle = status
        body = f"🔧 {self.call_text}"
        if result is not None:
            body += f"\n→ {result}"
        self.update(body)


class NoticeMessage(Static):
    """A line from edgezh itself (context overflow, a cancelled answer)."""

    def __init__(self, text: str):
        super().__init__(text, markup=False)


class PromptInput(TextArea):
    """Multi-line input: Enter sends; Ctrl+J, Shift+Enter or Alt+Enter start a new line (pasted
    text keeps its newlines)."""

    @dataclass
    class Submitted(Message):
        text: str

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", compact=True, **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("ctrl+j", "shift+enter", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


@dataclass
class Settings:
    """What the side panel holds, parsed."""

    system: str
    params: SamplingParams
    n_ctx: int | None
    threads: int | None
    gpu_layers: int | None


class SettingsPanel(VerticalScroll):
    """System prompt, sampling, and the load settings (context, threads, GPU layers)."""

    FIELDS = (  # id, label, kind
        ("temperature", "temperature", float), ("top_p", "top_p", float), ("top_k", "top_k", int),
        ("repeat_penalty", "repeat penalty", float), ("max_tokens", "max tokens", int),
        ("n_ctx", "context (tokens)", int), ("threads", "threads", int), ("gpu_layers", "GPU layers (auto: empty)", int),
    )

    def __init__(self, system: str, params: SamplingParams, n_ctx: int | None, threads: int | None,
                 gpu_layers: int | None, **kwargs):
        super().__init__(**kwargs)
        self._values = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                        "repeat_penalty": params.repeat_penalty, "max_tokens": params.max_tokens,
                        "n_ctx": n_ctx, "threads": threads, "gpu_layers": gpu_layers}
        self._system = system
        self._base = params
        self.border_title = "设置 · Settings"

    def compose(self) -> ComposeResult:
        yield Label("系统提示 · system prompt")
        yield TextArea(self._system, id="system", soft_wrap=True, compact=True)
        for key, label, kind in self.FIELDS:
            value = self._values[key]
            yield Label(label)
            yield Input("" if value is None else f"{value:g}" if isinstance(value, float) else str(value),
                        id=key, type="integer" if kind is int else "number", compact=True)
        yield Button("重新加载 · Reload model", id="reload", compact=True)

    def set_load_values(self, n_ctx: int, threads: int, gpu_layers: int) -> None:
        for key, value in (("n_ctx", n_ctx), ("threads", threads)):
            field = self.query_one(f"#{key}", Input)
            if not field.value:
                field.value = str(value)

    def read(self) -> Settings:
        """The panel's values; ValueError naming every bad field."""
        values: dict[str, object] = {}
        problems = []
        for key, label, kind in self.FIELDS:
            raw = self.query_one(f"#{key}", Input).value.strip()
            if not raw:
                values[key] = None
                continue
            try:
                values[key] = kind(raw)
            except ValueError:
                problems.append(f"{label}: {raw!r} is not {'an integer' if kind is int else 'a number'}")
        if problems:
            raise ValueError("; ".join(problems))
        changes = {k: values[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens")
                   if values[k] is not None}
        params = SamplingParams(**{**self._base.__dict__, **changes})
        problems = params.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return Settings(self.query_one("#system", TextArea).text.strip(), params,
                        values["n_ctx"], values["threads"], values["gpu_layers"])  # type: ignore[arg-type]


class ConfirmTool(ModalScreen[bool]):
    """Run this tool call? y / n."""

    BINDINGS = [Binding("y", "answer(True)", "Run"), Binding("n", "answer(False)", "Skip"),
                Binding("escape", "answer(False)", "Skip")]

    def __init__(self, call_text: str):
        super().__init__()
        self.call_text = call_text

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static("模型想调用工具 · The model wants to run a tool:", classes="title")
            yield Static(self.call_text, markup=False, classes="call")
            with Horizontal(classes="buttons"):
                yield Button("运行 Run (y)", id="run", variant="success")
                yield Button("跳过 Skip (n)", id="skip", variant="error")

    @on(Button.Pressed, "#run")
    def _run(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#skip")
    def _skip(self) -> None:
        self.dismiss(False)

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)
