"""Stage `dpo`: preference tuning on the data artifact's pairs, continuing the SFT result when there is one.

Chaining after SFT:

| sft \\ dpo      | lora / qlora                       | full                                   |
|----------------|------------------------------------|----------------------------------------|
| lora / qlora   | continue SFT's adapter (trainable) | fold SFT's adapter in, train all weights |
| full           | refused: merge folds a DPO adapter into the original base | start from SFT's `model/` |

Continuing an adapter keeps its shape; a `dpo.lora` given explicitly must match it. The outputs are
the SFT stage's: `adapter/` or `model/`, `trainer_log.jsonl`, `loss.png`, `rewards.png`,
`reward_accuracy.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgezh.artifacts import Artifact, scratch_dir
from edgezh.errors import UserError
from edgezh.models.base_stage import model_dir
from edgezh.recipe import DPOConfig
from edgezh.train.job import TrainJob
from edgezh.train.sft_stage import data_facts, execute

VERSION = "1"


def _check_adapter_shape(cfg: DPOConfig, adapter: Path) -> None:
    if "lora" not in cfg.model_fields_set:
        return
    saved = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    target = saved.get("target_modules")
    wanted = {
        "rank": (cfg.lora.rank, saved.get("r")),
        "alpha": (cfg.lora.alpha, saved.get("lora_alpha")),
        "modules_to_save": (sorted(cfg.lora.modules_to_save), sorted(saved.get("modules_to_save") or [])),
    }
    if cfg.lora.target_modules != "all-linear":
        wanted["target_modules"] = (sorted(cfg.lora.target_modules), sorted(target) if isinstance(target, list) else target)
    differ = [f"{k} {mine} vs {theirs}" for k, (mine, theirs) in wanted.items() if mine != theirs]
    if differ:
        raise UserError(f"dpo.lora: DPO continues the SFT adapter ({adapter}) but differs from it: {'; '.join(differ)}. "
                        "Drop dpo.lora or make it match sft.lora")


def make_job(cfg: DPOConfig, inputs: dict[str, Artifact], out: Path) -> TrainJob:
    base = inputs["base"]
    template, pad_token_id, data_max = data_facts(inputs["data"], base, "dpo")
    start_model, start_adapter, overrides = str(model_dir(base)), None, {}
    sft = inputs.get("sft")
    if sft is not None:
        overrides = dict(sft.info.get("config_overrides") or {})
        sft_method = sft.info.get("method")
        if sft_method == "full":
            if cfg.method != "full":
                raise UserError(f"dpo.method: {cfg.method} after a full SFT is not supported: the merge stage folds the DPO "
                                "adapter into the original base, not into the SFT model. Use method: full for dpo, "
                                "or LoRA for sft")
            start_model = str(sft.path / "model")
        else:
            adapter = sft.path / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"dpo: the SFT artifact {sft.path} has no adapter/ to continue")
            if cfg.method != "full":
                _check_adapter_shape(cfg, adapter)
            start_adapter = str(adapter)
    return TrainJob(kind="dpo", config=cfg.model_dump(mode="json"), model_dir=start_model, data_dir=str(inputs["data"].path),
                    template=template, pad_token_id=pad_token_id, max_length=cfg.max_length or data_max, out=str(out),
                    scratch=str(scratch_dir(out, cfg, inputs)), start_adapter=start_adapter, model_overrides=overrides)


def run(cfg: DPOConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    return execute(make_job(cfg, inputs, out), cfg, "dpo")
