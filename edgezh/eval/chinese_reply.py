"""Chinese-reply rate: the share of greedy replies to Chinese prompts that are mostly Chinese.

Prompts are the held-out conversations of the data stage (`eval.jsonl`, then the prompts of
`pairs_eval.jsonl`): each conversation up to its first user message (a system message before it is
kept as the data has it; no default system prompt is added, so the figure shows the model's own
preference). Only prompts whose user text is itself mostly Chinese count. Without a data stage the
prompts are HSK sentences behind a fixed Chinese request (seeded choice), and the report says so.

A reply is Chinese when more than half of its units are CJK ideographs, where a unit is one
ideograph or one run of other letters and digits (an English word or a number counts once, as a
Chinese character does; whitespace, punctuation and symbols do not count). An empty reply is not
Chinese. Replies are greedy, at most `reply_max_tokens` tokens, stopped at the format's stop tokens.
"""

from __future__ import annotations

import random
import time
import unicodedata
from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.jsonl import read_jsonl

HSK_REQUEST = "请用中文回答：这句话是什么意思？“{sentence}”"


def is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2EBEF
            or 0xF900 <= code <= 0xFAFF or 0x30000 <= code <= 0x3134F)


def cjk_share(text: str) -> float:
    """CJK ideographs among the units of `text`: ideographs, and runs of other letters/digits (0 when none)."""
    cjk = other = 0
    in_run = False
    for char in text:
        if is_cjk(char):
            cjk += 1
            in_run = False
        elif unicodedata.category(char)[0] in "LN":
            other += not in_run
            in_run = True
        else:
            in_run = False
    return cjk / (cjk + other) if cjk + other else 0.0


def is_chinese(text: str) -> bool:
    return cjk_share(text) > 0.5


def _first_turn(messages: list) -> list[dict] | None:
    """The conversation up to and including its first user message."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m.get("role"), "content": m["content"]})
        if m.get("role") == "user":
            return out
    return None


def prompts_from_data(data: Artifact, n: int) -> list[list[dict]]:
    """Up to `n` distinct held-out first turns whose user text is mostly Chinese."""
    found, seen = [], set()
    for name, key in (("eval.jsonl", "messages"), ("pairs_eval.jsonl", "prompt")):
        path = data.file(name)
        if not path.is_file():
            continue
        for row in read_jsonl(path):
            turn = _first_turn(row.get(key) or []) if isinstance(row, dict) else None
            if not turn or not is_chinese(turn[-1]["content"]) or turn[-1]["content"] in seen:
                continue
            seen.add(turn[-1]["content"])
            found.append(turn)
            if len(found) == n:
                return found
    return found


def prompts_from_file(path: Path, n: int) -> list[list[dict]]:
    """Up to `n` prompts from a JSON Lines file (`edgezh eval --prompts`), each line one of: a string (the user
    message), `{"prompt": "..."}`, `{"prompt": [messages]}` (a preference pair's prompt) or `{"messages": [...]}`
    (the conversation up to its first user message). Every prompt counts, Chinese or not (the file is the user's
    choice); a line of another shape is a UserError naming `path:line`."""
    from edgezh.errors import UserError
    from edgezh.jsonl import numbered_records

    found = []
    for number, row in numbered_records(path):
        if isinstance(row, str):
            turn = [{"role": "user", "content": row}]
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            turn = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row, dict) and isinstance(row.get("prompt") or row.get("messages"), list):
            turn = _first_turn(row.get("prompt") or row.get("messages"))
        else:
            turn = None
        if not turn or not turn[-1]["content"].strip():
            raise UserError(f"{path}:{number}: not a prompt (expected a string, {{\"prompt\": ...}} or "
                            "{\"messages\": [...]} with a user message)")
        found.append(turn)
        if len(found) == n:
            break
    if not found:
        raise UserError(f"{path}: no prompts in it")
    return found


def prompts_from_hsk(sentences: list[dict], n: int, seed: int = 0) -> list[list[dict]]:
    chosen = random.Random(seed).sample(sentences, min(n, len(sentences)))
    return [[{"role": "user", "content": HSK_REQUEST.format(sentence=s["chinese"])}] for s in chosen]


def evaluate(backend, tok, prompt_ids: list[list[int]], max_new_tokens: int) -> dict:
    """Greedy replies to every prompt; the Chinese-reply rate and generation speed."""
    replies, generated, seconds = [], 0, 0.0
    for ids in prompt_ids:
        started = time.perf_counter()
        new = backend.greedy(ids, max_new_tokens, tok.stop_ids)
        seconds += time.perf_counter() - started
        generated += len(new)
        replies.append(tok.decode(new))
    shares = [cjk_share(r) for r in replies]
    return {
        "prompts": len(replies),
        "rate": sum(s > 0.5 for s in shares) / len(replies) if replies else None,
        "mean_cjk_share": sum(shares) / len(shares) if shares else None,
        "examples": replies[:3],
        "generated_tokens": generated,
        "seconds": round(seconds, 3),
    }


def prompt_source(data: Artifact | None, found: int) -> str:
    if data is not None and found:
        return f"first user turns of {Path(data.path).name}/eval.jsonl (and pairs_eval.jsonl prompts)"
    return "HSK sentences behind a fixed Chinese request (no held-out Chinese prompts in this build)"
