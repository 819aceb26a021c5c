"""Keeping the libraries' output off the console.

transformers, TRL, peft, datasets, DeepSpeed, GPTQModel and torch log, warn, draw tqdm bars and print
(GPTQModel dumps the model to stdout; DeepSpeed warns at import that it fell back to the CPU). During a
build all of it goes to `builds/<name>/build.log` (`build_output`), and the console shows only
edgezh's own lines and bars (`edgezh.progress`); with `-v` it is shown live as well. Elsewhere
(`edgezh doctor`) `captured` keeps it off the console.

How: `sys.stdout` / `sys.stderr` are replaced by a `LogStream` for the duration (what is printed,
tqdm bars, the deepspeed launcher's output relayed from its processes); the logging handlers that
libraries attached to the console streams before that are pointed at it too; the root logger gets
the log handler (libraries whose loggers propagate: peft, datasets' warnings, …) and `warnings` are
logged. edgezh's consoles (`progress.console`, `progress.out`) stay on the real terminal. Errors are
not hidden: a UserError is printed by the CLI after the build's output is restored, a traceback by
Python, and both are also written to the log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Iterator, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's (and transformers' "Loading weights") tqdm bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Set for the build (and the processes it launches) unless -v: bars nobody sees, only the log would hold."""


class LogStream(io.TextIOBase):
    """A text stream that writes into a log file line by line, keeping of a line only what follows its last
    carriage return (a tqdm bar leaves its final state, not every redraw). With `echo`, each line is also
    shown on that console (above edgezh's live bars). Lines that a launched process printed for edgezh's
    progress (`progress.MARKER`) update the bars instead."""

    def __init__(self, sink: TextIO | None, lock: threading.RLock, echo=None):
        super().__init__()
        self._sink, self._lock, self._echo = sink, lock, echo
        self._partial = ""

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        """The log file's descriptor: what is written to it at the C level lands in the log too."""
        if self._sink is None:
            raise io.UnsupportedOperation("fileno")
        return self._sink.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            text = str(text)
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(line.rsplit("\r", 1)[-1])
        return len(text)

    def _line(self, line: str) -> None:
        from edgezh import progress

        if line.startswith(progress.MARKER):
            try:
                progress.remote_update(json.loads(line[len(progress.MARKER):]))
            except ValueError:
                pass
            return
        if self._sink is not None:
            self._sink.write(line + "\n")
        if self._echo is not None:
            self._echo.out(line, highlight=False)

    def flush(self) -> None:
        with self._lock:
            if self._sink is not None and not self._sink.closed:
                self._sink.flush()

    def close_partial(self) -> None:
        """Write out a last line that never got its newline."""
        with self._lock:
            if self._partial.rsplit("\r", 1)[-1].strip():
                self._line(self._partial.rsplit("\r", 1)[-1])
            self._partial = ""


def _all_loggers() -> list[logging.Logger]:
    loggers = [logging.getLogger()]
    loggers += [v for v in list(logging.Logger.manager.loggerDict.values()) if isinstance(v, logging.Logger)]
    return loggers


def _console_handlers(streams: tuple) -> list[logging.StreamHandler]:
    """Handlers that write to the terminal: plain StreamHandlers (a library's own) and any on a std stream."""
    found = []
    for logger in _all_loggers():
        for handler in list(logger.handlers):
            if (isinstance(handler, (logging.FileHandler, logging._StderrHandler))  # the latter follows sys.stderr
                    or not isinstance(handler, logging.StreamHandler)):
                continue
            if type(handler) is logging.StreamHandler or any(handler.stream is s for s in streams):
                found.append(handler)
    return found


def _set_stream(handler: logging.StreamHandler, stream) -> object | None:
    """Point a handler at `stream`; returns the stream it had (None when it cannot be moved)."""
    old = getattr(handler, "stream", None)
    if old is stream:
        return None
    try:
        handler.setStream(stream)
    except AttributeError:  # a handler whose stream is a read-only property
        return None
    except (ValueError, OSError):  # its old stream is closed (flushing it failed)
        handler.stream = stream
    return old


def _quiet_libraries() -> None:
    """Switch off the bars of libraries already imported (the environment covers the ones imported later)."""
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 — cosmetic only
            pass
    if "datasets" in sys.modules:
        try:
            import datasets

            datasets.disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass


@contextmanager
def redirected(sink: TextIO | None, *, verbose: bool = False, env: dict[str, str] | None = None) -> Iterator[LogStream]:
    """Everything the libraries write to the console goes to `sink` (None: nowhere); with `verbose` it is
    shown too. edgezh's consoles keep writing to the real terminal. Undone on exit."""
    from edgezh.progress import console, out

    real_out, real_err = sys.stdout, sys.stderr
    lock = threading.RLock()
    stream = LogStream(sink, lock, echo=console if verbose else None)
    saved_consoles = (console._file, out._file)
    console.file, out.file = real_err, real_out
    std = (real_out, real_err, sys.__stdout__, sys.__stderr__)
    moved = []
    for handler in _console_handlers(std):
        old = _set_stream(handler, stream)
        if old is not None:
            moved.append((handler, old))
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    captured = logging.captureWarnings
    captured(True)
    try:
        with redirect_stdout(stream), redirect_stderr(stream):
            yield stream
    finally:
        stream.close_partial()
        stream.flush()
        captured(False)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for handler, old in moved:
            _set_stream(handler, old)
        for handler in _console_handlers((stream,)):  # attached during the build (a library imported then)
            if handler.stream is stream:
                _set_stream(handler, sys.__stderr__ or sys.stderr)
        console._file, out._file = saved_consoles


@contextmanager
def build_output(log_path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """While a build runs: edgezh's log records and all third-party output go to `log_path` (appended);
    the console keeps edgezh's progress; `verbose` shows the third-party output live as well."""
    from edgezh.errors import UserError
    from edgezh.progress import REMOTE_ENV

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(log_path, "a", encoding="utf-8", buffering=1)
    env = {REMOTE_ENV: "1"}
    if not verbose:
        env.update(QUIET_ENV)
        _quiet_libraries()
    root, edgezh_log = logging.getLogger(), logging.getLogger("edgezh")
    levels = (root.level, edgezh_log.level)
    try:
        with redirected(sink, verbose=verbose, env=env) as stream:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            handler.setLevel(logging.INFO)
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            edgezh_log.setLevel(logging.INFO)
            try:
                yield log_path
            except UserError as exc:
                edgezh_log.error("build stopped: %s", exc)
                raise
            except BaseException:
                edgezh_log.exception("build failed")
                raise
            finally:
                root.removeHandler(handler)
                root.setLevel(levels[0])
                edgezh_log.setLevel(levels[1])
    finally:
        sink.close()


@contextmanager
def captured(*, verbose: bool = False) -> Iterator[None]:
    """Outside a build: what libraries print or log meanwhile is dropped (shown with `verbose`)."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    handler = logging.NullHandler()  # keeps logging's last-resort handler (stderr) out of it
    root.addHandler(handler)
    try:
        with redirected(None):
            yield
    finally:
        root.removeHandler(handler)
