"""`edgezh serve` under parallel load: 4 concurrent streaming clients against 1, with the openai client.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_serve.py [--gguf FILE] [--threads 2] [--parallel 4]
        [--tokens 128] [--rounds 3] [--repack]

The server is the real CLI (`python -m edgezh.cli serve GGUF --parallel 4 …`) in its own process, on
127.0.0.1. The default GGUF is SmolLM2-135M q4_k_m (built by bench_runtime.py). Every request is
greedy with a fixed seed, so it has one right answer. Each round runs, in alternating order:

- single: each of the 4 questions alone, one after another (one client);
- parallel: the 4 questions at once, from 4 threads, each with its own `openai.OpenAI` client.

Per stream: time to first token (request sent → first content chunk), and decode tokens/s from the
first to the last content chunk with the completion tokens of `stream_options.include_usage`.
Aggregate decode tok/s of the parallel side = Σ(tokens − 1) / (last chunk of any stream − first
chunk of any stream); of the single side = the median stream's rate. The ratio is the median over
rounds of aggregate ÷ single (both sides measured in the same round). Every parallel answer is
compared with the same question's single answer (they must be equal: batch invariance); any 429
is counted (there must be none). Then, with the server stopped, llama.cpp alone: one decode step of 4
rows against one of 1 row (`ceiling`), the most batching can give on this machine. Results print as
markdown and go to DIR/serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = ["请详细介绍一下长城的历史。", "Explain in detail how the water cycle works.",
             "什么是人工智能？请详细说明它的历史和应用。", "Write a long story about a brave little cat."]


def start_server(gguf: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    import httpx

    command = [sys.executable, "-m", "edgezh.cli", "serve", str(gguf), "--port", str(port), "--model-name", "smol",
               "--threads", str(args.threads), "--parallel", str(args.parallel), "--ctx", "1024",
               "--gpu-layers", "0"] + (["--repack"] if args.repack else [])
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the server did not come up in 120 s")
        time.sleep(0.2)


def stream(url: str, question: str, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    sent = time.perf_counter()
    first = last = None
    parts, usage = [], None
    try:
        chunks = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": question}], max_tokens=tokens, temperature=0,
            seed=42, stream=True, stream_options={"include_usage": True})
        for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                parts.append(chunk.choices[0].delta.content)
    except openai.RateLimitError:
        return {"status": 429}
    n = usage.completion_tokens
    return {"status": 200, "text": "".join(parts), "tokens": n, "ttft": first - sent, "first": first, "last": last,
            "tps": (n - 1) / (last - first) if n > 1 and last > first else None}


def parallel(url: str, tokens: int) -> list[dict]:
    results: list[dict] = [{}] * len(QUESTIONS)

    def run(index: int) -> None:
        results[index] = stream(url, QUESTIONS[index], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def ceiling(gguf: Path, args: argparse.Namespace, steps: int = 60) -> dict:
    """llama.cpp alone, no server and no sampling: the time of one `llama_decode` with `parallel` decode rows
    (one per sequence, each after a 100-token prompt of its own) against one row, in a context loaded as
    `edgezh serve` loads it (`loader.load_native`), 1-row and N-row steps alternating. N × t(1) ÷ t(N) is
    the most that decoding N sequences together can give over one on this machine."""
    from bench_decode_step import Steps

    context = Steps(gguf, parallel=args.parallel, threads=args.threads, repack=args.repack)
    prompt = 100
    for seq in range(args.parallel):
        context.decode([(seq, pos, 1000 + pos) for pos in range(prompt)], False)
    one, many = [], []
    for step in range(steps):
        for seq in range(args.parallel):  # the N-row step and the 1-row step decode the same position
            context.forget(seq, prompt)
        one.append(context.decode([(0, prompt, 2000 + step)]))
        context.forget(0, prompt)
        many.append(context.decode([(seq, prompt, 2000 + step) for seq in range(args.parallel)]))
    context.close()
    t1, tn = statistics.median(one), statistics.median(many)
    return {"ms_1_row": round(t1 * 1000, 2), f"ms_{args.parallel}_rows": round(tn * 1000, 2),
            "ratio": round(args.parallel * t1 / tn, 3)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-runtime")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repack", action="store_true", help="serve with llama.cpp's repacked CPU weights")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import socket

    from bench_runtime import smollm2_ggufs

    gguf = args.gguf or smollm2_ggufs(args.work)["q4_k_m"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(gguf, port, args)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        stream(url, QUESTIONS[0], 16)  # warm-up: page the weights in
        rounds = []
        for index in range(args.rounds):
            order = ("single", "parallel") if index % 2 == 0 else ("parallel", "single")
            row: dict = {}
            for side in order:
                row[side] = [stream(url, q, args.tokens) for q in QUESTIONS] if side == "single" \
                    else parallel(url, args.tokens)
            rounds.append(row)
            print(f"round {index}: done", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    rejected = sum(r["status"] == 429 for row in rounds for side in row.values() for r in side)
    if rejected:
        raise SystemExit(f"{rejected} requests got 429")
    same = sum(p["text"] == s["text"] for row in rounds for p, s in zip(row["parallel"], row["single"]))
    total = sum(len(row["parallel"]) for row in rounds)
    ratios, singles, aggregates = [], [], []
    for row in rounds:
        single = statistics.median(r["tps"] for r in row["single"])
        streams = row["parallel"]
        span = max(r["last"] for r in streams) - min(r["first"] for r in streams)
        aggregate = sum(r["tokens"] - 1 for r in streams) / span
        singles.append(single)
        aggregates.append(aggregate)
        ratios.append(aggregate / single)
    ttft = {side: [r["ttft"] for row in rounds for r in row[side]] for side in ("single", "parallel")}
    result = {"gguf": str(gguf), "threads": args.threads, "parallel": args.parallel, "tokens": args.tokens,
              "repack": args.repack, "rounds": args.rounds, "load_avg": os.getloadavg(),
              "single_tps": statistics.median(singles), "aggregate_tps": statistics.median(aggregates),
              "ratio": statistics.median(ratios), "ratios": ratios, "same_as_alone": [same, total],
              "ttft": {side: {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95)}
                       for side, values in ttft.items()},
              "tokens_per_answer": [r["tokens"] for row in rounds for r in row["parallel"]],
              "llama_cpp_ceiling": ceiling(gguf, args)}
    name = "serve-repack.json" if args.repack else "serve.json"
    (args.work / name).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"| GGUF | clients | decode tok/s | ratio | TTFT p50 | TTFT p95 | same answer as alone |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {gguf.name} | 1 | {result['single_tps']:.1f} | 1× | {result['ttft']['single']['p50'] * 1000:.0f} ms | "
          f"{result['ttft']['single']['p95'] * 1000:.0f} ms | – |")
    print(f"| {gguf.name} | {len(QUESTIONS)} | {result['aggregate_tps']:.1f} (aggregate) | {result['ratio']:.2f}× | "
          f"{result['ttft']['parallel']['p50'] * 1000:.0f} ms | {result['ttft']['parallel']['p95'] * 1000:.0f} ms | "
          f"{same}/{total} |")
    c = result["llama_cpp_ceiling"]
    print(f"\nllama.cpp alone (no server, no sampling): one decode step of {args.parallel} rows "
          f"{c[f'ms_{args.parallel}_rows']} ms, of 1 row {c['ms_1_row']} ms: at most {c['ratio']}× from decoding "
          f"{args.parallel} sequences together on this machine")


if __name__ == "__main__":
    main()
