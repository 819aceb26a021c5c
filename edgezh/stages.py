"""The stage table: order, folder number, what enables each stage, what it reads, where its code is.

A stage module exposes `VERSION` (bump it when its outputs change for the same inputs),
`run(cfg, inputs, out) -> dict` (writes under `out`, returns facts for the manifest's `info`)
and optionally `fingerprint(cfg) -> dict` (identity of files outside the build it reads).
`module=None` marks a stage this version of edgezh does not have yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgezh.recipe import Recipe


@dataclass(frozen=True)
class StageSpec:
    name: str
    section: str  # the recipe section that configures it (for messages)
    enabled: Callable[[Recipe], bool]
    config: Callable[[Recipe], Any]  # what the stage reads from the recipe (hashed into its key)
    needs: Callable[[Recipe], list[str]]  # stages whose artifacts it reads
    module: str | None
    summary: str

    @property
    def available(self) -> bool:
        return self.module is not None


def _trained(r: Recipe) -> bool:
    return r.sft is not None or r.dpo is not None


def _weights(r: Recipe) -> list[str]:
    """The base (chat format, provenance) and, after training, the merged 16-bit weights (after continued
    pre-training alone, its model)."""
    if _trained(r):
        return ["base", "merge"]
    return ["base", "pretrain"] if r.pretrain is not None else ["base"]


def _pretrained(r: Recipe) -> list[str]:
    """The pretrain stage, when there is one: the model a training stage starts from (and its adapter folds into)."""
    return ["pretrain"] if r.pretrain is not None else []


def _imatrix(r: Recipe) -> bool:
    return r.export.gguf is not None and r.export.gguf.imatrix is not None


def _quantized(r: Recipe) -> bool:
    return r.export.gguf is not None and bool(r.export.gguf.quantize or r.export.gguf.fit)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("base", "base", lambda r: True, lambda r: r.base, lambda r: [],
              "edgezh.models.base_stage", "resolve the base model into a safetensors folder with its chat format"),
    StageSpec("data", "data", lambda r: r.data is not None, lambda r: r.data, lambda r: ["base"],
              "edgezh.data.data_stage", "read, mix, split and encode the training data"),
    StageSpec("pretrain", "pretrain", lambda r: r.pretrain is not None, lambda r: r.pretrain,
              lambda r: ["base", "data"], "edgezh.train.pretrain_stage", "continued pre-training on raw text (every token trained)"),
    StageSpec("sft", "sft", lambda r: r.sft is not None, lambda r: r.sft, lambda r: ["base", "data"] + _pretrained(r),
              "edgezh.train.sft_stage", "supervised fine-tuning (TRL; LoRA/QLoRA/full; DeepSpeed)"),
    StageSpec("dpo", "dpo", lambda r: r.dpo is not None, lambda r: r.dpo,
              lambda r: ["base", "data"] + _pretrained(r) + (["sft"] if r.sft else []), "edgezh.train.dpo_stage",
              "preference tuning (TRL DPO)"),
    StageSpec("merge", "sft/dpo", _trained, lambda r: r.merge,
              lambda r: ["base"] + _pretrained(r) + (["dpo"] if r.dpo else ["sft"]), "edgezh.export.merge_stage",
              "fold the adapter into the 16-bit model it was trained from"),
    StageSpec("gguf", "export.gguf", lambda r: r.export.gguf is not None,
              lambda r: {"outtype": r.export.gguf.outtype}, _weights, "edgezh.export.gguf_stage", "write GGUF with gguf-py"),
    StageSpec("imatrix", "export.gguf.imatrix", _imatrix, lambda r: r.export.gguf.imatrix,
              lambda r: _weights(r) + (["data"] if r.data is not None else []), "edgezh.export.imatrix_stage",
              "importance matrix from calibration text (llama.cpp's imatrix GGUF)"),
    StageSpec("quantize", "export.gguf.quantize", _quantized, lambda r: r.export.gguf,
              lambda r: ["base", "gguf"] + (["imatrix"] if _imatrix(r) else []) + (["data"] if r.data is not None and r.export.gguf.fit else []),
              "edgezh.export.quantize_stage", "quantize with llama.cpp"),
    StageSpec("gptq", "export.gptq", lambda r: r.export.gptq is not None, lambda r: r.export.gptq,
              lambda r: _weights(r) + ["data"], "edgezh.export.gptq_stage", "4-bit GPTQ with GPTQModel"),
    StageSpec("adapter", "export.adapter", lambda r: r.export.adapter is not None, lambda r: r.export.adapter,
              lambda r: ["base"] + _pretrained(r) + (["sft"] if r.sft else []) + (["dpo"] if r.dpo else []),
              "edgezh.export.adapter_stage",
              "the LoRA adapter as a GGUF (llama.cpp --lora, Ollama ADAPTER) with the base it goes on"),
    StageSpec("modelfile", "modelfile", lambda r: r.modelfile is not None, lambda r: r.modelfile,
              lambda r: ["base", "gguf"] + (["quantize"] if _quantized(r) else []) + (["adapter"] if r.export.adapter else []),
              "edgezh.export.modelfile_stage", "Ollama Modelfiles"),
    StageSpec("eval", "eval", lambda r: r.eval is not None, lambda r: r.eval,
              lambda r: [s.name for s in STAGES[:-1] if s.enabled(r)], "edgezh.eval.eval_stage", "quality report"),
)


def folder_name(name: str, stages: tuple[StageSpec, ...] = STAGES) -> str:
    """A stage's folder in its build: ``NN-name``, NN its place in the table (fixed, whether enabled or not)."""
    return f"{[s.name for s in stages].index(name) + 1:02d}-{name}"
