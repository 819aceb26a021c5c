"""Progress shown to the person at the terminal (rich), shared by every stage.

During a build each stage has one live line (`begin_stage` / `end_stage`): a spinner, the stage, what
it is doing now (`status`), the time so far; its bars (`track`, `bar`: rate, ETA and, on the training
bars, the loss) sit under it. The live lines are transient: what stays on the console is the
stage's one result line, printed by the build; the time each step took goes to build.log. Outside a
build (`edgezh convert`, `quantize`, …) `status` prints each finished step and `track` leaves its bar.

A training process started by the deepspeed launcher has no console: with `REMOTE_ENV` set its bars
are printed as `MARKER` lines, which the build reads back from the launcher's output
(`edgezh.quiet.LogStream`) and shows on the stage's live line (`remote_update`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, status, errors
out = Console(highlight=False, soft_wrap=True)  # what a command prints as its result (tables, plans)
T = TypeVar("T")
log = logging.getLogger("edgezh.progress")

MARKER = "\x1eedgezh-progress "
"""Prefix of a progress line printed by a launched training process (followed by one JSON object)."""
REMOTE_ENV = "EDGEZH_PROGRESS_LINES"
"""Set (to 1) in the environment of a build's launched processes: their bars become MARKER lines."""


class _IfTotal(ProgressColumn):
    """A column shown only for tasks with a known total (a stage's own line has none)."""

    def __init__(self, column: ProgressColumn):
        super().__init__()
        self.column = column

    def render(self, task: Task):
        return self.column.render(task) if task.total is not None else Text("")


class _Rate(ProgressColumn):
    """Items per second, or seconds per item when slower than one a second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if task.total is None or not speed:
            return Text("")
        text = f"{speed:.2f} {unit}/s" if speed >= 1 else f"{1 / speed:.1f} s/{unit}"
        return Text(text, style="progress.data.speed")


class _Info(ProgressColumn):
    """Free text of a task (the training bars' loss)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")), style="cyan")


def _progress(transient: bool) -> Progress:
    # redirect_* off: during a build sys.stdout/sys.stderr lead to build.log, and must stay there.
    # A transient display is for a terminal only (written to a file or pipe it would leave blank lines).
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), _IfTotal(BarColumn()),
                    _IfTotal(MofNCompleteColumn()), _Info(), _Rate(), TimeElapsedColumn(),
                    _IfTotal(TimeRemainingColumn()), console=console, transient=transient,
                    redirect_stdout=False, redirect_stderr=False, disable=transient and not console.is_interactive)


class _Stage:
    def __init__(self, label: str):
        self.label = label
        self.progress = _progress(transient=True)
        self.task = self.progress.add_task(label, total=None)
        self.remote: dict[str, Bar] = {}
        self.progress.start()


_stage: _Stage | None = None


def begin_stage(label: str) -> None:
    """Start the live line of a build stage (ends the previous one, if any)."""
    global _stage
    end_stage()
    _stage = _Stage(label)


def end_stage() -> None:
    """Remove the stage's live line and its bars (nothing of them stays on the console)."""
    global _stage
    stage, _stage = _stage, None
    if stage is not None:
        stage.progress.stop()


class _Line:
    """What `status` yields: ``update(message)`` replaces the step's text while it runs (counts, say)."""

    def __init__(self, show):
        self.show = show

    def update(self, message: str) -> None:
        self.show(message)


@contextmanager
def status(message: str) -> Iterator[_Line]:
    """One step of unknown length: on a build stage's live line, else a spinner and then a printed line."""
    started = time.monotonic()
    stage = _stage
    if stage is not None:
        before = stage.progress.tasks[0].description if stage.progress.tasks else stage.label
        show = lambda text: stage.progress.update(stage.task, description=f"{stage.label} [dim]· {escape(text)}[/]")  # noqa: E731
        show(message)
        try:
            yield _Line(show)
        finally:
            stage.progress.update(stage.task, description=before)
            log.info("%s — %.1fs", message, time.monotonic() - started)
        return
    with console.status(escape(message)) as spinner:
        yield _Line(lambda text: spinner.update(escape(text)))
    console.print(f"  [dim]{escape(message)} — {time.monotonic() - started:.1f}s[/dim]")


class Bar:
    """A progress bar: `update(completed=…, advance=…, info=…)`, then `close()`."""

    def __init__(self, description: str, total: float | None, *, unit: str = "it", completed: float = 0,
                 info: str = ""):
        self.description, self.unit = description, unit
        self.started = time.monotonic()
        self._own: Progress | None = None
        self._remote = os.environ.get(REMOTE_ENV) == "1" and _stage is None
        if self._remote:
            self._send({"description": description, "total": total, "completed": completed, "unit": unit, "info": info})
            return
        stage = _stage
        if stage is None:
            self._own = _progress(transient=False)
            self._own.start()
        self._progress = stage.progress if stage is not None else self._own
        self._task: TaskID = self._progress.add_task(f"  {description}" if stage else description, total=total,
                                                     completed=completed, unit=unit, info=info)

    def _send(self, payload: dict) -> None:
        sys.stdout.write(MARKER + json.dumps({"id": self.description, **payload}, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def update(self, *, completed: float | None = None, advance: float | None = None, info: str | None = None,
               total: float | None = None) -> None:
        given = {k: v for k, v in (("completed", completed), ("advance", advance), ("info", info), ("total", total))
                 if v is not None}
        if self._remote:
            self._send(given)
        else:
            self._progress.update(self._task, **given)

    def close(self) -> None:
        if self._remote:
            self._send({"done": True})
            return
        task = self._progress._tasks.get(self._task)
        if task is not None:
            log.info("%s: %s/%s %s in %.1fs%s", self.description, int(task.completed),
                     int(task.total) if task.total is not None else "?", self.unit, time.monotonic() - self.started,
                     f" ({task.fields.get('info')})" if task.fields.get("info") else "")
        if self._own is not None:
            self._own.stop()
        elif task is not None:
            self._progress.remove_task(self._task)


def bar(description: str, total: float | None, *, unit: str = "it", completed: float = 0, info: str = "") -> Bar:
    """A bar under the current build stage's line (or a bar of its own outside a build)."""
    return Bar(description, total, unit=unit, completed=completed, info=info)


def remote_update(payload: dict[str, Any]) -> None:
    """A MARKER line from a launched process: create, update or close its bar on the stage's live line."""
    stage = _stage
    if stage is None or not isinstance(payload, dict):
        return
    key = str(payload.get("id", ""))
    if payload.get("done"):
        done = stage.remote.pop(key, None)
        if done is not None:
            done.close()
        return
    fields = {k: payload[k] for k in ("completed", "advance", "info", "total") if payload.get(k) is not None}
    if key not in stage.remote:
        stage.remote[key] = Bar(key, payload.get("total"), unit=str(payload.get("unit", "it")),
                                completed=payload.get("completed") or 0, info=str(payload.get("info", "")))
    else:
        stage.remote[key].update(**fields)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over `items`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _stage is not None:
        handle = bar(description, total)
        try:
            for item in items:
                yield item
                handle.update(advance=1)
        finally:
            handle.close()
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)
