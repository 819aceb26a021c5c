"""The data stage and the first SFT step at the seeds' scale: time and peak memory against the data's size.

For each size N, a synthetic Chinese ShareGPT file of N conversations (bench/gen_sharegpt.py; cached
under .cache/bench-data/) is run through `edgezh build --until data` on the tiny Llama 3 (real Llama 3
tokenizer), in a fresh process, timed from outside. Memory is given two ways: the stage's own figure
(the sum of its processes' PSS, sampled — forked workers share pages with the stage) and the largest
single process (ru_maxrss). ``--sft N …`` then trains one LoRA step on the N-conversation data set and
reports the SFT stage's wall time and peak memory: the time to a first step, and whether memory grows
with the data. ``--baseline PATH`` runs the same data build with the edgezh checkout at PATH (an older
commit, via PYTHONPATH) in turn with this one, for a ratio on the same machine state.

    python bench/bench_data.py --counts 30000 300000 1000000 --sft 30000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-data"
EDGEZH = [sys.executable, "-m", "edgezh.cli"]

RECIPE = """name: bench-data-{count}
base:
  init: {{hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, seed: 0}}
  tokenizer: llama3
  template: llama3
data:
  sources: [{{path: {data}}}]
  max_length: 2048
output: {{root: {root}}}
"""
SFT = """sft:
  method: lora
  max_steps: 1
  batch_size: 1
  grad_accum: 1
  save_steps: 1000
  eval_examples: 16
"""


def dataset(count: int) -> Path:
    path = CACHE / f"zh-sharegpt-{count}.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "gen_sharegpt.py"), str(count), str(path)], check=True)
    return path


def recipe(count: int, root: Path, sft: bool = False) -> Path:
    """The bench recipe; the sft section only for SFT runs (a data run with an older checkout must not meet
    sft keys it does not know; the data stage's key does not depend on it)."""
    path = CACHE / f"recipe-{count}-{root.name}.yaml"
    path.write_text(RECIPE.format(count=count, data=dataset(count), root=root) + (SFT if sft else ""), encoding="utf-8")
    return path


def timed(command: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    err = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "max_process_rss_mb": round(usage.ru_maxrss / 1024), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def first_step_s(root: Path, count: int) -> float | None:
    """Seconds from the SFT stage's start to its first optimizer step, from build.log's timestamps."""
    from datetime import datetime

    start = step = None
    for line in (root / f"bench-data-{count}" / "build.log").read_text(encoding="utf-8").splitlines():
        stamp = line[:23]
        if "stage sft: start" in line:
            start, step = stamp, None
        elif "sft training: 1/" in line and start and step is None:
            step = stamp
    if not (start and step):
        return None
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return round((parse(step) - parse(start)).total_seconds(), 1)


def stage(root: Path, count: int, name: str) -> dict:
    folder = next((root / f"bench-data-{count}").glob(f"*-{name}"))
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return {"stage_wall_s": manifest["wall_s"], "stage_peak_mb": manifest["peak_rss_mb"], "info": manifest["info"]}


def data_run(count: int, root: Path, code: Path | None = None) -> dict:
    path = recipe(count, root)
    env = {"PYTHONPATH": str(code)} if code else None  # `python -m` puts its working folder first on sys.path
    subprocess.run([*EDGEZH, "build", str(path), "--until", "base"], cwd=code or ROOT, env={**os.environ, **(env or {})},
                   check=True, capture_output=True)
    outside = timed([*EDGEZH, "build", str(path), "--until", "data", "--force", "data"], env, code or ROOT)
    inside = stage(root, count, "data")
    info = inside.pop("info")
    return {**outside, **inside, "train": info["train"], "tokens_train": info["tokens_train"],
            "file_mb": round(dataset(count).stat().st_size / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[30000, 300000])
    parser.add_argument("--sft", type=int, nargs="*", default=[])
    parser.add_argument("--baseline", type=Path, help="an edgezh checkout to compare with (run in turn, same sizes)")
    parser.add_argument("--root", type=Path, default=CACHE / "builds")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    results = {"data": [], "sft": []}
    for count in args.counts:
        row = {"conversations": count, "new": data_run(count, args.root)}
        if args.baseline:
            row["baseline"] = data_run(count, args.root.with_name("builds-baseline"), args.baseline)
            row["wall_ratio"] = round(row["new"]["wall_s"] / row["baseline"]["wall_s"], 3)
        results["data"].append(row)
        print(json.dumps(row), flush=True)
    for count in args.sft:
        path = recipe(count, args.root, sft=True)
        subprocess.run([*EDGEZH, "build", str(path), "--until", "data"], cwd=ROOT, check=True, capture_output=True)
        outside = timed([*EDGEZH, "build", str(path), "--until", "sft", "--force", "sft"])
        inside = stage(args.root, count, "sft")
        inside.pop("info")
        row = {"conversations": count, **outside, **inside, "first_step_s": first_step_s(args.root, count)}
        results["sft"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
