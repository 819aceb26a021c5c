"""Stage `sft`: supervised fine-tuning on the data artifact's encoded examples, of the base, or of the pretrain
stage's model when the build has one (`info.trained_from` names which: the merge folds the adapter into it).

Writes `adapter/` (a plain peft LoRA folder, safetensors) or, for `method: full`, `model/` (the
whole model with the base's tokenizer files); `trainer_log.jsonl`; `loss.png`, `learning_rate.png`.
Checkpoints go to the stage's scratch folder (`edgezh.artifacts.scratch_dir`), so a rerun after an
interruption resumes from the last one. Importing this module loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact, scratch_dir
from edgezh.errors import UserError
from edgezh.layout import stage_model_dir, start_stage
from edgezh.recipe import SFTConfig, TrainCommon
from edgezh.train.job import TrainJob, run_job

VERSION = "1"


def execute(job: TrainJob, cfg: TrainCommon, section: str) -> dict:
    """Run the job: in this process, or — DeepSpeed, several processes or machines — on every rank through
    the deepspeed launcher, after the DeepSpeed config is validated into `job.deepspeed` (an invalid one
    is refused before any process starts)."""
    from edgezh.train.launch import prepare, run_launched

    if prepare(job, cfg, section):
        return run_launched(job, cfg, section=section)
    return run_job(job)


def data_facts(data: Artifact, base: Artifact, section: str) -> tuple[str, int, int]:
    """(template, pad_token_id, max_length) of the data artifact, checked against the base."""
    info = data.info
    missing = [k for k in ("pad_token_id", "max_length") if info.get(k) is None]
    if missing:
        raise UserError(f"{section}: the data artifact {data.path} has no {', '.join(missing)} in its manifest; rebuild it")
    template = base.info["template"]
    if info.get("template") not in (None, template):
        raise UserError(f"{section}: the data was encoded for chat format {info['template']!r} but the base uses {template!r}")
    return template, int(info["pad_token_id"]), int(info["max_length"])


def make_job(cfg: SFTConfig, inputs: dict[str, Artifact], out: Path) -> TrainJob:
    from edgezh.train.model import config_overrides_of

    template, pad_token_id, data_max = data_facts(inputs["data"], inputs["base"], "sft")
    return TrainJob(kind="sft", config=cfg.model_dump(mode="json"), model_dir=str(stage_model_dir(inputs, start_stage(inputs))),
                    data_dir=str(inputs["data"].path), template=template, pad_token_id=pad_token_id,
                    max_length=cfg.max_length or data_max, out=str(out), scratch=str(scratch_dir(out, cfg, inputs)),
                    config_overrides=config_overrides_of(cfg))


def run(cfg: SFTConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    return {**execute(make_job(cfg, inputs, out), cfg, "sft"), "trained_from": start_stage(inputs)}
