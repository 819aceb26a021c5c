"""Scale benchmark: an 8B-shaped checkpoint through merge + convert + imatrix + q4_k_m with the imatrix.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_scale.py [--layers 32] [--hidden 4096] [--ffn 14336]
        [--heads 32] [--kv-heads 8] [--shard-mb 2000] [--chunks 4] [--chunk-size 512] [--work DIR] [--keep]

The defaults are Llama 3 8B's shape (hidden 4096, 32 layers, FFN 14 336, 32 heads of which 8 KV,
vocabulary 128 256 from Meta's real tokenizer, untied head, bf16): ~16 GB of random weights, written
shard by shard (one shard in memory). A random peft LoRA adapter (rank 8 on q/k/v/o/gate/up/down)
goes with it. Every step runs in its own process; its wall time, its peak RSS (the kernel's
`ru_maxrss` of that process, from wait4) and its peak anonymous / file-backed RSS (sampled from
/proc/PID/status every 0.2 s: llama.cpp maps its input, and mapped file pages count in RSS) are
recorded in WORK/results.json and printed as a markdown table.

Steps: generate the base, generate the adapter, `edgezh merge`, `edgezh convert` (f16), the imatrix
(`edgezh.export.imatrix.collect(..., stream=True)` over People's Daily, then `write_gguf`), and
`edgezh.export.quantize.quantize(..., "q4_k_m", imatrix=...)`. To spare a shared disk, unless
`--keep` each big file is deleted as soon as no later step reads it (the base after the merge, the
merged folder after the imatrix, the GGUFs at the end); the imatrix file and results.json stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))


# --- the steps a child process runs ----------------------------------------------------------------


def gen_base(folder: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, shard_mb: int) -> dict:
    """A random Llama-3-shaped bf16 checkpoint with Meta's tokenizer, written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from edgezh import templates
    from edgezh.models.tokenizers import llama3_tokenizer

    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    tok = llama3_tokenizer()
    tok.chat_template = templates.get("llama3").inference
    tok.save_pretrained(part)
    vocab, head_dim = len(tok), hidden // heads
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16",
                architectures=["LlamaForCausalLM"], bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id).save_pretrained(part)
    gen = torch.Generator().manual_seed(0)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (ffn, hidden)), (p + "mlp.up_proj.weight", (ffn, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, ffn))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    # group into shards of about shard_mb (a tensor never split), then write each shard and drop it
    groups, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_mb * 2**20:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            if len(shape) == 1:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # std 0.02 (HF's initializer_range): activations stay well inside bf16/f16 range over 32 layers
                t = shard[name] = torch.empty(shape, dtype=torch.bfloat16)
                step = max(1, 2**23 // shape[1])  # rows per block: 32 MiB of float32 temporaries
                for first in range(0, shape[0], step):
                    block = torch.randn((min(step, shape[0] - first), shape[1]), generator=gen)
                    t[first:first + block.shape[0]] = block.mul_(0.02)
            index["weight_map"][name] = fname
            index["metadata"]["total_size"] += shard[name].numel() * 2
        save_file(shard, part / fname, metadata={"format": "pt"})
        del shard
    (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    part.rename(folder)
    return {"shards": len(groups), "bytes": index["metadata"]["total_size"], "vocab": vocab}


def gen_adapter(base: Path, folder: Path, rank: int) -> dict:
    """A peft-layout LoRA adapter (rank `rank` on q/k/v/o/gate/up/down) with random A and B (float32)."""
    import torch
    from safetensors.torch import save_file

    from edgezh.models.resolve import check_safetensors

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        for name, info in sorted(check_safetensors(shard).items()):
            if not name.startswith("model.layers.") or name.split(".")[-2] not in targets:
                continue
            out_dim, in_dim = info["shape"]
            stem = "base_model.model." + name.removesuffix(".weight")
            tensors[stem + ".lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
            tensors[stem + ".lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": targets, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return {"tensors": len(tensors)}


def run_imatrix(model: Path, out: Path, chunks: int, chunk_size: int) -> dict:
    """The imatrix stage's collection, streaming, over `chunks` × `chunk_size` tokens of People's Daily."""
    from transformers import AutoTokenizer

    from edgezh.data.corpora import peoples_daily
    from edgezh.export import imatrix

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(peoples_daily(max_chars=chunks * chunk_size * 4), add_special_tokens=False)["input_ids"]
    calib = imatrix.token_chunks(ids, chunk_size, bos_id=tok.bos_token_id, max_tokens=chunks * (chunk_size - 1))
    if len(calib) < chunks:
        raise SystemExit(f"People's Daily gave {len(ids)} tokens, fewer than {chunks} chunks of {chunk_size}")
    _, full_dtype = imatrix._pick_device_dtype(model, None, None)  # what a whole-model load would use
    auto = imatrix.should_stream(model, full_dtype)
    started = time.time()
    layer_times = []

    def on_layer(done: int, total: int) -> None:
        layer_times.append(time.time() - started)
        print(f"layer {done}/{total} at {layer_times[-1]:.1f} s", flush=True)

    data = imatrix.collect(model, calib, stream=True, datasets=["peoples-daily"], layer_progress=on_layer)
    imatrix.write_gguf(out, data)
    return {"chunks": data.chunk_count, "chunk_size": data.chunk_size, "entries": len(data),
            "auto_would_stream": auto, "available_gib": imatrix.available_memory() / 2**30,
            "first_layer_s": layer_times[0] if layer_times else None}


def run_quantize(src: Path, dst: Path, imatrix_file: Path, threads: int) -> dict:
    from edgezh.export import imatrix
    from edgezh.export.quantize import quantize

    info = quantize(src, dst, "q4_k_m", threads=threads, **imatrix.quantize_args(imatrix_file))
    return {"bytes": info["bytes"], "bits_per_weight": info["bits_per_weight"], "imatrix": info.get("imatrix"),
            "fallback": len(info["fallback"])}


STEPS = {"gen-base": gen_base, "gen-adapter": gen_adapter, "imatrix": run_imatrix, "quantize": run_quantize}


# --- measuring -----------------------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def measure(cmd: list[str], label: str, log: Path) -> dict:
    """Run `cmd` (cwd: the repository); wall seconds, peak RSS (ru_maxrss), sampled peak anon/file RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    print(f"… {label}", flush=True)
    with open(log, "w") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = {"RssAnon": 0, "RssFile": 0}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = _status_kib(proc.pid)
            for key in peak:
                peak[key] = max(peak[key], now.get(key, 0))
            time.sleep(0.2)
        wall = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"{label} failed (exit {code}); its output, {log}:\n" + log.read_text()[-4000:])
    row = {"what": label, "wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
           "peak_anon_mib": round(peak["RssAnon"] / 1024), "peak_file_mib": round(peak["RssFile"] / 1024)}
    print(f"  {row['wall_s']} s, peak RSS {row['peak_rss_mib']} MiB (anon {row['peak_anon_mib']}, "
          f"file {row['peak_file_mib']})", flush=True)
    return row


def child(step: str, work: Path, **kwargs) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "--step", step, "--work", str(work), "--kwargs", json.dumps(kwargs)]


def size_gib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**30
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**30


def machine() -> dict:
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                mem[key] = round(int(value.split()[0]) / 2**20, 1)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": model, "mem_total_gib": mem.get("MemTotal"),
            "mem_available_gib_at_start": mem.get("MemAvailable"), "load_average_at_start": os.getloadavg(),
            "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "safetensors", "gguf", "llama_cpp_python")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench-scale"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 128)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, merged folder and GGUFs")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if args.step:  # a child process: run one step, write its facts beside the log
        kwargs = json.loads(args.kwargs)
        kwargs = {k: Path(v) if isinstance(v, str) and "/" in v else v for k, v in kwargs.items()}
        facts = STEPS[args.step](**kwargs)
        (work / f"{args.step}.json").write_text(json.dumps(facts, indent=1, default=str), encoding="utf-8")
        return

    heads = args.heads or args.hidden // 128
    shape = {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": heads, "kv_heads": args.kv_heads}
    work.mkdir(parents=True, exist_ok=True)
    params = 2 * 128256 * args.hidden + args.layers * (
        args.hidden * args.hidden * 2 + 2 * args.kv_heads * (args.hidden // heads) * args.hidden + 3 * args.hidden * args.ffn)
    need = params * 2 * 2.35 + 2**30  # base + merged + f16 at the peak (base gone by convert when not --keep) + q4
    if args.keep:
        need = params * 2 * 3.35 + 2**30
    free = shutil.disk_usage(work).free
    print(f"shape {shape}: {params / 1e9:.2f} B parameters, {params * 2 / 2**30:.1f} GiB bf16; "
          f"disk free {free / 2**30:.0f} GiB, this run needs ~{need / 2**30:.0f} GiB", flush=True)
    if free < need:
        raise SystemExit(f"not enough disk under {work}: {free / 2**30:.0f} GiB free, ~{need / 2**30:.0f} GiB needed; "
                         "try fewer --layers")
    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    f16, imat, q4 = work / "merged-f16.gguf", work / "merged.imatrix.gguf", work / "merged-q4_k_m.gguf"
    for path in (merged, f16, imat, q4, adapter):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    facts = {"shape": shape, "params": params, "machine": machine(), "versions": versions(), "rows": []}
    rows = facts["rows"]
    edgezh = [PY, "-m", "edgezh.cli"]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    if not (base / "config.json").is_file():
        rows.append(measure(child("gen-base", work, folder=str(base), layers=args.layers, hidden=args.hidden,
                                  ffn=args.ffn, heads=heads, kv_heads=args.kv_heads, shard_mb=args.shard_mb),
                            "generate the random bf16 checkpoint", logs / "gen-base.log"))
        rows[-1].update(output_gib=size_gib(base), **json.loads((work / "gen-base.json").read_text()))
    facts["base_gib"] = size_gib(base)
    facts["base_shards"] = len(list(base.glob("*.safetensors")))
    facts["largest_shard_mib"] = max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    rows.append(measure(child("gen-adapter", work, base=str(base), folder=str(adapter), rank=args.rank),
                        f"generate the LoRA adapter (rank {args.rank})", logs / "gen-adapter.log"))
    facts["adapter_mib"] = (adapter / "adapter_model.safetensors").stat().st_size / 2**20

    rows.append(measure([*edgezh, "merge", str(base), str(adapter), "-o", str(merged)], "edgezh merge", logs / "merge.log"))
    rows[-1].update(input_gib=size_gib(base), output_gib=size_gib(merged))
    if not args.keep:
        shutil.rmtree(base)
    rows.append(measure([*edgezh, "convert", str(merged), "-o", str(f16), "--outtype", "f16"], "edgezh convert → f16 GGUF",
                        logs / "convert.log"))
    rows[-1].update(input_gib=size_gib(merged), output_gib=size_gib(f16))
    rows.append(measure(child("imatrix", work, model=str(merged), out=str(imat), chunks=args.chunks,
                              chunk_size=args.chunk_size),
                        f"imatrix, streaming ({args.chunks} × {args.chunk_size} tokens)", logs / "imatrix.log"))
    rows[-1].update(input_gib=size_gib(merged), **json.loads((work / "imatrix.json").read_text()))
    if not args.keep:
        shutil.rmtree(merged)
    rows.append(measure(child("quantize", work, src=str(f16), dst=str(q4), imatrix_file=str(imat), threads=args.threads),
                        "quantize f16 → q4_k_m with the imatrix", logs / "quantize.log"))
    rows[-1].update(input_gib=size_gib(f16), output_gib=size_gib(q4), **json.loads((work / "quantize.json").read_text()))
    if not args.keep:
        f16.unlink()
        q4.unlink()

    (work / "results.json").write_text(json.dumps(facts, indent=1, default=str), encoding="utf-8")
    m = facts["machine"]
    print(f"\n{params / 1e9:.2f} B parameters ({shape}), {facts['base_gib']:.2f} GiB bf16 in {facts['base_shards']} "
          f"shards (largest {facts['largest_shard_mib']:.0f} MiB); adapter {facts['adapter_mib']:.0f} MiB; "
          f"{m['cpus']} CPUs, {m['mem_total_gib']} GiB RAM ({m['mem_available_gib_at_start']} available at start)\n")
    print("| step | input GiB | output GiB | wall s | peak RSS MiB | peak anon / file-backed MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "" for k in ("input_gib", "output_gib")]
        print(f"| {r['what']} | {cells[0]} | {cells[1]} | {r['wall_s']:.1f} | {r['peak_rss_mib']} | "
              f"{r['peak_anon_mib']} / {r['peak_file_mib']} |")


if __name__ == "__main__":
    main()
