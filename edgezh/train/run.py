"""What every training kind does around its own trainer: the section and precision once, then
train (resuming), evaluate, save, log and summarise. `sft` and `dpo` supply only their trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezh.train import model as train_model
from edgezh.train import session
from edgezh.train.precision import job_precision


@dataclass
class Setup:
    """What a trainer is built from: the typed section, the resolved precision, where the data is."""

    cfg: Any
    precision: Any
    data_dir: Path
    has_eval: bool
    zero3: bool


def setup(job, eval_file: str, cfg=None, precision=None) -> Setup:
    """The job's section (typed once, by the caller when it has it) and precision; whether there is an eval split."""
    from edgezh.train import data as train_data

    cfg = job.section() if cfg is None else cfg
    data_dir = Path(job.data_dir)
    return Setup(cfg, job_precision(job, cfg, precision), data_dir, train_data.has_rows(data_dir / eval_file),
                 session.zero_stage(job.deepspeed) == 3)


def trained_in_fp32(trainer, built: Setup) -> None:
    """LoRA/QLoRA: the trained tensors become fp32 before the optimizer exists. TRL casts QLoRA adapters
    to bf16 (trl/trainer/sft_trainer.py, "When using QLoRA ...") and a 16-bit base gives 16-bit
    modules_to_save copies; updates at small learning rates vanish in bf16 and fp16 trainable tensors
    break the fp16 gradient scaler. (Under ZeRO-3 they keep the base's dtype: DeepSpeed gathers
    parameters in one dtype.)"""
    if built.cfg.method != "full" and not built.zero3:
        train_model.trainable_in_fp32(trainer.model)


def run_trainer(trainer, job, built: Setup, plots, title: str) -> dict:
    """Train (resuming from the scratch folder), evaluate once after training, save, log; the manifest facts."""
    if built.cfg.method == "qlora":
        train_model.assert_not_repacked(trainer.model)  # no forward may have run on the 4-bit model yet
    trainable = train_model.parameter_counts(trainer.model)
    resume = session.train_with_resume(trainer, job, trainer.token_counter)
    if trainer.eval_dataset is not None:
        trainer.evaluate()  # after training: the eval loss in the log (and never a forward before training)
    out = Path(job.out)
    saved = session.save_final(trainer, out, built.cfg.method, job.model_dir)
    written = session.write_log(trainer, job, out, plots, title)
    facts = session.summary(trainer, job, trainer.token_counter, built.precision, resume, trainable)
    facts.update({"plots": written, "output": saved})
    return facts
