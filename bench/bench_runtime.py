"""Runtime benchmarks: edgezh's engine against llama-cpp-python's own create_completion, llama.cpp's
repacked CPU weights on and off, and decode speed against the machine's memory bandwidth.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_runtime.py [--work DIR] [--threads 2] [--tokens 128] [--reps 7]

1. Engine overhead. SmolLM2-135M-Instruct (the quickstart's base, real weights) is converted to an
   f16 GGUF and quantized with llama.cpp to q4_k_m and q8_0. For each GGUF a `llama_cpp.Llama` and
   an `edgezh.runtime.engine.Engine` (its own context and decode loop, `repack=True` as
   llama-cpp-python loads weights and flash attention on as the engine runs it, so both compute
   alike) are loaded in the same process, same
   sampler settings and seed, and the two paths alternate, the KV cache cleared before every run:
   - baseline: `Llama.create_completion(prompt_text, stream=True, ...)` on the prompt the registry renders;
   - edgezh: `Engine.chat(messages, SamplingParams(...))` (renders, fits, streams pieces through the
     decode thread).
   Time to first token is the wall time from the call to the first non-empty text; decode speed is
   (tokens - 1) / (last - first text). Both runs must produce the same text (checked). Ratios are
   medians over back-to-back pairs, so a machine that is busy for a while slows both sides alike.
2. Repacking. The same engine loaded with `repack=False` (edgezh's default: batch-invariant
   answers, see `edgezh.runtime.loader`) and `repack=True` (llama.cpp's default), alternating:
   decode tok/s and prompt evaluation (time to first token, cache cleared) of one stream.
3. Bandwidth bound. A token of decode reads every weight once, so tokens/s ≤ bandwidth / bytes of
   tensor data. Bandwidth is measured with numpy copies of a 512 MiB array (read + write bytes), on
   one thread and on `--threads` threads (the count llama.cpp decodes with); the fraction reached
   is reported against the larger of the two.

Results print as markdown tables and go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "请详细介绍中国的四大发明，写一篇至少五段的长文章。"


def smollm2_ggufs(work: Path) -> dict[str, Path]:
    """f16, q4_k_m and q8_0 GGUFs of SmolLM2 (built once into `work`)."""
    from edgezh.export.gguf_writer import convert
    from edgezh.export.quantize import quantize
    from edgezh.layout import model_dir
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    plan = make_plan(load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output.root={work}"]), until="base")
    run_plan(plan)
    folder = model_dir(plan.step("base").artifact)
    out = {"f16": work / "smollm2-f16.gguf"}
    if not out["f16"].is_file():
        convert(folder, out["f16"], "f16", template="chatml")
    for kind in ("q4_k_m", "q8_0"):
        out[kind] = work / f"smollm2-{kind}.gguf"
        if not out[kind].is_file():
            quantize(out["f16"], out[kind], kind)
    return out


def bandwidth(threads: int, size_mib: int = 512, reps: int = 7) -> dict[str, float]:
    """GB/s of numpy copies (bytes read + bytes written), best of `reps`, on 1 and `threads` threads."""
    import numpy as np

    source = np.ones(size_mib * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in

    def best(run) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return 2 * source.nbytes / min(times) / 1e9

    single = best(lambda: np.copyto(target, source))
    chunks = np.array_split(np.arange(source.size), threads)
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.size]

    def parallel() -> None:
        workers = [threading.Thread(target=np.copyto, args=(target[a:b], source[a:b])) for a, b in bounds]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    multi = best(parallel)
    return {"single_thread_gbs": single, "threads": threads, "multi_thread_gbs": multi, "bound_gbs": max(single, multi)}


def tensor_bytes(path: Path) -> int:
    from edgezh.export.quantize import describe

    info = describe(path)
    return round(info["bits_per_weight"] * info["params"] / 8)


def run_baseline(llama, prompt: str, settings: dict, tokens: int) -> dict:
    llama.reset()
    start = time.perf_counter()
    first = last = None
    parts = []
    for chunk in llama.create_completion(prompt, max_tokens=tokens, stream=True, **settings):
        text = chunk["choices"][0]["text"]
        if text:
            last = time.perf_counter()
            first = first or last
            parts.append(text)
    end = time.perf_counter()
    return {"text": "".join(parts), "ttft": first - start, "first": first, "last": last, "end": end,
            "sampled": llama.n_tokens - len(llama.tokenize(prompt.encode(), add_bos=False, special=True)) + 1}


def run_engine(engine, messages: list, params, tokens: int) -> dict:
    engine.loop.clear()
    start = time.perf_counter()
    first = last = None
    generation = engine.chat(messages, params)
    for delta in generation:
        last = time.perf_counter()
        first = first or last
    end = time.perf_counter()
    return {"text": generation.text, "ttft": first - start, "first": first, "last": last, "end": end,
            "sampled": len(generation.tokens) + (generation.stop_token is not None)}


def overhead(path: Path, threads: int, tokens: int, reps: int) -> dict:
    import llama_cpp

    from edgezh.runtime.engine import Engine, SamplingParams

    llama = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                            flash_attn=True, verbose=False)
    engine = Engine.load(path, template="chatml", n_ctx=1024, n_threads=threads, n_gpu_layers=0, repack=True)
    messages = [{"role": "system", "content": engine.format.default_system}, {"role": "user", "content": PROMPT}]
    prompt = engine.render(messages)
    settings = dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1, seed=1234)
    params = SamplingParams(max_tokens=tokens, **settings)
    rows = {"baseline": [], "edgezh": []}
    run_engine(engine, messages, params, tokens)  # warm-up: page in the weights, size the buffers
    for rep in range(reps):
        order = ("baseline", "edgezh") if rep % 2 == 0 else ("edgezh", "baseline")
        for which in order:
            rows[which].append(run_engine(engine, messages, params, tokens) if which == "edgezh"
                               else run_baseline(llama, prompt, settings, tokens))
    # Same seed, same sampler chain: the same tokens. create_completion may sample past max_tokens to finish
    # a character split across tokens (edgezh drops such a tail), so its text may be one character longer.
    for base, ours in zip(rows["baseline"], rows["edgezh"]):
        if not base["text"].startswith(ours["text"]) or len(base["text"]) - len(ours["text"]) > 1:
            raise SystemExit(f"{path.name}: the two paths generated different text:\n{base['text']!r}\n{ours['text']!r}")
    result = {"file": path.name, "prompt_tokens": len(engine.prompt_tokens(messages)),
              "tokens": rows["edgezh"][0]["sampled"]}
    for which, runs in rows.items():
        # tokens sampled = what llama.cpp evaluated after the prompt, + the last one (sampled, not evaluated)
        result[which] = {"ttft_s": statistics.median(r["ttft"] for r in runs),
                         "decode_tps": statistics.median((r["sampled"] - 1) / (r["last"] - r["first"]) for r in runs),
                         "total_s": statistics.median(r["end"] - r["first"] + r["ttft"] for r in runs)}
    # Ratios of back-to-back pairs (medians): a machine that slows down for a while slows both sides of a pair.
    def tps(r: dict) -> float:
        return (r["sampled"] - 1) / (r["last"] - r["first"])

    pairs = list(zip(rows["baseline"], rows["edgezh"]))
    result["tps_ratio"] = statistics.median(tps(e) / tps(b) for b, e in pairs)
    result["ttft_ratio"] = statistics.median(e["ttft"] / b["ttft"] for b, e in pairs)
    engine.close()
    llama.close()
    return result


def repacking(path: Path, threads: int, tokens: int, reps: int) -> dict:
    """One stream's decode tok/s and TTFT with llama.cpp's repacked weights off (edgezh's default) and on."""
    from edgezh.runtime.engine import Engine, SamplingParams

    engines = {repack: Engine.load(path, template="chatml", n_ctx=1024, n_threads=threads, n_gpu_layers=0,
                                   repack=repack) for repack in (False, True)}
    messages = [{"role": "system", "content": engines[False].format.default_system},
                {"role": "user", "content": PROMPT}]
    params = SamplingParams(max_tokens=tokens, temperature=0.7, seed=1234)
    rows = {False: [], True: []}
    for engine in engines.values():
        run_engine(engine, messages, params, tokens)
    for rep in range(reps):
        for repack in ((False, True) if rep % 2 == 0 else (True, False)):
            rows[repack].append(run_engine(engines[repack], messages, params, tokens))
    for engine in engines.values():
        engine.close()

    def tps(r: dict) -> float:
        return (r["sampled"] - 1) / (r["last"] - r["first"])

    pairs = list(zip(rows[False], rows[True]))
    return {"file": path.name, "off": {"decode_tps": statistics.median(map(tps, rows[False])),
                                       "ttft_s": statistics.median(r["ttft"] for r in rows[False])},
            "on": {"decode_tps": statistics.median(map(tps, rows[True])),
                   "ttft_s": statistics.median(r["ttft"] for r in rows[True])},
            "tps_ratio": statistics.median(tps(off) / tps(on) for off, on in pairs),
            "ttft_ratio": statistics.median(off["ttft"] / on["ttft"] for off, on in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-runtime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import llama_cpp
    import numpy as np

    ggufs = smollm2_ggufs(args.work)
    bw = bandwidth(args.threads)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_avg": os.getloadavg()},
               "versions": {"llama_cpp_python": llama_cpp.__version__, "numpy": np.__version__},
               "settings": {"threads": args.threads, "tokens": args.tokens, "reps": args.reps, "prompt": PROMPT},
               "bandwidth": bw, "models": []}
    for kind in ("q4_k_m", "q8_0", "f16"):
        row = overhead(ggufs[kind], args.threads, args.tokens, args.reps)
        row["kind"] = kind
        row["tensor_bytes"] = tensor_bytes(ggufs[kind])
        row["bound_tps"] = bw["bound_gbs"] * 1e9 / row["tensor_bytes"]
        row["fraction_of_bound"] = row["edgezh"]["decode_tps"] / row["bound_tps"]
        results["models"].append(row)
        print(f"{kind}: done", file=sys.stderr)
    results["repack"] = [repacking(ggufs[kind], args.threads, args.tokens, args.reps) for kind in ("q4_k_m", "q8_0")]
    (args.work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")

    print(f"Memory bandwidth (numpy copy, read+write, 512 MiB): {bw['single_thread_gbs']:.1f} GB/s on 1 thread, "
          f"{bw['multi_thread_gbs']:.1f} GB/s on {bw['threads']} threads; bound uses {bw['bound_gbs']:.1f} GB/s\n")
    print("| GGUF | tokens | TTFT create_completion | TTFT edgezh | ratio | decode create_completion | decode edgezh | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["models"]:
        b, e = row["baseline"], row["edgezh"]
        print(f"| {row['kind']} | {row['prompt_tokens']} + {row['tokens']} | {b['ttft_s'] * 1000:.0f} ms | "
              f"{e['ttft_s'] * 1000:.0f} ms | {row['ttft_ratio']:.3f}× | {b['decode_tps']:.1f} tok/s | "
              f"{e['decode_tps']:.1f} tok/s | {row['tps_ratio']:.3f}× |")
    print("\n| GGUF | decode, repack off | decode, repack on | ratio off/on | TTFT off | TTFT on | ratio off/on |")
    print("|---|---|---|---|---|---|---|")
    for row in results["repack"]:
        print(f"| {row['file']} | {row['off']['decode_tps']:.1f} tok/s | {row['on']['decode_tps']:.1f} tok/s | "
              f"{row['tps_ratio']:.3f}× | {row['off']['ttft_s'] * 1000:.0f} ms | {row['on']['ttft_s'] * 1000:.0f} ms | "
              f"{row['ttft_ratio']:.3f}× |")
    print("\n| GGUF | tensor data | bound (bandwidth ÷ bytes) | edgezh decode | fraction of bound |")
    print("|---|---|---|---|---|")
    for row in results["models"]:
        print(f"| {row['kind']} | {row['tensor_bytes'] / 2**20:.0f} MiB | {row['bound_tps']:.0f} tok/s | "
              f"{row['edgezh']['decode_tps']:.1f} tok/s | {row['fraction_of_bound']:.0%} |")


if __name__ == "__main__":
    main()
