"""Training throughput and memory: LoRA SFT on SmolLM2-135M, padded vs packed batches.

    .venv/bin/python bench/bench_train.py [--work DIR] [--steps 10] [--batch 4] [--max-length 256]

Base and data are built first; then each row is one `edgezh build recipes/quickstart.yaml --until sft
--force sft` in its own process under /usr/bin/time (peak RSS of that process: the SFT stage alone),
with the quickstart's real model and data: SmolLM2-135M-Instruct, LoRA r16 on all linear layers,
Chinese HSK chat examples. Only the SFT settings named in the row differ. The figures come from the
SFT stage's manifest: "real tokens" are the non-padding tokens the optimizer saw, "tokens/s" is
real tokens over the training loop's wall time (model load, data loading and saving excluded),
"computed" are the positions the model ran (batch × longest row when padded; equal to the real
tokens when packed padding-free). Results print as a markdown table and go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def build(root: Path, name: str, until: str, overrides: list[str]) -> dict:
    """One build in its own process; returns the SFT manifest and the process's peak RSS."""
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "edgezh"), "build", str(RECIPE), "--until", until,
           "--force", until, f"output.root={root}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{name}: edgezh build failed ({done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    manifests = sorted(root.glob(f"quickstart/*-{until}/manifest.json"))
    if not manifests:
        sys.exit(f"{name}: no {until} manifest under {root}")
    manifest = json.loads(manifests[-1].read_text())
    return {"manifest": manifest, "peak_rss_mib": peak_kib / 1024, "process_wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-train")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    common = [f"sft.max_steps={args.steps}", f"sft.batch_size={args.batch}", f"data.max_length={args.max_length}",
              "sft.save_steps=100000"]
    rows = {
        "padded": ["sft.packing=false"],
        "packed": ["sft.packing=true"],
        "padded + gradient checkpointing": ["sft.packing=false", "sft.gradient_checkpointing=true"],
        "packed + gradient checkpointing": ["sft.packing=true", "sft.gradient_checkpointing=true"],
    }
    root = args.work / "builds"
    print("building base and data …", file=sys.stderr, flush=True)
    build(root, "data", "data", common)  # first, in its own process: the rows below run only the sft stage
    results = {}
    for name, extra in rows.items():
        print(f"running {name} …", file=sys.stderr, flush=True)
        results[name] = build(root, name, "sft", [*common, *extra])

    print(f"\nLoRA SFT on SmolLM2-135M-Instruct, {args.steps} steps × batch {args.batch}, max length {args.max_length}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| batches | real tokens | computed | train s | real tokens/s | s/step | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        facts = r["manifest"]["info"]
        tokens, secs = facts["tokens"], facts["train_seconds"]
        print(f"| {name} | {tokens['total']} | {tokens['computed']} | {secs:.1f} | {facts['tokens_per_s']:.1f} | {secs / facts['steps']:.2f} | "
              f"{r['peak_rss_mib']:.0f} | {facts['final_loss']:.3f} |")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
