"""Which models a build made, and how to open each as a backend.

| variant | from | engine |
|---|---|---|
| `base` | the base stage's HF folder | transformers, float32 |
| `sft`, `dpo` | the base + the stage's LoRA adapter (peft), or its `model/` after full fine-tuning | transformers, float32 |
| the converted GGUF (`f16`, `f32`, `bf16`, `q8_0`) | the gguf stage | llama.cpp |
| each quant (`q4_k_m`, …) | the quantize stage | llama.cpp |
| `gptq` | the gptq stage's checkpoint | transformers + GPTQModel |

The merge stage's folder is not evaluated on its own: it is what the GGUF was converted from, and
it equals the last adapter on the base up to 16-bit rounding.

The reference for KL divergence is the converted GGUF when it is unquantized (F16 by default);
otherwise the last full-precision HF variant. Quantized variants: the GGUF quants (and a q8_0
converted GGUF) and the GPTQ checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from edgezh.artifacts import Artifact
from edgezh.eval.backends import GGUFBackend, HFBackend
from edgezh.models.base_stage import model_dir

UNQUANTIZED_GGUF = ("f32", "f16", "bf16")


@dataclass
class Variant:
    name: str
    engine: str  # transformers | llama.cpp
    quantized: bool
    open: Callable[[], object]
    weight_bytes: int  # estimated memory of the loaded weights (for batching)
    facts: dict = field(default_factory=dict)  # file, bytes, bits per weight…


def _safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _training_variant(name: str, artifact: Artifact, base: Path) -> Variant:
    full = artifact.path / "model"
    if artifact.info.get("method") == "full" or (full.is_dir() and not (artifact.path / "adapter").is_dir()):
        return Variant(name, "transformers", False, partial(HFBackend.load, full, name=name),
                       2 * _safetensors_bytes(full), {"folder": str(full), "method": "full", "bytes": _safetensors_bytes(full)})
    adapter = artifact.path / "adapter"
    return Variant(name, "transformers", False, partial(HFBackend.load, base, name=name, adapter=adapter),
                   2 * _safetensors_bytes(base), {"adapter": str(adapter), "method": artifact.info.get("method", "lora"),
                                                  "bytes": _safetensors_bytes(adapter)})


def discover(inputs: dict[str, Artifact], *, n_ctx: int, threads: int | None = None) -> tuple[list[Variant], str | None, list[str]]:
    """The variants of a build, the name of the KLD reference (None when nothing is quantized), notes."""
    from edgezh.export.quantize import describe

    base = model_dir(inputs["base"])
    variants = [Variant("base", "transformers", False, partial(HFBackend.load, base, name="base"),
                        2 * _safetensors_bytes(base), {"folder": str(base), "bytes": _safetensors_bytes(base)})]
    notes = []
    for stage in ("sft", "dpo"):
        if stage in inputs:
            variants.append(_training_variant(stage, inputs[stage], base))
    if "merge" in inputs:
        notes.append("the merged 16-bit weights are evaluated through the GGUF converted from them" if "gguf" in inputs
                     else "the merged 16-bit weights equal the last adapter on the base up to rounding; not evaluated again")
    if "gguf" in inputs:
        info = inputs["gguf"].info
        path = inputs["gguf"].file(info["file"])
        facts = describe(path, None)
        variants.append(Variant(info["outtype"], "llama.cpp", info["outtype"] not in UNQUANTIZED_GGUF,
                                partial(GGUFBackend, path, n_ctx=n_ctx, name=info["outtype"], threads=threads),
                                path.stat().st_size, {"file": str(path), "bytes": facts["bytes"],
                                                      "bits_per_weight": facts["bits_per_weight"]}))
    if "quantize" in inputs:
        for kind, q in inputs["quantize"].info["quants"].items():
            path = inputs["quantize"].file(q["file"])
            variants.append(Variant(kind, "llama.cpp", True, partial(GGUFBackend, path, n_ctx=n_ctx, name=kind, threads=threads),
                                    path.stat().st_size, {"file": str(path), "bytes": q["bytes"],
                                                          "bits_per_weight": q["bits_per_weight"]}))
    if "gptq" in inputs:
        folder = inputs["gptq"].path
        info = inputs["gptq"].info
        variants.append(Variant("gptq", "transformers", True, partial(HFBackend.load, folder, name="gptq", gptq=True),
                                2 * _safetensors_bytes(folder), {"folder": str(folder), "bytes": info.get("bytes"),
                                                                 "bits": info.get("bits"), "group_size": info.get("group_size")}))
    if not any(v.quantized for v in variants):
        return variants, None, notes
    gguf_ref = [v for v in variants if v.engine == "llama.cpp" and not v.quantized]
    hf_full = [v for v in variants if v.engine == "transformers" and not v.quantized]
    reference = (gguf_ref or hf_full[-1:])[0].name
    return variants, reference, notes


def batches(reference: Variant, quantized: list[Variant], budget: int) -> list[list[Variant]]:
    """Groups of quantized variants that fit in memory beside the reference (at least one each)."""
    groups: list[list[Variant]] = []
    current: list[Variant] = []
    used = reference.weight_bytes
    for v in quantized:
        if current and used + v.weight_bytes > budget:
            groups.append(current)
            current, used = [], reference.weight_bytes
        current.append(v)
        used += v.weight_bytes
    if current:
        groups.append(current)
    return groups
