"""The chat engine: one GGUF in llama.cpp (llama-cpp-python), used by the TUI and by the server.

- Loading (`loader.load_native`, the one function that makes the model and its context) names
  what went wrong in one line: a missing file, a file that is not a GGUF, a corrupt or truncated
  one, not enough memory for the model or its context.
- The chat format comes from the registry: `templates.detect` on the GGUF's embedded template,
  or the name given; the stop tokens are the registry's (`ChatFormat.stop_tokens`), never a list
  of our own. Prompts are rendered by the registry and tokenized with `add_bos=False,
  special=True` — the llama3 templates print `<|begin_of_text|>` themselves, ChatML has none — so
  a prompt holds exactly the BOS the format asks for.
- Generations run in the engine's decode loop (`batch`): up to `parallel` of them decode together
  in one context (continuous batching), each with its own sampler chain (llama.cpp's, in
  llama-cpp-python's order) and its own KV cells with prefix reuse across turns. A generation
  stops on every stop token of the format (and any end-of-generation token of the vocabulary), on
  stop strings, at max_tokens, at the end of its context, or when `cancel` is set. Text is built
  from token pieces (`decoding`), so it is UTF-8 safe.
- A conversation that does not fit drops its oldest turns (never the system prompt) and says how
  many messages went (`Generation.dropped`).
- LoRA adapter sets (`adapters`, `--lora`) are loaded once with the model (`Engine.adapter_sets`);
  a generation names the set it decodes with (`adapters=NAME`; None: the base alone).
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from edgezh import templates
from edgezh.errors import UserError
from edgezh.gguf_meta import read_metadata
from edgezh.runtime.adapters import AdapterSet
from edgezh.runtime.batch import DecodeLoop
from edgezh.runtime.decoding import PieceTable, StopStrings, Utf8Stream
from edgezh.runtime.loader import (Native, check_gguf, default_threads, gpu_offload_supported, load_native, log_detail,
                                   quiet_llama_cpp)

__all__ = ["ContextOverflow", "Engine", "Generation", "SamplingParams", "Stats", "check_gguf", "default_threads",
           "gpu_offload_supported"]

MAX_TOP_LOGPROBS = 20


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
    logprobs: int | None = None
    """None: no log-probabilities; N (0…20): each token's log-probability and the N most likely
    alternatives (`Generation.logprobs`)."""

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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            out.append(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        return out


@dataclass
class Stats:
    """What one generation cost; `summary()` is the TUI footer line."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    """Seconds from the request to its first token (waiting for a slot and prompt evaluation included)."""
    decode_tps: float | None = None
    """Tokens per second after the first token (this generation's own rate)."""
    total_s: float = 0.0
    n_ctx: int = 0
    finish_reason: str = "stop"
    dropped_messages: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV cells were reused from an earlier request (not evaluated again)."""

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


Sink = Callable[[str | None, list], None]
"""Receives `(text, logprob entries)` for each delta, then `(None, [])` once at the end (decode thread)."""


class Generation:
    """One generation. Iterate it for text deltas (it is submitted to the engine's decode loop when
    the iteration starts), or `start(sink)` to receive them in the decode thread. Afterwards `text`,
    `tokens`, `stats`, `finish_reason` ("stop", "length", "cancelled") and `stop_token` (the stop
    token text or stop string that ended it, or None) describe it; `logprobs` holds one entry per
    token when asked for (`{"token", "logprob", "top": [(id, logprob), …]}`). `dropped` is how many
    earlier messages were left out to fit the context. Stopping an iteration early cancels it."""

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams,
                 cancel: threading.Event | None, dropped: int = 0, adapters: str | None = None):
        self.engine = engine
        self.adapters = adapters
        """The LoRA adapter set it decodes with (None: the base alone)."""
        self.prompt = list(prompt)
        self.params = params
        self.cancel = cancel or threading.Event()
        self.dropped = dropped
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason = "length"
        self.stop_token: str | None = None
        self.error: BaseException | None = None
        self.stats = Stats(prompt_tokens=len(prompt), n_ctx=engine.n_ctx, dropped_messages=dropped)
        self.max_tokens = min(params.max_tokens, engine.n_ctx - len(self.prompt))
        self.done = threading.Event()
        self._sink: Sink | None = None
        self._started = False
        self._parts: list[str] = []
        self._held: list[dict[str, Any]] = []
        self._stream, self._stops = Utf8Stream(), StopStrings(params.stop)
        self._submitted = self._first = self._last = 0.0

    # --- the consumer's side -------------------------------------------------------------------------

    def start(self, sink: Sink | None = None) -> "Generation":
        """Submit to the decode loop (once); `sink` gets the deltas in the decode thread."""
        if self._started:
            return self
        self._started, self._sink = True, sink
        self._submitted = time.perf_counter()
        if self.max_tokens <= 0 or self.cancel.is_set():
            self._finish("cancelled" if self.cancel.is_set() else "length")
        else:
            self.engine.loop.submit(self)
        return self

    def __iter__(self) -> Iterator[str]:
        return self.deltas()

    def deltas(self, every: float = 0.0) -> Iterator[str]:
        """The text as it is decoded: a delta per piece (iterating the generation is this), or with
        `every` > 0 what arrives within `every` seconds as one delta, so the consumer's thread wakes at
        most 1/`every` times a second instead of once per token (the terminal chat's worker, which would
        otherwise take the GIL from the decode thread after every token). Submits the generation; when
        it was started already (with a sink, or iterated before), waits for its end. Stopping early
        cancels it; a failed generation raises its error."""
        if self._started:
            self.done.wait()
            if self.error is not None:
                raise self.error
            return
        parts: list[str] = []
        lock, ready = threading.Lock(), threading.Event()

        def sink(text: str | None, entries: list) -> None:  # in the decode thread
            with lock:
                if text:
                    parts.append(text)
            ready.set()

        self.start(sink)
        try:
            while True:
                ready.wait()
                if every > 0 and not self.done.is_set():
                    self.done.wait(every)  # let more tokens arrive (or the end)
                with lock:
                    taken = parts[:]
                    parts.clear()
                    ready.clear()
                    finished = self.done.is_set()  # set before the last sink call: nothing follows
                yield from (["".join(taken)] if every > 0 and taken else taken)
                if finished:
                    break
        finally:
            if not self.done.is_set():  # the consumer stopped early
                self.cancel.set()
                self.engine.loop.wake()
        if self.error is not None:
            raise self.error

    def result(self) -> str:
        """Run to the end (if not yet) and return the whole text."""
        for _ in self:
            pass
        return self.text

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    # --- the decode loop's side (edgezh.runtime.batch.Job) ------------------------------------------

    def _begin(self, cached: int) -> None:
        """A slot was found; `cached` prompt tokens were already in its KV cells."""
        self.stats.cached_tokens = cached

    def _accept(self, token: int, logprobs: dict | None) -> bool:
        """A sampled token: False when the generation ends with it."""
        self._last = time.perf_counter()
        if not self._first:
            self._first = self._last
        if self.cancel.is_set():
            self.finish_reason = "cancelled"
            return False
        engine = self.engine
        if token in engine.stop_ids or engine.is_eog(token):
            self.finish_reason, self.stop_token = "stop", engine.token_text(token)
            return False
        self.tokens.append(token)
        if logprobs is not None:
            self._held.append(logprobs)
        delta = self._stops.feed(self._stream.feed(engine.pieces(token)))
        if delta:
            self._emit(delta)
        if self._stops.hit is not None:
            self.finish_reason, self.stop_token = "stop", self._stops.hit
            return False
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return False
        return True

    def _emit(self, text: str) -> None:
        self._parts.append(text)
        entries, self._held = self._held, []
        self.logprobs.extend(entries)
        if self._sink is not None:
            self._sink(text, entries)

    def _finish(self, reason: str | None = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        if reason is not None:
            self.finish_reason = reason
        self.error = error
        try:
            tail = self._stops.feed(self._stream.finish()) + (self._stops.flush() if self._stops.hit is None else "")
            if tail or self._held:
                self._emit(tail)
        finally:
            self.text = "".join(self._parts)
            stats = self.stats
            stats.completion_tokens = len(self.tokens)
            stats.finish_reason = self.finish_reason
            end = time.perf_counter()
            stats.total_s = end - (self._submitted or end)
            if self._first:
                stats.ttft_s = self._first - self._submitted
                if len(self.tokens) > 1 and self._last > self._first:
                    stats.decode_tps = (len(self.tokens) - 1) / (self._last - self._first)
            self.done.set()
            if self._sink is not None:
                self._sink(None, [])


class Engine:
    """A loaded GGUF, its chat format and its decode loop. Thread-safe: generations from any
    thread decode together, up to `parallel` at a time; more wait for a slot in order."""

    def __init__(self, native: Native, fmt: templates.ChatFormat, *, path: Path):
        import llama_cpp

        self._closed = False
        self.native = native
        self.model = native.model
        self.format = fmt
        self.path = Path(path)
        self.name = self.path.name
        self.n_threads = native.n_threads
        self.n_gpu_layers = native.n_gpu_layers
        self.parallel = native.parallel
        self.vocab = native.model.vocab
        self.pieces = PieceTable(self.vocab)
        self._special_pieces = PieceTable(self.vocab, special=True)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.stop_ids = frozenset(self._single_token(text) for text in fmt.stop_tokens) - {None}
        self.bos_id = self._single_token(fmt.bos_token) if fmt.bos_token else None
        self.loop = DecodeLoop(native, self.vocab)
        _OPEN.add(self)

    # --- loading -------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, template: str | None = None, n_ctx: int | None = None,
             n_threads: int | None = None, n_gpu_layers: int | None = None, parallel: int = 1,
             repack: bool = False, verbose: bool = False, adapters: Sequence[AdapterSet] = ()) -> "Engine":
        """Load `path` (a GGUF). `n_ctx` None: the model's training context, at most 4096 (for each
        of the `parallel` sequences); `n_gpu_layers` None: every layer on the GPU when llama.cpp was
        built with CUDA/Metal/…, else 0; `repack`: llama.cpp's repacked CPU weights (see `loader`);
        `adapters`: LoRA adapter sets a generation may name (`edgezh.runtime.adapters`)."""
        path = check_gguf(Path(path))
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
        native = load_native(path, n_ctx=n_ctx, parallel=parallel, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                             repack=repack, verbose=verbose, adapters=adapters)
        return cls(native, templates.get(name), path=path)

    @property
    def n_ctx(self) -> int:
        """Tokens of context for each generation."""
        return self.native.n_ctx

    @property
    def adapter_sets(self) -> tuple[AdapterSet, ...]:
        """The LoRA adapter sets loaded with the model, in the order given."""
        return tuple(loaded.spec for loaded in self.native.adapters.values())

    def adapter_set(self, name: str | None) -> AdapterSet | None:
        """The set called `name` (None: the base alone); UserError for a name not loaded."""
        if name is None:
            return None
        loaded = self.native.adapters.get(name)
        if loaded is None:
            have = ", ".join(self.native.adapters) or "none were loaded (--lora)"
            raise UserError(f"no LoRA adapter set {name!r} (loaded: {have})")
        return loaded.spec

    @property
    def n_ctx_train(self) -> int:
        return self.model.n_ctx_train()

    def close(self) -> None:
        """End the decode loop (running generations end as cancelled) and free the model."""
        if self._closed:
            return
        self._closed = True
        self.loop.close()
        self.native.close()
        _OPEN.discard(self)

    # --- tokens and prompts --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        if self._closed:
            raise RuntimeError("the engine is closed")
        return self.model.tokenize(text.encode("utf-8"), add_bos, special)

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
             allow_drop: bool = True, adapters: str | None = None) -> Generation:
        """Start answering `messages` (OpenAI-style dicts) with the LoRA adapter set `adapters`
        (None: the base). Iterate the result for text deltas."""
        self._check(params)
        self.adapter_set(adapters)
        tokens, dropped = self.fit(messages, tools, reserve=params.max_tokens, allow_drop=allow_drop)
        return Generation(self, tokens, params, cancel, dropped, adapters)

    def complete(self, prompt: str | list[int], params: SamplingParams = SamplingParams(), *,
                 cancel: threading.Event | None = None, adapters: str | None = None) -> Generation:
        """Continue raw text (no template) with the LoRA adapter set `adapters` (None: the base).
        The model's BOS is added unless the text starts with it."""
        self._check(params)
        self.adapter_set(adapters)
        if isinstance(prompt, str):
            add_bos = bool(self.model.add_bos_token()) and not (
                self.format.bos_token and prompt.startswith(self.format.bos_token))
            tokens = self.tokenize(prompt, add_bos=add_bos, special=True)
        else:
            tokens = list(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"the prompt is {len(tokens)} tokens and the context holds {self.n_ctx}")
        return Generation(self, tokens, params, cancel, adapters=adapters)

    def grammar_problem(self, grammar: str) -> str | None:
        """Why llama.cpp rejects a GBNF grammar (None when it parses). An unparsable grammar must not
        reach the sampler chain: llama-cpp-python would add a NULL sampler."""
        import llama_cpp

        if not grammar.strip():
            return "the grammar is empty"
        with quiet_llama_cpp(False) as log:
            sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return f"invalid GBNF grammar ({log_detail(log) or 'llama.cpp could not parse it'})"
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

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token of the vocabulary (besides the format's stop tokens)."""
        return bool(self._is_eog(self.vocab, token))

    def describe(self) -> dict[str, Any]:
        """Facts for a status line or /health."""
        return {"model": self.name, "format": self.format.name, "n_ctx": self.n_ctx, "threads": self.n_threads,
                "gpu_layers": self.n_gpu_layers, "parallel": self.parallel, "repack": self.native.repack,
                "path": str(self.path),
                "adapters": {item.name: [[str(path), scale] for path, scale in item.adapters]
                             for item in self.adapter_sets}}


_OPEN: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free engines before interpreter teardown (llama-cpp-python's __del__ fails once ctypes is gone)."""
    for engine in list(_OPEN):
        try:
            engine.close()
        except Exception:
            pass


def with_defaults(params: SamplingParams, **changes: Any) -> SamplingParams:
    """`params` with the given fields changed (None values ignored)."""
    return replace(params, **{key: value for key, value in changes.items() if value is not None})
