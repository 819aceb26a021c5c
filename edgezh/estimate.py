"""Rough memory and disk estimates for `edgezh build --dry-run`, from the model's shape alone.

Training memory (per GPU, bf16 mixed precision, AdamW):
- weights: 2 B/param (full, LoRA); QLoRA keeps embeddings/lm_head in bf16 and the linear
  layers in NF4 (~4.127 bits/param with double quantization);
- trainable state: 16 B per trainable param (fp32 master + grad + two Adam moments; for full
  fine-tuning the bf16 weight is counted in the 16; LoRA trains the adapter and the `modules_to_save`
  copies, e.g. continued pre-training's embedding and head);
- activations: 34·s·b·h bytes per layer (Korthikanti et al. 2022, memory-efficient attention),
  or 2·s·b·h per layer plus one layer's worth with gradient checkpointing;
- logits: b·s·V fp32 values and their gradient;
- ~0.75 GiB of CUDA context and allocator slack.
DPO scores chosen and rejected (2× batch); full-weight DPO also holds a frozen reference copy.

Running an exported GGUF (f16 KV cache, 512-token micro-batches, without flash attention — the larger case),
at the Modelfile's `num_ctx` (4096 without a modelfile section): the file's bytes, the KV cache
(`edgezh.sizes.kv_cache_bytes`) and a compute buffer of 4·512·max(V, heads·ctx) bytes (the logits of one
micro-batch, or its attention scores when those are larger; llama.cpp reported 252 MiB for the tiny Llama 3
and 99 / 166 MiB for SmolLM2 at 2048 / 8192 tokens, against 250 / 96 / 144 MiB from the formula).

Disk: a GGUF's size is its bits per weight (whole-file figures, `GGUF_BPW`) times the parameters; a `fit` mix
is at most its budget. A hub base is downloaded to the hub cache in bf16.

The shape comes from the model's own config (a local folder, a GGUF, `base.init`, the hub cache) or, for a
Meta Llama 3 family hub id with nothing cached, from its published shape (`edgezh.models.published`);
`Shape.source` says which. These are estimates (±30%) to choose a method, a batch and a quant, not guarantees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgezh.layout import FIT_KIND, gguf_name, plain_kind
from edgezh.recipe import BaseConfig, Recipe, TrainCommon
from edgezh.sizes import kv_cache_bytes, parse_size, target_budget

GIB = 2**30
# Bits per weight of whole llama.cpp files (Llama 3 8B, llama.cpp's quantize documentation).
GGUF_BPW = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q4_0": 4.55, "q4_1": 5.0, "q5_0": 5.5,
            "q5_1": 6.0, "q2_k": 3.35, "q3_k_s": 3.5, "q3_k_m": 3.91, "q3_k_l": 4.27, "q4_k_s": 4.58,
            "q4_k_m": 4.89, "q5_k_s": 5.54, "q5_k_m": 5.7, "q6_k": 6.56,
            # llama-quantize's nominal figures for the rest (its QUANT_OPTIONS table)
            "q2_k_s": 3.2, "iq4_xs": 4.25, "iq4_nl": 4.5, "iq3_m": 3.66, "iq3_s": 3.44, "iq3_xs": 3.3,
            "iq3_xxs": 3.06, "iq2_m": 2.7, "iq2_s": 2.5, "iq2_xs": 2.31, "iq2_xxs": 2.06, "iq1_m": 1.75, "iq1_s": 1.56}
LLAMA3_VOCAB = 128256
UBATCH = 512  # llama.cpp's default micro-batch
RUN_CTX = 4096  # context assumed for running a GGUF when the recipe has no modelfile section


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    source: str = ""
    """Where the shape was read, for the person reading the plan ("from the published shape of …")."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.kv_heads

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

    def saved_params(self, modules) -> int:
        """Parameters of the `modules_to_save` copies of the embedding and the head (one shared copy when tied)."""
        copies = sum(1 for m in ("embed_tokens", "lm_head") if m in modules)
        return self.vocab * self.hidden * (min(copies, 1) if self.tied else copies)

    def lora_params(self, rank: int, targets) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        sizes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = sizes if targets == "all-linear" else [t for t in targets if t in sizes]
        return self.layers * rank * sum(sum(sizes[n]) for n in names)


def _from_hf(config: dict, source: str = "") -> Shape:
    text = config.get("text_config", config)
    return Shape(text["vocab_size"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
                 text["num_attention_heads"], text.get("num_key_value_heads") or text["num_attention_heads"],
                 bool(text.get("tie_word_embeddings", False)), source)


def _from_gguf(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        return reader.fields[key].contents()

    arch = value("general.architecture")
    return Shape(len(reader.fields["tokenizer.ggml.tokens"].data), value(f"{arch}.embedding_length"),
                 value(f"{arch}.feed_forward_length"), value(f"{arch}.block_count"),
                 value(f"{arch}.attention.head_count"), value(f"{arch}.attention.head_count_kv"),
                 "output.weight" not in {t.name for t in reader.tensors}, f"from {path.name}'s header")


def model_shape(base: BaseConfig) -> Shape | None:
    """The base model's shape without loading weights; None when it cannot be known offline."""
    from edgezh.models import published, resolve

    if base.init is not None:
        i = base.init
        return Shape(LLAMA3_VOCAB if base.tokenizer == "llama3" else 0, i.hidden_size, i.intermediate_size,
                     i.num_hidden_layers, i.num_attention_heads, i.num_key_value_heads, i.tie_word_embeddings,
                     "from base.init")
    if base.path is not None:
        source = resolve.local_source(base.path)
        if source.is_file():
            return _from_gguf(source)
        return _from_hf(json.loads((source / "config.json").read_text(encoding="utf-8")), f"from {source / 'config.json'}")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base.hub, "config.json", revision=base.revision)
    except Exception:  # noqa: BLE001 — an estimate never fails the dry run
        cached = None
    if isinstance(cached, str):
        return _from_hf(json.loads(Path(cached).read_text(encoding="utf-8")), f"from {base.hub}'s config.json in the hub cache")
    shape = published.lookup(base.hub)
    if shape is None:
        return None
    return _from_hf(shape.config(), f"from the published shape of {shape.name} ({base.hub}; nothing cached)")


def training_gib(shape: Shape, train: TrainCommon, method: str, seq_len: int, dpo: bool = False) -> float:
    """Estimated peak GPU memory (GiB) of one training process."""
    batch = train.batch_size * (2 if dpo else 1)
    if method == "full":
        weights, trainable = 0, shape.params
        if dpo:
            weights += 2 * shape.params  # frozen reference model
    else:
        trainable = shape.lora_params(train.lora.rank, train.lora.target_modules) + shape.saved_params(train.lora.modules_to_save)
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
    for name, section in (("pretrain", recipe.pretrain), ("sft", recipe.sft), ("dpo", recipe.dpo)):
        if section is None:
            continue
        seq = section.max_length or (recipe.data.max_length if recipe.data else 2048)
        rows.append((name, section.method, *(training_gib(shape, section, m, seq, dpo=name == "dpo")
                                             for m in ("full", "lora", "qlora"))))
    return rows


def _gguf_kinds(recipe: Recipe) -> list[str]:
    """Every GGUF type a build writes: the converted file, each quant, the plain twins."""
    gguf = recipe.export.gguf
    if gguf is None:
        return []
    return [gguf.outtype, *gguf.quantize, *(plain_kind(kind) for kind in gguf.plain)]


def _gguf_bytes(recipe: Recipe, shape: Shape, kind: str) -> float:
    return shape.params * GGUF_BPW[kind.removesuffix("-plain")] / 8


def _fit_budget(recipe: Recipe, shape: Shape) -> int:
    """The largest file `export.gguf.fit` may choose (its budget, or the target machine's)."""
    fit = recipe.export.gguf.fit
    if fit.budget is not None:
        return parse_size(fit.budget)
    return target_budget(fit.target, layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                         ctx=fit.ctx)["budget"]


def disk_table(recipe: Recipe, shape: Shape) -> list[tuple[str, float]]:
    """Rows (output, GiB) of the big files a build writes (and the hub download it needs)."""
    p = shape.params
    rows = []
    if recipe.base.hub is not None:
        rows.append(("base download (hub cache, bf16)", 2 * p / GIB))
    if recipe.base.init is not None or (recipe.base.path or "").endswith(".gguf") or recipe.base.dtype != "auto":
        rows.append(("base (safetensors)", p * (2 if recipe.base.dtype in ("bfloat16", "float16") else 4) / GIB))
    if recipe.pretrain is not None:
        full = recipe.pretrain.method == "full"  # a full fine-tune saves its fp32 weights; LoRA keeps the base's dtype
        fp32_base = recipe.base.init is not None or (recipe.base.path or "").endswith(".gguf")  # as the base row
        wide = full or (recipe.base.dtype in ("auto", "float32") and fp32_base)
        rows.append((f"pretrained model (safetensors, {'fp32' if wide else '16-bit'})", (4 if wide else 2) * p / GIB))
        if not full and recipe.pretrain.lora.modules_to_save:
            rows.append(("pretrain adapter (fp32 embedding/head copies)", 4 * shape.saved_params(recipe.pretrain.lora.modules_to_save) / GIB))
    if recipe.sft or recipe.dpo:
        rows.append(("merged (safetensors, 16-bit)", 2 * p / GIB))
    for kind in _gguf_kinds(recipe):
        rows.append((gguf_name(recipe.name, kind), _gguf_bytes(recipe, shape, kind) / GIB))
    if recipe.export.gguf is not None and recipe.export.gguf.fit is not None:
        rows.append((f"{gguf_name(recipe.name, FIT_KIND)} (at most)", max(_fit_budget(recipe, shape), 0) / GIB))
    if recipe.export.gptq is not None:
        bits = recipe.export.gptq.bits
        rows.append((f"gptq {bits}-bit", (2 * shape.embed_params + shape.linear_params * (bits + 0.25) / 8) / GIB))
    return rows


def run_gib(shape: Shape, file_bytes: float, ctx: int) -> tuple[float, float, float]:
    """(weights, KV cache, total) GiB to run a GGUF of `file_bytes` with llama.cpp at `ctx` tokens."""
    kv = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, ctx)
    compute = 4 * UBATCH * max(shape.vocab, shape.heads * ctx)
    return file_bytes / GIB, kv / GIB, (file_bytes + kv + compute) / GIB


def run_table(recipe: Recipe, shape: Shape) -> tuple[int, list[tuple[str, float, float, float]]]:
    """The context, and rows (GGUF, weights GiB, KV GiB, total GiB) of memory to run each exported GGUF."""
    ctx = recipe.modelfile.num_ctx if recipe.modelfile is not None else RUN_CTX
    rows = [(gguf_name(recipe.name, kind), *run_gib(shape, _gguf_bytes(recipe, shape, kind), ctx))
            for kind in _gguf_kinds(recipe) if not kind.endswith("-plain")]
    if recipe.export.gguf is not None and recipe.export.gguf.fit is not None:
        rows.append((gguf_name(recipe.name, FIT_KIND), *run_gib(shape, max(_fit_budget(recipe, shape), 0), ctx)))
    return ctx, rows


def report(recipe: Recipe) -> list:
    """What `--dry-run` prints under the plan: the shape line and the memory and disk tables (rich renderables)."""
    from rich.table import Table

    try:
        shape = model_shape(recipe.base)
    except (OSError, ValueError, KeyError) as exc:
        return [f"[dim]no estimates: cannot read the base model's shape ({exc})[/]"]
    if shape is None:
        return [f"[dim]no estimates: {recipe.base.hub} has no config.json in the hub cache and is not a Meta Llama 3 "
                "family id with a published shape (download it once, or give base.path)[/]"]
    out: list = [f"base model: ~{shape.params / 1e9:.3f} B parameters, {shape.layers} layers × {shape.hidden}, "
                 f"vocabulary {shape.vocab} [dim]({shape.source})[/]"]
    training = training_table(recipe, shape)
    if training:
        t = Table(title="GPU memory per training process (estimate, GiB)")
        for column in ("stage", "method", "full", "LoRA", "QLoRA"):
            t.add_column(column)
        for name, method, *gib in training:
            t.add_row(name, method, *(f"{g:.1f}" for g in gib))
        out.append(t)
    ctx, running = run_table(recipe, shape)
    if running:
        t = Table(title=f"memory to run each GGUF with llama.cpp at {ctx} tokens (GPU or RAM, estimate, GiB)")
        for column in ("GGUF", "weights", "KV cache", "total"):
            t.add_column(column)
        for name, *gib in running:
            t.add_row(name, *(f"{g:.2f}" for g in gib))
        out.append(t)
    disk = disk_table(recipe, shape)
    if disk:
        t = Table(title="disk for the outputs (estimate)")
        t.add_column("output")
        t.add_column("GiB")
        for name, gib in disk:
            t.add_row(name, f"{gib:.2f}")
        t.add_row("[bold]total[/]", f"{sum(g for _, g in disk):.2f}")
        out.append(t)
    return out
