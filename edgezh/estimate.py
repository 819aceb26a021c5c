"""Rough memory and disk estimates for `edgezh build --dry-run`, from the model's shape alone.

Training memory (per GPU, bf16 mixed precision, AdamW):
- weights: 2 B/param (full, LoRA); QLoRA keeps embeddings/lm_head in bf16 and the linear
  layers in NF4 (~4.127 bits/param with double quantization);
- trainable state: 16 B per trainable param (fp32 master + grad + two Adam moments; for full
  fine-tuning the bf16 weight is counted in the 16);
- activations: 34·s·b·h bytes per layer (Korthikanti et al. 2022, memory-efficient attention),
  or 2·s·b·h per layer plus one layer's worth with gradient checkpointing;
- logits: b·s·V fp32 values and their gradient;
- ~0.75 GiB of CUDA context and allocator slack.
DPO scores chosen and rejected (2× batch); full-weight DPO also holds a frozen reference copy.
These are estimates (±30%) to choose a method and batch, not guarantees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgezh.recipe import BaseConfig, Recipe, TrainCommon

GIB = 2**30
# Bits per weight of whole llama.cpp files (Llama 3 8B, llama.cpp's quantize documentation).
GGUF_BPW = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.55, "q4_1": 5.0, "q5_0": 5.5,
            "q5_1": 6.0, "q2_k": 3.35, "q3_k_s": 3.5, "q3_k_m": 3.91, "q3_k_l": 4.27, "q4_k_s": 4.58,
            "q4_k_m": 4.89, "q5_k_s": 5.54, "q5_k_m": 5.7, "q6_k": 6.56,
            # llama-quantize's nominal figures for the rest (its QUANT_OPTIONS table)
            "q2_k_s": 3.2, "iq4_xs": 4.25, "iq4_nl": 4.5, "iq3_m": 3.66, "iq3_s": 3.44, "iq3_xs": 3.3,
            "iq3_xxs": 3.06, "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.31, "iq2_xxs": 2.06, "iq1_m": 1.75, "iq1_s": 1.56}
LLAMA3_VOCAB = 128256


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def linear_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return self.layers * (2 * h * h + 2 * h * self.kv_dim + 3 * h * i)

    @property
    def params(self) -> int:
        return self.embed_params + self.linear_params + (2 * self.layers + 1) * self.hidden

    def lora_params(self, rank: int, targets) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        sizes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = sizes if targets == "all-linear" else [t for t in targets if t in sizes]
        return self.layers * rank * sum(sum(sizes[n]) for n in names)


def _from_hf(config: dict) -> Shape:
    text = config.get("text_config", config)
    return Shape(text["vocab_size"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
                 text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"],
                 bool(text.get("tie_word_embeddings", False)))


def _from_gguf(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        return reader.fields[key].contents()

    arch = value("general.architecture")
    return Shape(len(reader.fields["tokenizer.ggml.tokens"].data), value(f"{arch}.embedding_length"),
                 value(f"{arch}.feed_forward_length"), value(f"{arch}.block_count"),
                 value(f"{arch}.attention.head_count"), value(f"{arch}.attention.head_count_kv"),
                 "output.weight" not in {t.name for t in reader.tensors})


def model_shape(base: BaseConfig) -> Shape | None:
    """The base model's shape without loading weights; None when it cannot be known offline."""
    from edgezh.models import resolve

    if base.init is not None:
        i = base.init
        return Shape(LLAMA3_VOCAB if base.tokenizer == "llama3" else 0, i.hidden_size, i.intermediate_size,
                     i.num_hidden_layers, i.num_attention_heads, i.num_key_value_heads, i.tie_word_embeddings)
    if base.path is not None:
        source = resolve.local_source(base.path)
        if source.is_file():
            return _from_gguf(source)
        return _from_hf(json.loads((source / "config.json").read_text(encoding="utf-8")))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base.hub, "config.json", revision=base.revision)
    except Exception:  # noqa: BLE001 — an estimate never fails the dry run
        return None
    return _from_hf(json.loads(Path(cached).read_text(encoding="utf-8"))) if isinstance(cached, str) else None


def training_gib(shape: Shape, train: TrainCommon, method: str, seq_len: int, dpo: bool = False) -> float:
    """Estimated peak GPU memory (GiB) of one training process."""
    batch = train.batch_size * (2 if dpo else 1)
    if method == "full":
        weights, trainable = 0, shape.params
        if dpo:
            weights += 2 * shape.params  # frozen reference model
    else:
        trainable = shape.lora_params(train.lora.rank, train.lora.target_modules)
        if method == "qlora":
            weights = 2 * shape.embed_params + shape.linear_params * 4.127 / 8
        else:
            weights = 2 * shape.params
    state = 16 * trainable
    per_layer = 34 * seq_len * batch * shape.hidden
    if train.gradient_checkpointing:
        acts = shape.layers * 2 * seq_len * batch * shape.hidden + per_layer
    else:
        acts = shape.layers * per_layer
    logits = 2 * 4 * batch * seq_len * shape.vocab
    return (weights + state + acts + logits) / GIB + 0.75


def training_table(recipe: Recipe, shape: Shape) -> list[tuple[str, str, float, float, float]]:
    """Rows (stage, chosen method, full GiB, LoRA GiB, QLoRA GiB) for each training stage."""
    rows = []
    for name, section in (("sft", recipe.sft), ("dpo", recipe.dpo)):
        if section is None:
            continue
        seq = section.max_length or (recipe.data.max_length if recipe.data else 2048)
        rows.append((name, section.method, *(training_gib(shape, section, m, seq, dpo=name == "dpo")
                                             for m in ("full", "lora", "qlora"))))
    return rows


def disk_table(recipe: Recipe, shape: Shape) -> list[tuple[str, float]]:
    """Rows (output, GiB) of the big files a build writes."""
    p = shape.params
    rows = []
    if recipe.base.init is not None or (recipe.base.path or "").endswith(".gguf") or recipe.base.dtype != "auto":
        rows.append(("base (safetensors)", p * (2 if recipe.base.dtype in ("bfloat16", "float16") else 4) / GIB))
    if recipe.sft or recipe.dpo:
        rows.append(("merged (safetensors, 16-bit)", 2 * p / GIB))
    gguf = recipe.export.gguf
    if gguf is not None:
        for kind in [gguf.outtype, *gguf.quantize]:
            rows.append((f"{recipe.name}-{kind}.gguf", p * GGUF_BPW[kind] / 8 / GIB))
    if recipe.export.gptq is not None:
        bits = recipe.export.gptq.bits
        rows.append((f"gptq {bits}-bit", (2 * shape.embed_params + shape.linear_params * (bits + 0.25) / 8) / GIB))
    return rows
