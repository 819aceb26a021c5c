"""Export benchmarks: convert (HF → GGUF), merge (vs peft), quantize — wall time and peak RSS.

    .venv/bin/python bench/bench_export.py [--work DIR] [--layers 16]

Every measured command runs in its own process under /usr/bin/time, so peak RSS is that
process's own maximum resident set. The synthetic checkpoint is Llama-3-shaped (vocabulary
128 256, GQA 4:1) with random bf16 weights written shard by shard; its LoRA adapter has peft's
file layout. Results print as a markdown table and go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def timed(cmd: list[str], label: str) -> dict:
    """Run `cmd` under /usr/bin/time; return wall seconds and peak RSS (MiB)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    wall, kib = result.stderr.strip().splitlines()[-1].split()
    return {"what": label, "wall_s": float(wall), "peak_rss_mib": int(kib) / 1024}


def make_checkpoint(folder: Path, layers: int, hidden: int = 2048, inter: int = 8192, shard_mb: int = 500) -> Path:
    """A random Llama-3-shaped bf16 checkpoint in several shards, written without holding it whole."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from edgezh import templates
    from edgezh.models.tokenizers import llama3_tokenizer

    folder.mkdir(parents=True)
    tok = llama3_tokenizer()
    tok.chat_template = templates.get("llama3").inference
    tok.save_pretrained(folder)
    heads, kv = hidden // 128, hidden // 512
    LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, rope_theta=500000.0, dtype="bfloat16",
                architectures=["LlamaForCausalLM"],
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = [("model.embed_tokens.weight", (len(tok), hidden)), ("lm_head.weight", (len(tok), hidden)),
               ("model.norm.weight", (hidden,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv * 128, hidden)),
                    (p + "self_attn.v_proj.weight", (kv * 128, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                    (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                    (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                    (p + "post_attention_layernorm.weight", (hidden,))]
    shards, current, size = [], {}, 0
    for name, shape in tensors:
        t = rand(*shape) if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
        current[name] = t
        size += t.numel() * 2
        if size >= shard_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    index = {"metadata": {"total_size": 0}, "weight_map": {}}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        for name, t in shard.items():
            index["weight_map"][name] = fname
            index["metadata"]["total_size"] += t.numel() * 2
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return folder


def make_adapter(base: Path, folder: Path, rank: int = 16) -> Path:
    """A peft-layout LoRA adapter (all linear layers) with random A and B."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    index = json.loads((base / "model.safetensors.index.json").read_text(encoding="utf-8"))
    for name, fname in index["weight_map"].items():
        if not name.startswith("model.layers.") or "norm" in name:
            continue
        with safe_open(base / fname, "pt") as f:
            out_dim, in_dim = f.get_slice(name).get_shape()
        stem = "base_model.model." + name.removesuffix(".weight")
        tensors[stem + ".lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
        tensors[stem + ".lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


PEFT_MERGE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
    merged.save_pretrained(sys.argv[3], max_shard_size="500MB")
""")


def gib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.glob("*.safetensors")]
    return sum(p.stat().st_size for p in files) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/edgezh-bench")
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import QUICKSTART, build_base

    smollm2 = build_base(QUICKSTART)
    synth = make_checkpoint(work / "synth", args.layers)
    adapter = make_adapter(synth, work / "adapter")
    largest = max(p.stat().st_size for p in synth.glob("*.safetensors")) / 2**20
    adapter_mib = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    edgezh = [PY, "-m", "edgezh.cli"]
    rows = [timed([PY, "-c", "import torch, transformers, gguf, safetensors, edgezh.export.gguf_writer"], "interpreter + imports (baseline)")]
    for out in ("synth-f16.gguf", "smollm2-f16.gguf", "synth-merged", "peft-merged"):
        subprocess.run(["rm", "-rf", str(work / out)], check=True)
    rows.append(timed([*edgezh, "convert", str(smollm2), "-o", str(work / "smollm2-f16.gguf"), "--outtype", "f16"], "convert SmolLM2 (fp32 folder) → f16 GGUF"))
    rows[-1]["input_gib"] = gib(smollm2)
    rows.append(timed([*edgezh, "convert", str(synth), "-o", str(work / "synth-f16.gguf"), "--outtype", "f16"], "convert synthetic → f16 GGUF"))
    rows[-1]["input_gib"] = gib(synth)
    rows.append(timed([*edgezh, "merge", str(synth), str(adapter), "-o", str(work / "synth-merged")], "edgezh merge (streaming)"))
    rows[-1]["input_gib"] = gib(synth)
    rows.append(timed([PY, "-c", PEFT_MERGE, str(synth), str(adapter), str(work / "peft-merged")], "peft merge_and_unload + save_pretrained"))
    rows[-1]["input_gib"] = gib(synth)
    for qtype in ("q4_k_m", "q8_0"):
        dest = work / f"synth-{qtype}.gguf"
        dest.unlink(missing_ok=True)
        rows.append(timed([*edgezh, "quantize", str(work / "synth-f16.gguf"), qtype, "-o", str(work)], f"quantize synthetic f16 → {qtype}"))
        rows[-1]["input_gib"] = gib(work / "synth-f16.gguf")
        rows[-1]["s_per_gib"] = rows[-1]["wall_s"] / rows[-1]["input_gib"]
    facts = {"cpu_count": os.cpu_count(), "synthetic_gib": gib(synth), "synthetic_shards": len(list(synth.glob("*.safetensors"))),
             "largest_shard_mib": largest, "adapter_mib": adapter_mib, "rows": rows}
    (work / "results.json").write_text(json.dumps(facts, indent=1), encoding="utf-8")
    print(f"synthetic checkpoint: {facts['synthetic_gib']:.2f} GiB bf16 in {facts['synthetic_shards']} shards "
          f"(largest {largest:.0f} MiB); adapter {adapter_mib:.0f} MiB; {os.cpu_count()} CPUs\n")
    print("| what | input GiB | wall s | peak RSS MiB | RSS / input |")
    print("|---|---|---|---|---|")
    for r in rows:
        size = r.get("input_gib")
        ratio = f"{r['peak_rss_mib'] / 1024 / size:.0%}" if size else ""
        extra = f" ({r['s_per_gib']:.1f} s/GiB)" if "s_per_gib" in r else ""
        print(f"| {r['what']} | {size:.2f} | {r['wall_s']:.1f}{extra} | {r['peak_rss_mib']:.0f} | {ratio} |" if size else
              f"| {r['what']} | | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | |")


if __name__ == "__main__":
    main()
