"""What one llama.cpp decode step costs in the context `edgezh serve` decodes in, without the server.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_decode_step.py [--gguf FILE] [--threads 2] [--blocks 6]

The context is made by `edgezh.runtime.loader.load_native` (4 sequences of 1024 tokens, a KV stream per
sequence, plain weight layouts), once with flash attention (llama.cpp's default, edgezh's since
2026-12-01) and once without. Each block gives the 4 sequences prompts of 33, 18, 45 and 19 random
tokens (the bench questions' lengths) and then times 40 decode steps of each shape: 1 row (sequence
0), 4 rows in ascending seq_id order, 4 rows in descending order. Blocks alternate between the two
contexts; medians over all blocks. N × t(1 row) ÷ t(N rows) is the most that decoding N sequences
together can give over one. Results print as markdown and go to DIR/decode-step.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = (33, 18, 45, 19)


class Steps:
    """Raw `llama_decode` calls on one context: rows of (seq_id, position, token), timed."""

    def __init__(self, gguf: Path, *, parallel: int, threads: int, repack: bool = False, flash_attn: bool = True):
        import llama_cpp

        from edgezh.runtime.loader import load_native

        self.native = load_native(gguf, n_ctx=1024, parallel=parallel, n_threads=threads, n_gpu_layers=0,
                                  repack=repack, flash_attn=flash_attn)
        self.ctx = self.native.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, rows: list[tuple[int, int, int]], logits: bool = True) -> float:
        import llama_cpp

        batch = self.batch
        batch.n_tokens = 0
        for i, (seq, pos, token) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
            batch.n_tokens = i + 1
        started = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - started

    def forget(self, seq: int, start: int = 0) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1)

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self.batch)
        self.native.close()


def block(steps: Steps, n: int = 40) -> dict[str, list[float]]:
    """Fresh prompts for the 4 sequences, then `n` steps of each shape (their positions advance)."""
    for seq, length in enumerate(PROMPTS):
        steps.forget(seq)
        steps.decode([(seq, pos, random.randrange(100, 40000)) for pos in range(length)], False)
    pos = list(PROMPTS)
    out: dict[str, list[float]] = {"1 row": [], "4 rows, ascending seq_id": [], "4 rows, descending seq_id": []}
    for name, seqs in (("1 row", [0]), ("4 rows, ascending seq_id", [0, 1, 2, 3]),
                       ("4 rows, descending seq_id", [3, 2, 1, 0])):
        for _ in range(n):
            out[name].append(steps.decode([(seq, pos[seq], random.randrange(100, 40000)) for seq in seqs]))
            for seq in seqs:
                pos[seq] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-runtime")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from bench_runtime import smollm2_ggufs

    gguf = args.gguf or smollm2_ggufs(args.work)["q4_k_m"]
    contexts = {"flash attention": Steps(gguf, parallel=4, threads=args.threads, flash_attn=True),
                "no flash attention": Steps(gguf, parallel=4, threads=args.threads, flash_attn=False)}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in contexts}
    for _ in range(args.blocks):
        for name, steps in contexts.items():
            for shape, values in block(steps).items():
                times[name].setdefault(shape, []).extend(values)
    for steps in contexts.values():
        steps.close()
    result = {"gguf": str(gguf), "threads": args.threads, "blocks": args.blocks,
              "ms": {name: {shape: round(statistics.median(v) * 1000, 2) for shape, v in shapes.items()}
                     for name, shapes in times.items()}}
    (args.work / "decode-step.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("| attention | 1 row | 4 rows, ascending seq_id | 4 rows, descending seq_id | 4 × t(1) ÷ t(4 ascending) |")
    print("|---|---|---|---|---|")
    for name, ms in result["ms"].items():
        one, up, down = ms["1 row"], ms["4 rows, ascending seq_id"], ms["4 rows, descending seq_id"]
        print(f"| {name} | {one:.2f} ms | {up:.2f} ms | {down:.2f} ms | {4 * one / up:.2f}× |")


if __name__ == "__main__":
    main()
