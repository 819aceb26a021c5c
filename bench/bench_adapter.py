"""The two ways to ship, measured: a LoRA adapter GGUF on its base in llama.cpp against the merged model.

    .venv/bin/python bench/bench_adapter.py BASE_DIR ADAPTER_DIR --template chatml [--work DIR] [--tokens 1024]
                                            [--quant q4_k_m]

BASE_DIR is the HF folder the adapter was trained on (a build's `01-base`), ADAPTER_DIR the peft adapter (a
build's `05-dpo/adapter`). Written to DIR: the merged model as F16 GGUF (the streaming merge fused into the
conversion) and quantized plainly to QUANT, the base as F16 GGUF and QUANT, the adapter as an F16 adapter GGUF.
Then, on the same People's Daily tokens (windows of 256, stride 192, as the quickstart's report), llama.cpp
scores each of base + adapter (F16 and QUANT), the merged QUANT and the base alone against the merged F16: mean
and p99 KLD, top-1 agreement. Sizes are file sizes. Results print as a markdown table and go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--template", required=True)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench-adapter"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--quant", default="q4_k_m")
    args = parser.parse_args()

    from edgezh.data.corpora import peoples_daily
    from edgezh.eval import kld, perplexity
    from edgezh.eval.backends import GGUFBackend
    from edgezh.eval.tokens import EvalTokenizer
    from edgezh.export import lora_gguf
    from edgezh.export.gguf_writer import convert
    from edgezh.export.lora import LoraAdapter
    from edgezh.export.quantize import quantize

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    files = {"merged-f16": work / "merged-f16.gguf", "base-f16": work / "base-f16.gguf",
             f"merged-{args.quant}": work / f"merged-{args.quant}.gguf", f"base-{args.quant}": work / f"base-{args.quant}.gguf",
             "lora": work / "lora-f16.gguf"}
    convert(args.base, files["merged-f16"], "f16", template=args.template, adapter=LoraAdapter.load(args.adapter))
    convert(args.base, files["base-f16"], "f16", template=args.template)
    for which in ("merged", "base"):
        quantize(files[f"{which}-f16"], files[f"{which}-{args.quant}"], args.quant)
    adapter_facts = lora_gguf.convert(args.base, args.adapter, files["lora"], "f16")

    tok = EvalTokenizer(args.base, args.template)
    ids = tok.encode(peoples_daily(max_chars=args.tokens * 8))[:args.tokens + 64]
    wins = perplexity.windows(ids, 256, 192, tok.bos_id)
    lora = [(files["lora"], 1.0)]
    variants = {"base-f16+lora": (files["base-f16"], lora), f"base-{args.quant}+lora": (files[f"base-{args.quant}"], lora),
                f"merged-{args.quant}": (files[f"merged-{args.quant}"], []), "base alone (f16)": (files["base-f16"], [])}
    reference = GGUFBackend(files["merged-f16"], n_ctx=256, name="merged-f16")
    opened = {name: GGUFBackend(path, n_ctx=256, name=name, adapters=adapters) for name, (path, adapters) in variants.items()}
    try:
        _, comparisons = kld.compare(reference, opened, wins)
    finally:
        reference.close()
        for backend in opened.values():
            backend.close()
    results = {"adapter": adapter_facts, "files": {k: p.stat().st_size for k, p in files.items()}, "against": "merged-f16"}
    print(f"adapter: {adapter_facts['pairs']} pairs, rank {adapter_facts['ranks']}, alpha {adapter_facts['alpha']:g}, "
          f"{files['lora'].stat().st_size / 2**20:.1f} MiB; every row against the merged F16 GGUF\n")
    print("| variant | size | mean KLD | p99 KLD | top-1 | tokens |\n|---|---|---|---|---|---|")
    for name, comparison in comparisons.items():
        _, values, top1 = comparison.arrays()
        stats = kld.stats(values, top1)
        path, adapters = variants[name]
        size = path.stat().st_size + sum(a.stat().st_size for a, _ in adapters)
        results[name] = {**stats, "bytes": size}
        print(f"| {name} | {size / 2**20:.1f} MiB | {stats['mean']:.2e} | {stats['p99']:.2e} | {stats['top1']:.2%} | {stats['tokens']} |")
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
