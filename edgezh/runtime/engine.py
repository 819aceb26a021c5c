"""The chat engine: one GGUF in llama.cpp (llama-cpp-python), used by the TUI and by the server.

- Loading names what went wrong in one line: a missing file, a file that is not a GGUF, a corrupt
  or truncated one, not enough memory for the model or its context.
- The chat format comes from the registry: `templates.detect` on the GGUF's embedded template,
  or the name given. Prompts are rendered by the registry and tokenized with `add_bos=False,
  special=True` — the llama3 templates print `<|begin_of_text|>` themselves, ChatML has none — so
  a prompt holds exactly the BOS the format asks for.
- Generation runs llama.cpp's own sampler chain through `Llama.generate` (the loop behind
  `create_completion`, with its KV-cache prefix reuse across turns), stops on every stop token of
  the format (and any end-of-generation token of the vocabulary), on stop strings, at max_tokens,
  at the end of the context, or when `cancel` is set. Text is built from token pieces
  (`decoding`), so it is UTF-8 safe.
- A conversation that does not fit drops its oldest turns (never the system prompt) and says how
  many messages went (`Generation.dropped`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import io
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from edgezh import templates
from edgezh.errors import UserError
from edgezh.runtime.decoding import PieceTable, StopStrings, Utf8Stream
from edgezh.gguf_meta import read_metadata

__all__ = ["ContextOverflow", "Engine", "Generation", "SamplingParams", "Stats", "check_gguf", "default_threads"]


class ContextOverflow(UserError):
    """The prompt cannot fit the context even after dropping every earlier turn."""


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp sampling settings for one generation (defaults match the shipped Modelfiles)."""

    temperature: float = 0.7
    """0 picks the most likely token (greedy)."""
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 512
    seed: int | None = None
    """None: a fresh random seed per generation."""
    stop: tuple[str, ...] = ()
    """Stop strings, besides the format's stop tokens."""
    grammar: str | None = None
    """A GBNF grammar constraining the output (llama.cpp's)."""

    def problems(self) -> list[str]:
        """What is out of range, one message per field (empty when valid)."""
        out = []
        if not 0 <= self.temperature <= 5:
            out.append(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            out.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repeat_penalty <= 5:
            out.append(f"repeat_penalty must be in (0, 5], got {self.repeat_penalty}")
        if self.max_tokens < 1:
            out.append(f"max_tokens must be ≥ 1, got {self.max_tokens}")
        return out


@dataclass
class Stats:
    """What one generation cost; `summary()` is the TUI footer line."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    """Seconds from the start of the generation to its first token (prompt evaluation included)."""
    decode_tps: float | None = None
    """Tokens per second after the first token."""
    total_s: float = 0.0
    n_ctx: int = 0
    finish_reason: str = "stop"
    dropped_messages: int = 0

    @property
    def context_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def summary(self) -> str:
        tps = f"{self.decode_tps:.1f} tok/s" if self.decode_tps is not None else "– tok/s"
        ttft = f"TTFT {self.ttft_s:.2f} s" if self.ttft_s is not None else "TTFT –"
        return f"{tps} · {ttft} · ctx {self.context_used}/{self.n_ctx}"

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "ttft_s": self.ttft_s, "decode_tps": self.decode_tps, "total_s": round(self.total_s, 4),
                "n_ctx": self.n_ctx, "finish_reason": self.finish_reason, "dropped_messages": self.dropped_messages}


def default_threads() -> int:
    """Physical cores (llama.cpp decodes best with one thread per core), at least 1."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, os.cpu_count() or 1)


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def check_gguf(path: Path) -> Path:
    """The path of a readable GGUF file, or a UserError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a GGUF file (an edgezh build folder has manifest.json)")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def _gguf_problem(path: Path) -> str:
    """Why the GGUF's header or tensor table is damaged ('' if it looks whole)."""
    try:
        read_metadata(path, [], check_data=True)
    except UserError as exc:
        return str(exc).split(": ", 1)[-1]
    return ""


class Generation:
    """One generation. Iterate it for text deltas (it runs while you iterate); afterwards `text`,
    `tokens`, `stats`, `finish_reason` ("stop", "length", "cancelled") and `stop_token` (the stop
    token text or stop string that ended it, or None) describe it. `dropped` is how many earlier
    messages were left out to fit the context."""

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams,
                 cancel: threading.Event | None, dropped: int = 0):
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.cancel = cancel or threading.Event()
        self.dropped = dropped
        self.text = ""
        self.tokens: list[int] = []
        self.finish_reason = "stop"
        self.stop_token: str | None = None
        self.stats = Stats(prompt_tokens=len(prompt), n_ctx=engine.n_ctx, dropped_messages=dropped)
        self._iterator: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def result(self) -> str:
        """Run to the end (if not yet) and return the whole text."""
        for _ in self:
            pass
        return self.text

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]

    def _run(self) -> Iterator[str]:
        engine, params = self.engine, self.params
        with engine._lock:
            yield from self._generate(engine, params)

    def _generate(self, engine: "Engine", params: SamplingParams) -> Iterator[str]:
        import llama_cpp

        llama = engine.llama
        n_ctx, n_prompt = engine.n_ctx, len(self.prompt)
        max_tokens = min(params.max_tokens, n_ctx - n_prompt)
        stream, stops = Utf8Stream(), StopStrings(params.stop)
        pieces, stop_ids, vocab = engine.pieces, engine.stop_ids, engine.vocab
        grammar = llama_cpp.LlamaGrammar.from_string(params.grammar) if params.grammar else None
        llama.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        start = time.perf_counter()
        first = last = None
        self.finish_reason = "length"
        parts: list[str] = []
        tokens = self.tokens
        generator = llama.generate(
            self.prompt, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, temp=params.temperature,
            repeat_penalty=params.repeat_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, grammar=grammar)
        try:
            if max_tokens <= 0:
                return
            for token in generator:
                last = time.perf_counter()
                if first is None:
                    first = last
                if self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                if token in stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token):
                    self.finish_reason = "stop"
                    self.stop_token = engine.token_text(token)
                    break
                tokens.append(token)
                delta = stops.feed(stream.feed(pieces(token)))
                if delta:
                    parts.append(delta)
                    yield delta
                if stops.hit is not None:
                    self.finish_reason, self.stop_token = "stop", stops.hit
                    break
                if len(tokens) >= max_tokens:
                    break
            else:
                self.finish_reason = "stop"
            tail = stops.feed(stream.finish()) + (stops.flush() if stops.hit is None else "")
            if tail:
                parts.append(tail)
                yield tail
        finally:
            generator.close()
            self.text = "".join(parts)
            stats = self.stats
            stats.completion_tokens = len(tokens)
            stats.finish_reason = self.finish_reason
            stats.total_s = time.perf_counter() - start
            if first is not None:
                stats.ttft_s = first - start
                if last is not None and len(tokens) > 1 and last > first:
                    stats.decode_tps = (len(tokens) - 1) / (last - first)


class Engine:
    """A loaded GGUF and its chat format. Thread-safe: one generation at a time (a lock)."""

    def __init__(self, llama: Any, fmt: templates.ChatFormat, *, path: Path | None = None,
                 n_threads: int | None = None, n_gpu_layers: int = 0):
        import llama_cpp

        self.llama = llama
        self.format = fmt
        self.path = Path(path or llama.model_path)
        self.name = self.path.name
        self.n_threads = n_threads or llama.n_threads
        self.n_gpu_layers = n_gpu_layers
        self.vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self.pieces = PieceTable(self.vocab)
        self._special_pieces = PieceTable(self.vocab, special=True)
        self.stop_ids = frozenset(self._single_token(text) for text in fmt.stop_tokens) - {None}
        self.bos_id = self._single_token(fmt.bos_token) if fmt.bos_token else None
        self._lock = threading.Lock()
        _OPEN.add(self)

    # --- loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, template: str | None = None, n_ctx: int | None = None,
             n_threads: int | None = None, n_gpu_layers: int | None = None, verbose: bool = False) -> "Engine":
        """Load `path` (a GGUF). `n_ctx` None: the model's training context, at most 4096;
        `n_gpu_layers` None: every layer on the GPU when llama.cpp was built with CUDA/Metal/…, else 0."""
        path = check_gguf(Path(path))
        try:
            import llama_cpp
        except ImportError:
            raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
        if template is not None:
            try:
                templates.get(template)
            except KeyError as exc:
                raise UserError(str(exc.args[0])) from None
        if n_ctx is not None and n_ctx < 64:
            raise UserError(f"context size {n_ctx} is too small (at least 64 tokens)")
        meta = read_metadata(path, ["{arch}.context_length", "tokenizer.chat_template"])
        name = template or templates.detect(meta.get("tokenizer.chat_template"))
        if name is None:
            raise UserError(f"{path}: the GGUF's chat template is none of edgezh's formats "
                            f"({', '.join(templates.names())}); pass --template NAME")
        n_ctx = n_ctx or min(4096, int(meta.get("{arch}.context_length") or 4096))
        gpu_layers = (-1 if gpu_offload_supported() else 0) if n_gpu_layers is None else n_gpu_layers
        threads = n_threads or default_threads()
        _check_memory(path)
        try:
            with _quiet_llama_cpp(verbose) as log:
                llama = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                        n_gpu_layers=gpu_layers, verbose=True)
        except ValueError as exc:
            detail = _log_detail(log)
            if "Failed to create llama_context" in str(exc):
                raise UserError(f"{path}: not enough memory for a {n_ctx}-token context (llama.cpp: "
                                f"{detail or 'could not allocate it'}); try a smaller --ctx"
                                f"{' or fewer --gpu-layers' if gpu_layers else ''}") from None
            problem = _gguf_problem(path)
            if problem:
                raise UserError(f"{path}: {problem}") from None
            raise UserError(f"{path}: llama.cpp {llama_cpp.__version__} could not load this GGUF "
                            f"({detail or 'unsupported architecture or tensor type, or out of memory'})") from None
        except MemoryError:
            raise UserError(f"{path}: out of memory while loading the model; close other programs or use a "
                            "smaller quant (q4_k_m)") from None
        llama.verbose = verbose
        return cls(llama, templates.get(name), path=path, n_threads=threads, n_gpu_layers=gpu_layers)

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    @property
    def n_ctx_train(self) -> int:
        return self.llama._model.n_ctx_train()

    def close(self) -> None:
        """Free the model and its context (waits for a running generation to end)."""
        with self._lock:
            self.llama.close()
        _OPEN.discard(self)

    # --- tokens and prompts --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_text(self, token: int) -> str:
        """A token as text, special tokens included (`<|eot_id|>`)."""
        return self._special_pieces(token).decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` built from their pieces (specials as empty), as the stream shows it."""
        from edgezh.runtime.decoding import decode_tokens

        return decode_tokens(self.pieces, tokens)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The registry's prompt text for `messages` with the generation prompt."""
        import jinja2

        try:
            return templates.render(self.format.name, messages, tools=tools or None, add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            raise UserError(f"chat format {self.format.name!r}: {exc}") from None

    def prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Rendered and tokenized without adding a BOS: the template prints the format's own."""
        return self.tokenize(self.render(messages, tools), add_bos=False, special=True)

    def fit(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
            reserve: int = 0, allow_drop: bool = True) -> tuple[list[int], int]:
        """Prompt tokens for the longest tail of the conversation that leaves `reserve` tokens for
        the answer: the system prompt stays, the oldest turns go first (a turn starts at a user
        message). Returns (tokens, number of messages dropped)."""
        reserve = max(1, min(reserve, self.n_ctx // 2))
        budget = self.n_ctx - reserve
        tokens = self.prompt_tokens(messages, tools)
        if len(tokens) <= budget:
            return tokens, 0
        head = [m for m in messages[:1] if m.get("role") == "system"]
        rest = messages[len(head):]
        dropped = 0
        while allow_drop and len(tokens) > budget and len(rest) > 1:
            cut = 1
            while cut < len(rest) - 1 and rest[cut].get("role") != "user":
                cut += 1  # keep a turn whole: the assistant's reply, tool calls and results go with it
            rest, dropped = rest[cut:], dropped + cut
            tokens = self.prompt_tokens(head + rest, tools)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}"
                                  f"{'' if allow_drop else ''}; shorten the message or raise --ctx")
        if len(tokens) > budget and not allow_drop:
            raise ContextOverflow(f"the prompt is {len(tokens)} tokens; with {reserve} tokens for the answer "
                                  f"it does not fit the {self.n_ctx}-token context")
        return tokens, dropped

    # --- generation ----------------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams = SamplingParams(), *,
             tools: list[dict[str, Any]] | None = None, cancel: threading.Event | None = None,
             allow_drop: bool = True) -> Generation:
        """Start answering `messages` (OpenAI-style dicts). Iterate the result for text deltas."""
        self._check(params)
        tokens, dropped = self.fit(messages, tools, reserve=params.max_tokens, allow_drop=allow_drop)
        return Generation(self, tokens, params, cancel, dropped)

    def complete(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), *,
                 cancel: threading.Event | None = None) -> Generation:
        """Continue raw text (no template). The model's BOS is added unless the text starts with it."""
        self._check(params)
        if isinstance(prompt, str):
            add_bos = bool(self.llama._model.add_bos_token()) and not (
                self.format.bos_token and prompt.startswith(self.format.bos_token))
            tokens = self.tokenize(prompt, add_bos=add_bos, special=True)
        else:
            tokens = list(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}")
        return Generation(self, tokens, params, cancel)

    def grammar_problem(self, grammar: str) -> str | None:
        """Why llama.cpp rejects a GBNF grammar (None when it parses). An unparsable grammar must not
        reach the sampler chain: llama-cpp-python would add a NULL sampler."""
        import llama_cpp

        if not grammar.strip():
            return "the grammar is empty"
        with _quiet_llama_cpp(False) as log:
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return f"invalid GBNF grammar ({_log_detail(log) or 'llama.cpp could not parse it'})"
        llama_cpp.llama_sampler_free(sampler)
        return None

    def _check(self, params: SamplingParams) -> None:
        problems = params.problems()
        if params.grammar:
            problems.append(self.grammar_problem(params.grammar) or "")
        problems = [p for p in problems if p]
        if problems:
            raise UserError("; ".join(problems))

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenize(text, add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else None

    def describe(self) -> dict[str, Any]:
        """Facts for a status line or /health."""
        return {"model": self.name, "format": self.format.name, "n_ctx": self.n_ctx, "threads": self.n_threads,
                "gpu_layers": self.n_gpu_layers, "path": str(self.path)}


_OPEN: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free engines before interpreter teardown (llama-cpp-python's __del__ fails once ctypes is gone)."""
    for engine in list(_OPEN):
        try:
            engine.llama.close()
        except Exception:
            pass


def _log_detail(fragments: Iterable[str]) -> str:
    """The last error-looking lines of llama.cpp's log (it logs in fragments)."""
    lines = [line.strip() for line in "".join(fragments).splitlines() if line.strip()]
    errors = [line for line in lines if any(word in line.lower() for word in ("error", "failed", "unable", "cannot"))]
    return "; ".join((errors or lines)[-2:])[:300]


def _check_memory(path: Path) -> None:
    """Refuse a model larger than the machine's memory before llama.cpp tries (and the OS kills us)."""
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:
        return
    size = path.stat().st_size
    if size > total:
        raise UserError(f"{path}: the model is {size / 2**30:.1f} GiB and this machine has {total / 2**30:.1f} GiB "
                        "of memory; use a smaller quant (q4_k_m) or a smaller model")


def with_defaults(params: SamplingParams, **changes: Any) -> SamplingParams:
    """`params` with the given fields changed (None values ignored)."""
    return replace(params, **{key: value for key, value in changes.items() if value is not None})


@contextlib.contextmanager
def _quiet_llama_cpp(verbose: bool) -> Iterator[collections.deque]:
    """Keep llama.cpp's loader log off the terminal without touching file descriptors (a terminal UI
    owns fd 2 while a model loads in a worker thread): native log lines go to a ring buffer (for
    error messages), llama-cpp-python's own prints to a string. llama-cpp-python's log callback
    and logger level are restored afterwards."""
    import llama_cpp
    from llama_cpp import _logger

    lines: collections.deque[str] = collections.deque(maxlen=40)
    if verbose:
        yield lines
        return

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    level = _logger.logger.level
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _logger.logger.setLevel(level or logging.ERROR)  # ERROR: what llama-cpp-python's verbose=False sets
