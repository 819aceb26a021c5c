"""Which models a build made, and how to open each as a backend.

| variant | from | engine |
|---|---|---|
| `base` | the base stage's HF folder | transformers, float32 |
| `pretrain` | the pretrain stage's `model/` (continued pre-training, the adapter folded in) | transformers, float32 |
| `sft`, `dpo` | the model the stage trained (`info.trained_from`: the base or `pretrain`) + its LoRA adapter (peft), or its `model/` after full fine-tuning | transformers, float32 |
| the converted GGUF (`f16`, `f32`, `bf16`, `q8_0`) | the gguf stage | llama.cpp |
| each quant (`q4_k_m`, …) | the quantize stage | llama.cpp |
| `gptq` | the gptq stage's checkpoint | transformers + GPTQModel |
| `base-<kind>+lora` | each base GGUF of the adapter stage with its LoRA adapter GGUF on it | llama.cpp (`--lora`) |

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
from edgezh import layout
from edgezh.layout import model_dir

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
    if "pretrain" in inputs:
        folder = layout.pretrained_dir(inputs["pretrain"])
        variants.append(Variant("pretrain", "transformers", False, partial(HFBackend.load, folder, name="pretrain"),
                                2 * _safetensors_bytes(folder), {"folder": str(folder), "bytes": _safetensors_bytes(folder)}))
    for stage in ("sft", "dpo"):
        if stage in inputs:
            trained = layout.stage_model_dir(inputs, inputs[stage].info.get("trained_from", "base"))
            variants.append(_training_variant(stage, inputs[stage], trained))
    if "merge" in inputs:
        notes.append("the merged 16-bit weights are evaluated through the GGUF converted from them" if "gguf" in inputs
                     else "the merged 16-bit weights equal the last adapter on the model it was trained from up to rounding; "
                     "not evaluated again")
    if "gguf" in inputs:
        info = inputs["gguf"].info
        path = inputs["gguf"].file(info["file"])
        facts = describe(path, None)
        variants.append(Variant(info["outtype"], "llama.cpp", info["outtype"] not in UNQUANTIZED_GGUF,
                                partial(GGUFBackend, path, n_ctx=n_ctx, name=info["outtype"], threads=threads),
                                path.stat().st_size, {"file": str(path), "bytes": facts["bytes"],
                                                      "bits_per_weight": facts["bits_per_weight"]}))
    if "quantize" in inputs:
        for kind, q in layout.quants(inputs["quantize"].info).items():
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
    if "adapter" in inputs:
        variants += adapter_variants(inputs["adapter"], n_ctx=n_ctx, threads=threads)
    if not any(v.quantized for v in variants):
        return variants, None, notes
    gguf_ref = [v for v in variants if v.engine == "llama.cpp" and not v.quantized]
    hf_full = [v for v in variants if v.engine == "transformers" and not v.quantized]
    reference = (gguf_ref or hf_full[-1:])[0].name
    return variants, reference, notes


ADAPTER_GROUP = "base + LoRA adapter"


def adapter_variants(artifact: Artifact, *, n_ctx: int, threads: int | None = None) -> list[Variant]:
    """Base + adapter in llama.cpp, one per base GGUF the adapter stage wrote (`base-f16+lora`, `base-q4_k_m+lora`).
    They are compared with the reference in lockstep, as the quants are: how close the shipped pair comes to the
    merged model. Their size is what a user downloads: the base and the adapter."""
    info = artifact.info
    adapter = artifact.file(info["file"])
    found = []
    for kind, base in (info.get("bases") or {}).items():
        path, name = artifact.file(base["file"]), f"base-{kind}+lora"
        found.append(Variant(name, "llama.cpp", True,
                             partial(GGUFBackend, path, n_ctx=n_ctx, name=name, threads=threads, adapters=[(adapter, 1.0)]),
                             path.stat().st_size + adapter.stat().st_size,
                             {"file": str(path), "adapter_file": str(adapter), "base_kind": kind, "group": ADAPTER_GROUP,
                              "bytes": base["bytes"] + info["bytes"], "bits_per_weight": base.get("bits_per_weight")}))
    return found


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


# ------------------------------------------------------------------ GGUF files from anywhere (`edgezh eval`)

IMATRIX_KEY = "quantize.imatrix.file"  # llama.cpp's quantizer writes it into a GGUF quantized with an imatrix


def gguf_group(path: Path) -> str:
    """`imatrix` when the GGUF was quantized with an importance matrix (its header says so), else `plain`."""
    from edgezh.gguf_meta import read_metadata

    return "imatrix" if IMATRIX_KEY in read_metadata(path, [IMATRIX_KEY]) else "plain"


def annotate_groups(variants: list[Variant]) -> None:
    """Give every quantized GGUF variant a `group` fact (kept when one is already there)."""
    for v in variants:
        if v.engine == "llama.cpp" and v.quantized and v.facts.get("file"):
            v.facts.setdefault("group", gguf_group(Path(v.facts["file"])))


def gguf_variant(path: Path, name: str, *, n_ctx: int, quantized: bool, threads: int | None = None) -> Variant:
    """A GGUF file as a variant: its size, bits per weight and (quantized) its group, all from the file."""
    from edgezh.export.quantize import describe

    v = Variant(name, "llama.cpp", quantized, partial(GGUFBackend, path, n_ctx=n_ctx, name=name, threads=threads),
                path.stat().st_size, {"file": str(path), "bytes": path.stat().st_size,
                                      "bits_per_weight": describe(path)["bits_per_weight"]})
    if quantized:
        v.facts["group"] = gguf_group(path)
    return v
