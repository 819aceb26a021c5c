"""Stage `merge`: fold the last training stage's LoRA adapter into the original 16-bit base."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export.merge import merge
from edgezh.layout import adapter_dir, full_model_dir, model_dir
from edgezh.recipe import MergeConfig

VERSION = "2"  # 2: the training's context overrides reach the merged config


def run(cfg: MergeConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    training = inputs["dpo"] if "dpo" in inputs else inputs["sft"]
    if training.info.get("method") == "full":
        # Full fine-tuning already wrote a whole model: nothing to fold in, reference it.
        (out / "source.json").write_text(f'{{"path": "{full_model_dir(training)}"}}\n', encoding="utf-8")
        return {"model_path": str(full_model_dir(training)), "note": "full fine-tune: no adapter to merge"}
    return merge(model_dir(inputs["base"]), adapter_dir(training), out, dtype=cfg.dtype,
                 shard_size_mb=cfg.shard_size_mb, trained_4bit=training.info.get("method") == "qlora",
                 config_overrides=training.info.get("config_overrides") or {})
