"""Perplexity over sliding windows, identical for every backend.

Method (Hugging Face's "Perplexity of fixed-length models" guide, with llama.cpp's BOS rule):

1. The corpus is tokenized once, without special tokens, and cut to `max_tokens` tokens T[0…N).
2. Windows start at 0, stride, 2·stride, … and hold L = context_length − 1 text tokens behind the
   BOS when the chat format has one (llama3: `<|begin_of_text|>`, as llama.cpp's perplexity tool
   puts BOS first in every chunk), or L = context_length text tokens when it has none (ChatML).
   The last window ends at N.
3. A window scores only the tokens the previous window did not reach: T[j] for
   prev_end ≤ j < end, each predicted from everything before it in the window. So every token is
   scored exactly once, and each token after the first window sees at least L − stride tokens of
   context. The BOS itself is never scored; without a BOS, T[0] has no context and is not scored.
4. Perplexity = exp(mean negative log-likelihood of the scored tokens), natural log.

(llama.cpp's own `perplexity` tool uses non-overlapping chunks of n_ctx and scores the second half
of each; the numbers differ from this method's, the comparison between variants does not.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    ids: list[int]  # what the backend reads (BOS first when there is one)
    rows: list[int]  # output positions whose next-token distribution is scored
    targets: list[int]  # the token each of those rows should predict

    def __len__(self) -> int:
        return len(self.rows)


def windows(tokens: list[int], context_length: int, stride: int, bos_id: int | None) -> list[Window]:
    """Cut `tokens` into the windows described in the module docstring."""
    lead = 1 if bos_id is not None else 0
    span = context_length - lead
    if stride > span:
        raise ValueError(f"stride {stride} leaves tokens outside every window of {span} text tokens")
    out: list[Window] = []
    prev_end = 0 if lead else 1
    n = len(tokens)
    start = 0
    while prev_end < n:
        end = min(start + span, n)
        ids = ([bos_id] if lead else []) + tokens[start:end]
        first = max(prev_end, start + (1 - lead))
        # text token j sits at window position j - start + lead and is predicted from the row before it
        rows = [j - start + lead - 1 for j in range(first, end)]
        if rows:
            out.append(Window(ids, rows, tokens[first:end]))
        prev_end = end
        start += stride
    return out


def token_nll(log_probs, targets: list[int]) -> np.ndarray:
    """Negative log-likelihood of each target under its row of log-probabilities."""
    import torch

    index = torch.tensor(targets, dtype=torch.long)
    return (-log_probs[torch.arange(len(targets)), index]).double().numpy()


def score(backend, wins: list[Window]) -> np.ndarray:
    """Negative log-likelihood of every scored token of `wins` under `backend`, in order."""
    parts = [token_nll(backend.log_probs(w.ids, w.rows), w.targets) for w in wins]
    return np.concatenate(parts) if parts else np.zeros(0)


def perplexity(nll: np.ndarray) -> float:
    return math.exp(float(np.mean(nll))) if len(nll) else float("nan")
