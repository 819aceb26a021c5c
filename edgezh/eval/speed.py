"""Tokens/s of a GGUF on this machine, with llama.cpp's default settings (F16 KV cache).

Prompt processing: one pass over a `prompt_tokens`-token prompt (only the last logits read).
Generation: `gen_tokens` greedy tokens after it, one decode per token (stop tokens ignored).
One run each after a warm-up pass, so the figure is indicative, not a benchmark.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgezh.eval.backends import GGUFBackend


def measure(path: Path, prompt: list[int], *, gen_tokens: int = 32, threads: int | None = None,
            adapters: Sequence[tuple[Path, float]] = ()) -> dict:
    """`adapters`: LoRA adapter GGUFs on the model (llama.cpp computes their products beside the base's)."""
    with GGUFBackend(path, n_ctx=len(prompt) + gen_tokens + 8, kv="f16", threads=threads, name=path.name,
                     adapters=adapters) as llm:
        llm._clear()
        llm._decode(prompt[:8], 0, {7})  # warm-up: weights paged in, graphs allocated
        llm._clear()
        started = time.perf_counter()
        (logits,) = llm._decode(prompt, 0, {len(prompt) - 1})
        prompt_s = time.perf_counter() - started
        started = time.perf_counter()
        position = len(prompt)
        for _ in range(gen_tokens):
            (logits,) = llm._decode([int(np.argmax(logits))], position, {0})
            position += 1
        gen_s = time.perf_counter() - started
        threads_used = llm.llm.context_params.n_threads
    return {
        "prompt_tokens": len(prompt),
        "prompt_tps": round(len(prompt) / prompt_s, 1),
        "gen_tokens": gen_tokens,
        "gen_tps": round(gen_tokens / gen_s, 1),
        "threads": int(threads_used),
        "cpu_count": os.cpu_count(),
    }
