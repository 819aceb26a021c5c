"""Progress shown to the person at the terminal (rich), shared by every stage."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, status, errors
out = Console(highlight=False, soft_wrap=True)  # what a command prints as its result (tables, plans)
T = TypeVar("T")


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for one step of unknown length; prints the step and its time when done."""
    started = time.monotonic()
    with console.status(message):
        yield
    console.print(f"  [dim]{message} — {time.monotonic() - started:.1f}s[/dim]")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over `items`."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)
