"""Stage `adapter`: the last training stage's LoRA adapter as a GGUF LoRA adapter, with the base it goes on.

Writes, in the stage folder (all listed in `info.exports`, so they sit together in `builds/<name>/export/`):

| file | what |
|---|---|
| `<name>-lora-<outtype>.gguf` | the adapter (`edgezh.export.lora_gguf`): llama.cpp `--lora`, Ollama `ADAPTER` |
| `<name>-base-f16.gguf` | the model the adapter was trained on (`export.adapter.base`), converted as the gguf stage converts |
| `<name>-base-<type>.gguf` | that base quantized by llama.cpp (`export.adapter.base_quantize`, no importance matrix) |

The model the adapter was trained on is the training stage's `info.trained_from` (the base, or the
pretrain stage's model). `info.bases[kind]` = file, bytes (and bits per weight for the quants);
`info.ollama_base` the Ollama name the recipe gives instead of a base GGUF.
"""

from __future__ import annotations

from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.export import lora_gguf
from edgezh.progress import status
from edgezh.recipe import AdapterExportConfig

VERSION = "1"


def lora_file(name: str, outtype: str) -> str:
    """`<name>-lora-<outtype>.gguf`: the build's adapter GGUF."""
    return f"{name}-lora-{outtype}.gguf"


def base_file(name: str, kind: str) -> str:
    """`<name>-base-<kind>.gguf`: the build's base GGUF the adapter goes on."""
    return layout.gguf_name(f"{name}-base", kind)


def run(cfg: AdapterExportConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    from edgezh.export.gguf_writer import convert
    from edgezh.export.quantize import quantize

    name = layout.build_name(out)
    training_stage = "dpo" if "dpo" in inputs else "sft"
    training = inputs[training_stage]
    adapter = layout.adapter_dir(training)  # UserError for a full fine-tune: no adapter to export
    trained_from = training.info.get("trained_from", "base")
    base = layout.stage_model_dir(inputs, trained_from)
    template = layout.template_of(inputs)

    file = lora_file(name, cfg.outtype)
    with status(f"writing {file} (LoRA adapter GGUF, {cfg.outtype})"):
        facts = lora_gguf.convert(base, adapter, out / file, cfg.outtype, name=f"{name}-lora")
    bases: dict[str, dict] = {}
    if cfg.base:
        f16 = base_file(name, "f16")
        with status(f"writing {f16} (the base the adapter goes on)"):
            written = convert(base, out / f16, "f16", template=template, name=f"{name}-base")
        bases["f16"] = {"file": f16, "bytes": written["bytes"]}
        for kind in cfg.base_quantize:
            target = base_file(name, kind)
            with status(f"llama.cpp quantize → {target}"):
                q = quantize(out / f16, out / target, kind)
            bases[kind] = {"file": target, "bytes": q["bytes"], "bits_per_weight": q["bits_per_weight"]}
    notes = []
    if training.info.get("method") == "qlora":
        notes.append("the adapter was trained over a 4-bit (QLoRA) copy of the base; it is exported for the 16-bit base "
                     "(and quantizations of it), so base + adapter can differ slightly from the model trained")
    return {
        "file": file, "outtype": cfg.outtype, "bytes": facts["bytes"], "tensors": facts["tensors"], "pairs": facts["pairs"],
        "alpha": facts["alpha"], "ranks": facts["ranks"], "folded": facts["folded"], "modules": facts["modules"],
        "template": template, "training": training_stage, "trained_from": trained_from, "bases": bases,
        "ollama_base": cfg.ollama_base, "notes": notes, "exports": [file] + [b["file"] for b in bases.values()],
    }
