"""Stage `dpo`: preference tuning on the data artifact's pairs, continuing the SFT result when there is one.

Chaining after SFT:

| sft \\ dpo      | lora / qlora                       | full                                   |
|----------------|------------------------------------|----------------------------------------|
| lora / qlora   | continue SFT's adapter (trainable) | fold SFT's adapter in, train all weights |
| full           | refused: merge folds a DPO adapter into the original base | start from SFT's `model/` |

Without SFT, DPO trains the pretrain stage's model when the build has one, else the base; `info.trained_from`
names the stage whose model its adapter applies to (continuing SFT's adapter: the model SFT trained).
Continuing an adapter keeps its shape; a `dpo.lora` given explicitly must match it (both refusals are
recipe checks, `edgezh.recipe.chain_problems`, made when the recipe loads). The outputs are
the SFT stage's: `adapter/` or `model/`, `trainer_log.jsonl`, `loss.png`, `rewards.png`,
`reward_accuracy.png`.
"""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact, scratch_dir
from edgezh.layout import adapter_dir, stage_model_dir, start_stage
from edgezh.recipe import DPOConfig
from edgezh.train.job import TrainJob
from edgezh.train.sft_stage import data_facts, execute

VERSION = "1"


def trained_from(inputs: dict[str, Artifact]) -> str:
    """The stage whose model DPO's weights start from (its adapter applies to that model)."""
    sft = inputs.get("sft")
    if sft is None:
        return start_stage(inputs)
    return "sft" if sft.info.get("method") == "full" else sft.info.get("trained_from", "base")


def make_job(cfg: DPOConfig, inputs: dict[str, Artifact], out: Path) -> TrainJob:
    template, pad_token_id, data_max = data_facts(inputs["data"], inputs["base"], "dpo")
    # after a full SFT: its model/ (DPO is full too: the recipe refuses anything else when it loads)
    start_model, start_adapter, overrides = str(stage_model_dir(inputs, trained_from(inputs))), None, {}
    sft = inputs.get("sft")
    if sft is not None:
        overrides = dict(sft.info.get("config_overrides") or {})
        if sft.info.get("method") != "full":  # the recipe checked that an explicit dpo.lora matches sft.lora
            start_adapter = str(adapter_dir(sft))
    return TrainJob(kind="dpo", config=cfg.model_dump(mode="json"), model_dir=start_model, data_dir=str(inputs["data"].path),
                    template=template, pad_token_id=pad_token_id, max_length=cfg.max_length or data_max, out=str(out),
                    scratch=str(scratch_dir(out, cfg, inputs)), start_adapter=start_adapter, config_overrides=overrides)


def run(cfg: DPOConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    return {**execute(make_job(cfg, inputs, out), cfg, "dpo"), "trained_from": trained_from(inputs)}
