"""Stage `merge`: fold the last training stage's LoRA adapter into the 16-bit model it was trained from.

That model is named by the training stage's manifest (`info.trained_from`): the base, or the pretrain
stage's `model/` after continued pre-training (older manifests without it: the base)."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export.merge import merge
from edgezh.layout import adapter_dir, full_model_dir, stage_model_dir
from edgezh.recipe import MergeConfig

VERSION = "2"  # 2: the training's context overrides reach the merged config


def run(cfg: MergeConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    training = inputs["dpo"] if "dpo" in inputs else inputs["sft"]
    if training.info.get("method") == "full":
        # Full fine-tuning already wrote a whole model: nothing to fold in, reference it.
        (out / "source.json").write_text(f'{{"path": "{full_model_dir(training)}"}}\n', encoding="utf-8")
        return {"model_path": str(full_model_dir(training)), "note": "full fine-tune: no adapter to merge"}
    trained = stage_model_dir(inputs, training.info.get("trained_from", "base"))
    return merge(trained, adapter_dir(training), out, dtype=cfg.dtype,
                 shard_size_mb=cfg.shard_size_mb, trained_4bit=training.info.get("method") == "qlora",
                 config_overrides=training.info.get("config_overrides") or {})
