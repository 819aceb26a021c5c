"""Continuous batching: every running generation of an engine decodes in one llama.cpp context.

One thread (`DecodeLoop`) owns the context. Each step is one `llama_decode` with one row for every
sequence that is decoding (its last sampled token), then — in a call of its own — one chunk of the
oldest prompt still being fed. Each sequence samples from its own row with its own sampler chain
(penalties, grammar, top-k/p, min-p, temperature, seed) and the generation decides whether it goes
on (stop tokens, stop strings, max_tokens, cancel). A long prompt is fed a chunk per step, so the
sequences already decoding keep streaming meanwhile.

Batch invariance (an answer does not depend on what else decodes): besides plain weight layouts
(`loader`, `repack=False`), the attention over a sequence's own KV cells must see the same query
rows whatever the load. llama.cpp splits a batch that mixes sequences into micro-batches with an
equal number of tokens per sequence, so a prompt beside decode rows would be cut into pieces that
depend on the other requests, and differently cut prompts round differently (measured: greedy
answers drifted after a few dozen tokens). So decode rows go together (one token per sequence:
equal by construction, and verified bit-identical to decoding alone) and each prompt is fed alone,
in chunks that end at multiples of `PROMPT_CHUNK` positions: the same chunks for the same prompt,
whatever else is running.

Slots: the context has `parallel` sequences (seq_id 0…parallel-1), each with its own KV cells.
A new request takes a free slot — the one whose cached tokens share the longest prefix with its
prompt — removes the rest of that slot's cells (`llama_memory_seq_rm`) and feeds only what is new,
so a multi-turn chat re-evaluates just the latest turn. With several slots only whole chunks
computed as prompt are kept (`_reusable`): cells from decode rows or from a shorter last chunk were
computed in another shape than a fresh evaluation would use. When every slot is busy, requests wait in
order; a request cancelled while waiting never takes a slot, and a running one frees its slot at
the next step. Requests join between steps, so nobody waits for another request to finish.

LoRA adapters: in llama.cpp the adapters in use belong to the context, so every row of one
`llama_decode` is computed with one adapter set. Each job names its set (`Job.adapters`, None: the
base); a step decodes the decoding rows grouped by set, one call per set that has rows (rows of one
set still go together, one token per sequence), and a prompt chunk is fed under its job's set. The
context is switched (`llama_set_adapters_lora`) only when the next call's set differs from the last
one's, so without adapters nothing changes. A slot remembers the set its cells were computed under
and keeps them for a request of the same set only.

The sampling is llama-cpp-python's `Llama._init_sampler` chain (penalties over the last 64 tokens,
top-k, typical 1.0, top-p, min-p, temperature, dist; the penalties computed here, `Penalties`, as
llama.cpp computes them), so without a grammar a seed gives the answer `create_completion` gives;
a grammar is checked the way llama.cpp's own sampler does (`Sampler`).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

PROMPT_CHUNK = 256
"""Prompts are fed in chunks that end at multiples of this many positions, one chunk per call."""
PENALTY_LAST_N = 64
"""Tokens the repeat/frequency/presence penalties look back on (llama-cpp-python's default)."""


class Job(Protocol):
    """What the loop needs from a generation (`edgezh.runtime.engine.Generation`)."""

    prompt: list[int]
    params: Any
    cancel: threading.Event
    adapters: str | None
    """The LoRA adapter set to decode with (a name of `Native.adapters`; None: the base alone)."""

    def _begin(self, cached: int) -> None: ...
    def _accept(self, token: int, logprobs: dict | None) -> bool: ...
    def _finish(self, reason: str | None = None, error: BaseException | None = None) -> None: ...


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)
    """Tokens whose KV cells this sequence holds, in order (positions 0…len-1)."""
    exact: int = 0
    """How many of the first cached tokens were computed as whole prompt chunks (see `DecodeLoop`)."""
    adapters: str | None = None
    """The adapter set the cached cells were computed under."""
    job: Any = None
    used: float = 0.0


@dataclass
class _Running:
    job: Any
    slot: _Slot
    todo: list[int]
    sampler: Any
    next: int | None = None


class Penalties:
    """llama.cpp's repeat, frequency and presence penalties over the last `PENALTY_LAST_N` sampled tokens
    (`llama_sampler_init_penalties`: the same window, the same float32 arithmetic, so the same tokens),
    applied in place to a row of logits. llama.cpp's sampler looks every one of the 49k–128k candidates
    up in its hash map of recent tokens, ~0.12 ms a token on a 2-core CPU, where at most 64 logits change:
    here those are indexed directly (~0.01 ms)."""

    def __init__(self, params: Any):
        self.repeat = np.float32(params.repeat_penalty)
        self.frequency = np.float32(params.frequency_penalty)
        self.presence = np.float32(params.presence_penalty)
        self.off = params.repeat_penalty == 1 and params.frequency_penalty == 0 and params.presence_penalty == 0
        self.window: collections.deque[int] = collections.deque()
        self.counts: collections.Counter[int] = collections.Counter()

    def accept(self, token: int) -> None:
        self.window.append(token)
        self.counts[token] += 1
        if len(self.window) > PENALTY_LAST_N:
            old = self.window.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]

    def apply(self, logits: np.ndarray) -> None:
        if self.off or not self.counts:
            return
        ids = np.fromiter(self.counts.keys(), dtype=np.int32, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        row = logits[ids]
        row = np.where(row <= 0, row * self.repeat, row / self.repeat)  # llama.cpp: shrink either way
        logits[ids] = row - (counts * self.frequency + self.presence)


class Sampler:
    """One generation's sampling: the penalties (`Penalties`, applied to the row of logits in place),
    then llama.cpp's chain (top-k, typical 1.0, top-p, min-p, temperature, dist — or greedy) and, for a
    grammar, a grammar sampler kept apart from it. `sample` changes the row's logits: read them
    before (`DecodeLoop._decode` does, for logprobs).

    Without a grammar, the chain step is `llama_sampler_sample`. With one, it does what
    llama.cpp's own common sampler does: sample with the chain, check that one token against the
    grammar, and only when the grammar rejects it apply the grammar to the whole vocabulary and
    sample again. A grammar that filters all 49k–128k candidates before every token costs tens of
    milliseconds per token on a CPU; checking one token costs nearly nothing."""

    def __init__(self, params: Any, vocab: Any, n_vocab: int, seed: int):
        import llama_cpp
        from llama_cpp import _internals

        self.n_vocab = n_vocab
        self.penalties = Penalties(params)
        self.chain = _internals.LlamaSampler()
        if params.temperature == 0:
            self.chain.add_greedy()
        else:
            self.chain.add_top_k(params.top_k)
            self.chain.add_typical(1.0, 1)
            self.chain.add_top_p(params.top_p, 1)
            self.chain.add_min_p(params.min_p, 1)
            self.chain.add_temp(params.temperature)
            self.chain.add_dist(seed)
        self.grammar = None
        if params.grammar:
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.chain.close()
                raise ValueError("invalid GBNF grammar")
            self._data = (llama_cpp.llama_token_data * n_vocab)()
            self._view = np.frombuffer(self._data, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = (llama_cpp.llama_token_data * 1)()

    def sample(self, ctx: Any, row: int) -> int:
        import ctypes

        import llama_cpp

        logits = row_logits(ctx, row, self.n_vocab)
        self.penalties.apply(logits)
        if self.grammar is None:  # samples and accepts the token into the chain
            token = llama_cpp.llama_sampler_sample(self.chain.sampler, ctx, row)
        else:
            token = self._apply(logits, grammar_first=False)
            self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
            single = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(single))
            if not np.isfinite(self._one[0].logit):  # the grammar rejects it: filter everything, sample again
                token = self._apply(logits, grammar_first=True)
            llama_cpp.llama_sampler_accept(self.chain.sampler, token)
            llama_cpp.llama_sampler_accept(self.grammar, token)
        self.penalties.accept(token)
        return token

    def _apply(self, logits: np.ndarray, *, grammar_first: bool) -> int:
        import ctypes

        import llama_cpp

        self._view["id"], self._view["logit"], self._view["p"] = self._ids, logits, 0.0
        candidates = llama_cpp.llama_token_data_array(self._data, self.n_vocab, -1, False)
        if grammar_first:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def close(self) -> None:
        import llama_cpp

        self.chain.close()
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def row_logits(ctx: Any, row: int, n_vocab: int) -> np.ndarray:
    """The logits llama.cpp computed for decode row `row`, as a numpy view of its own buffer (writable:
    sampling changes them in place; valid until the next `llama_decode`)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,))


def logprobs_of(row: np.ndarray, token: int, top: int) -> dict[str, Any]:
    """The model's log-probability of `token` (log-softmax of the raw logits) and the `top` best."""
    peak = float(row.max())
    logsum = peak + float(np.log(np.exp(row - peak).sum()))
    entry: dict[str, Any] = {"token": token, "logprob": float(row[token]) - logsum, "top": []}
    if top:
        best = np.argpartition(row, -top)[-top:]
        best = best[np.argsort(row[best])[::-1]]
        entry["top"] = [(int(i), float(row[i]) - logsum) for i in best]
    return entry


class DecodeLoop:
    """The decode thread of one context (started on the first request, ended by `close`)."""

    def __init__(self, native: Any, vocab: Any):
        import llama_cpp

        self.native = native
        self.vocab = vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.ctx = native.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = native.n_batch
        self.chunk = min(PROMPT_CHUNK, self.n_batch)
        self.exact_reuse = native.parallel > 1
        self.slots = [_Slot(i) for i in range(native.parallel)]
        self.waiting: collections.deque = collections.deque()
        self.running: list[_Running] = []
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._adapters: str | None = None
        """The adapter set the context decodes with now."""
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0

    # --- from any thread -----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgezh-decode", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wake(self) -> None:
        """Look at cancellations now (a waiting request that was cancelled leaves the queue)."""
        with self._cond:
            self._cond.notify()

    def state(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": len(self.slots)}

    def clear(self) -> None:
        """Forget every slot's cached tokens (the next request evaluates its whole prompt)."""
        import llama_cpp

        with self._cond:
            if self.running or self.waiting:
                raise RuntimeError("generations are running")
            for slot in self.slots:
                llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                slot.cached, slot.exact = [], 0

    def close(self) -> None:
        """Cancel everything, end the thread, free the batch (the context is the caller's)."""
        import llama_cpp

        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for job in list(self.waiting):
            job._finish("cancelled")
        self.waiting.clear()
        llama_cpp.llama_batch_free(self._batch)

    # --- the decode thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.running and not self.waiting:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            if self.running:
                self._step()
        for running in list(self.running):
            self._end(running, "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into free slots (called with the lock held)."""
        for job in [job for job in self.waiting if job.cancel.is_set()]:
            self.waiting.remove(job)
            job._finish("cancelled")
        while self.waiting:
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            job = self.waiting.popleft()
            busy = {running.slot.seq_id for running in self.running}
            # Most reusable cells first; then the slot that keeps the busy seq_ids one consecutive run
            # (llama.cpp computes each run of decode rows as a graph of its own, see `_step`); then the
            # least recently used (its cached tokens are the least likely to be asked for again).
            slot = max(free, key=lambda s: (self._reusable(s, job), -runs(busy | {s.seq_id}), -s.used))
            try:
                self._start(job, slot)
            except BaseException as exc:  # noqa: BLE001 - the request fails, the loop goes on
                job._finish(error=exc)

    def _start(self, job: Job, slot: _Slot) -> None:
        import random

        import llama_cpp

        params = job.params
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        sampler = Sampler(params, self.vocab, self.n_vocab, seed)
        keep = self._reusable(slot, job)
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            keep = 0
        slot.cached, slot.exact, slot.adapters = list(job.prompt[:keep]), min(slot.exact, keep), job.adapters
        slot.job, slot.used = job, time.monotonic()
        job._begin(keep)
        self.running.append(_Running(job, slot, list(job.prompt[keep:]), sampler))

    def _reusable(self, slot: _Slot, job: Job) -> int:
        """How many cached cells of `slot` a request keeps (its prompt's last token is always fed
        again, for its logits; none when the cells were computed under another adapter set). With
        several slots, only whole prompt chunks are kept: cells computed as single decode rows or as
        part of a shorter chunk round differently from a fresh evaluation, and an answer must not
        depend on what ran before it."""
        if slot.adapters != job.adapters:
            return 0
        prompt = job.prompt
        keep = min(_common(slot.cached, prompt), len(prompt) - 1)
        if self.exact_reuse:
            keep = min(keep, slot.exact) // self.chunk * self.chunk
        return keep

    def _step(self) -> None:
        """One step: a decode call with one row for every sequence that is decoding (one call per
        adapter set), then one prompt chunk of the oldest sequence that still has prompt to feed (in
        a call of its own). Decode rows go in ascending seq_id order: with a KV stream per sequence,
        llama.cpp puts only consecutive ascending seq_ids (0, 1, 2 — not 2, 0 nor 0, 2) into one
        micro-batch and computes the rest as further graphs, so rows in admission order (say 3, 2, 1, 0)
        cost nearly four 1-row steps (measured on SmolLM2 q4_k_m, 2 cores: 48 ms against 25 ms in
        order; seq_ids 0, 2, 3 26 ms against 18 ms for 0, 1, 2 — hence the slot choice in `_admit`)."""
        for running in [r for r in self.running if r.job.cancel.is_set()]:
            self._end(running, "cancelled")
        groups: dict[str | None, list[_Running]] = {}
        for running in self.running:
            if running.next is not None:
                groups.setdefault(running.job.adapters, []).append(running)
        for adapters, decoding in groups.items():
            self._batch.n_tokens = 0
            rows = []
            for running in sorted(decoding, key=lambda r: r.slot.seq_id):  # see `_step`
                if running in self.running:  # a failed call of another set may have ended it
                    rows.append((running, self._add(running, running.next, True)))
                running.next = None
            if rows:
                self._use(adapters)
                self._decode(rows)
        feeding = next((r for r in self.running if r.todo), None)
        if feeding is not None:
            self._batch.n_tokens = 0
            start = len(feeding.slot.cached)
            take = feeding.todo[:self.chunk - start % self.chunk]  # chunks end at multiples of `chunk`
            del feeding.todo[:len(take)]
            for index, token in enumerate(take):
                row = self._add(feeding, token, not feeding.todo and index == len(take) - 1)
            slot = feeding.slot
            if slot.exact == start and len(slot.cached) % self.chunk == 0:
                slot.exact = len(slot.cached)  # a whole chunk computed in one call: reusable bit for bit
            self._use(feeding.job.adapters)
            self._decode([(feeding, row)] if not feeding.todo else [])

    def _use(self, adapters: str | None) -> None:
        """Switch the context to the adapter set `adapters` (nothing when it already uses it)."""
        if adapters != self._adapters:
            from edgezh.runtime.adapters import apply

            apply(self.ctx, None if adapters is None else self.native.adapters[adapters])
            self._adapters = adapters

    def _decode(self, rows: list) -> None:
        import llama_cpp

        code = llama_cpp.llama_decode(self.ctx, self._batch)
        self.steps += 1
        if code != 0:
            error = RuntimeError(f"llama_decode failed ({code}): "
                                 f"{'no room in the KV cache' if code == 1 else 'see llama.cpp log'}")
            for running in {id(r): r for r in self.running if r.slot.seq_id in self._batch_seqs()}.values():
                running.slot.cached, running.slot.exact = [], 0
                llama_cpp.llama_memory_seq_rm(self.memory, running.slot.seq_id, -1, -1)
                self._end(running, error=error)
            return
        for running, row in rows:
            if running not in self.running:
                continue
            logits = None
            if running.job.params.logprobs is not None:  # the model's own logits, before sampling changes them
                logits = row_logits(self.ctx, row, self.n_vocab).copy()
            token = running.sampler.sample(self.ctx, row)
            logprobs = None if logits is None else logprobs_of(logits, token, running.job.params.logprobs)
            try:
                going = running.job._accept(token, logprobs)
            except BaseException as exc:  # noqa: BLE001 - a consumer's sink failed: end that request only
                self._end(running, error=exc)
                continue
            if going:
                running.next = token
            else:
                self._end(running)

    def _batch_seqs(self) -> set[int]:
        return {self._batch.seq_id[i][0] for i in range(self._batch.n_tokens)}

    def _add(self, running: _Running, token: int, logits: bool) -> int:
        batch, index = self._batch, self._batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = len(running.slot.cached)
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = running.slot.seq_id
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        running.slot.cached.append(token)
        return index

    def _end(self, running: _Running, reason: str | None = None, error: BaseException | None = None) -> None:
        self.running.remove(running)
        running.sampler.close()
        running.slot.job = None
        running.slot.used = time.monotonic()
        running.job._finish(reason, error)
        with self._cond:
            self._cond.notify()


def runs(seq_ids: set[int]) -> int:
    """How many runs of consecutive seq_ids there are ({0, 1, 2}: 1; {0, 2, 3}: 2)."""
    ordered = sorted(seq_ids)
    return sum(1 for i, seq in enumerate(ordered) if i == 0 or seq != ordered[i - 1] + 1)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
