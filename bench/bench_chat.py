"""The terminal chat's decode speed against the engine alone: same GGUF, same engine, prompt and seed.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_chat.py [--gguf FILE] [--threads 2] [--tokens 300] [--reps 5]

One `Engine` is loaded (the GGUF of the quickstart build, q4_k_m, when it exists; else SmolLM2-135M
q4_k_m built by bench_runtime.py — the quickstart's base, the same architecture and size). Each rep
runs both sides back to back, in alternating order:

- engine: `Engine.chat(messages, params)` iterated to the end in this process, nothing else running;
- app: the real `ChatApp` headless (Textual's `run_test`), driven by Pilot: the message is put in the
  prompt box and Enter pressed; the app's worker streams the answer while the UI repaints; the
  status line's figure (`app.last_stats.decode_tps`) is read at the end.

Both figures are the engine's own decode rate ((tokens - 1) / (last - first token), measured in the
decode thread), so the app's figure drops exactly as much as the UI takes the cores from llama.cpp.
Both sides must produce the same text (checked). The ratio is the median of the per-rep ratios.
Results print as a markdown table and go to DIR/chat.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "请详细介绍中国的四大发明，写一篇至少五段的长文章。"


def default_gguf(work: Path) -> Path:
    quickstart = ROOT / "builds" / "quickstart" / "export" / "quickstart-q4_k_m.gguf"
    if quickstart.is_file():
        return quickstart
    from bench_runtime import smollm2_ggufs

    return smollm2_ggufs(work)["q4_k_m"]


def run_engine(engine, messages, params) -> dict:
    generation = engine.chat(messages, params)
    generation.result()
    return {"tps": generation.stats.decode_tps, "tokens": len(generation.tokens), "text": generation.text}


async def run_app(engine, params, history: Path) -> dict:
    from edgezh.tui import ChatApp, ChatConfig
    from edgezh.tui.widgets import PromptInput

    app = ChatApp(ChatConfig(model=engine.path, history=history, params=params), engine=engine)
    async with app.run_test(headless=True, size=(110, 34)) as pilot:
        await pilot.pause()
        app.query_one(PromptInput).text = PROMPT
        await pilot.press("enter")
        deadline = time.monotonic() + 600
        while app.generating or app.last_stats is None:
            if time.monotonic() > deadline:
                raise SystemExit("the app did not finish its answer in 10 minutes")
            await asyncio.sleep(0.25)  # not pilot.pause: waiting for the app to be idle is work of its own
        stats = app.last_stats
        text = app.session.messages[-1]["content"]
    return {"tps": stats.decode_tps, "tokens": stats.completion_tokens, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-runtime")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from edgezh.runtime.engine import Engine, SamplingParams

    gguf = args.gguf or default_gguf(args.work)
    engine = Engine.load(gguf, n_threads=args.threads, n_gpu_layers=0)
    params = SamplingParams(max_tokens=args.tokens, seed=1234, min_p=0)
    messages = [{"role": "system", "content": engine.format.default_system}, {"role": "user", "content": PROMPT}]
    history = args.work / "bench-chat.jsonl"
    run_engine(engine, messages, params)  # warm-up: page the weights in
    rows = []
    for rep in range(args.reps):
        order = ("engine", "app") if rep % 2 == 0 else ("app", "engine")
        row = {}
        for side in order:
            row[side] = run_engine(engine, messages, params) if side == "engine" else \
                asyncio.run(run_app(engine, params, history))
        if row["app"]["text"] != row["engine"]["text"]:
            raise SystemExit(f"the app and the engine answered differently:\n{row['app']['text']!r}\n"
                             f"{row['engine']['text']!r}")
        row["ratio"] = row["app"]["tps"] / row["engine"]["tps"]
        rows.append(row)
        print(f"rep {rep}: engine {row['engine']['tps']:.1f} tok/s, app {row['app']['tps']:.1f} tok/s, "
              f"{row['engine']['tokens']} tokens, ratio {row['ratio']:.3f}", file=sys.stderr)
    engine.close()
    history.unlink(missing_ok=True)
    result = {"gguf": str(gguf), "threads": args.threads, "tokens": rows[0]["engine"]["tokens"],
              "load_avg": os.getloadavg(), "reps": [{k: v for k, v in r.items() if k != "text"} | {
                  "engine": {"tps": r["engine"]["tps"], "tokens": r["engine"]["tokens"]},
                  "app": {"tps": r["app"]["tps"], "tokens": r["app"]["tokens"]}} for r in rows],
              "engine_tps": statistics.median(r["engine"]["tps"] for r in rows),
              "app_tps": statistics.median(r["app"]["tps"] for r in rows),
              "ratio": statistics.median(r["ratio"] for r in rows)}
    (args.work / "chat.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("| GGUF | answer | engine alone | chat app (headless, Pilot) | ratio (median of pairs) |")
    print("|---|---|---|---|---|")
    print(f"| {gguf.name} | {result['tokens']} tokens | {result['engine_tps']:.1f} tok/s | "
          f"{result['app_tps']:.1f} tok/s | {result['ratio']:.3f}× |")


if __name__ == "__main__":
    main()
