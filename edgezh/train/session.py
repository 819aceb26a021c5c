"""What SFT and DPO share around their TRL trainer: arguments, checkpoints and resume, token
counting, the final save, the log and plots, and the facts for the manifest.

Every process of a multi-process launch runs all of this (the Trainer's collectives need every
rank); only the main process (`trainer.is_world_process_zero()`) writes files.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from edgezh.train.logs import JsonlLogger, append_jsonl, final_records, plot, read_log

CHECKPOINTS = "checkpoints"
LIVE_LOG = "trainer_log.live.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NOT_MODEL_FILES = ("training_args.bin", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def training_arguments(config_cls, cfg, job, precision, *, has_eval: bool, **extra):
    """TRL's SFTConfig/DPOConfig from the recipe section, the job and the resolved precision."""
    eval_steps = getattr(cfg, "eval_steps", None)
    return config_cls(
        output_dir=str(Path(job.scratch) / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a value below 1 is a ratio of the total steps (transformers 5)
        weight_decay=cfg.weight_decay,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,  # the previous checkpoint is deleted only after the new one is complete
        eval_strategy="steps" if has_eval and eval_steps else "no",
        eval_steps=eval_steps if has_eval else None,
        report_to="none",
        disable_tqdm=True,  # edgezh's own bar (TrainingBar) shows steps, rate, ETA and loss
        dataloader_num_workers=0,
        max_length=job.max_length,
        deepspeed=job.deepspeed,
        **precision.trainer_flags(),
        **extra,
    )


def zero_stage(deepspeed: dict | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config dict (None without DeepSpeed)."""
    stage = ((deepspeed or {}).get("zero_optimization") or {}).get("stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints whose trainer_state.json — written last — exists, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resume_point(folder: Path, main_process: bool) -> Path | None:
    """The last complete checkpoint to resume from; a half-written later one (killed while saving) is removed."""
    complete = complete_checkpoints(folder)
    last_step, last = complete[-1] if complete else (-1, None)
    if main_process and folder.is_dir():
        for path in folder.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and path.is_dir() and int(match.group(1)) > last_step:
                shutil.rmtree(path, ignore_errors=True)
    return last


class TrainingBar(TrainerCallback):
    """edgezh's progress bar for a training run (main process only): steps, rate, ETA and the last loss.
    In the build it sits on the stage's live line; in a launched process it reaches the build as
    progress lines (`edgezh.progress.REMOTE_ENV`)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None
        self.loss: str = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from edgezh import progress

            self.bar = progress.bar(self.description, state.max_steps or None, unit="step",
                                    completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        parts = [f"loss {logs['loss']:.3f}" if isinstance(logs.get("loss"), (int, float)) else self.loss]
        if isinstance(logs.get("eval_loss"), (int, float)):
            parts.append(f"eval {logs['eval_loss']:.3f}")
        self.loss = parts[0]
        self.bar.update(info="  ".join(p for p in parts if p))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(completed=state.global_step)
            self.bar.close()
            self.bar = None


class TokenCounter(TrainerCallback, ExportableState):
    """Tokens the optimizer has seen, summed over processes: `total` real (non-padding) tokens, `trained`
    those with a loss, `computed` the positions the model ran (padding included; equal to `total` when
    packed padding-free). Saved in every checkpoint's trainer_state.json and read back on resume, so a
    resumed run counts the whole training."""

    def __init__(self):
        self.total = 0
        self.trained = 0
        self.computed = 0
        self.session_total = 0
        self.session_seconds = 0.0
        self._started = None

    def add(self, total: int, trained: int, computed: int) -> None:
        self.total += int(total)
        self.trained += int(trained)
        self.computed += int(computed)
        self.session_total += int(total)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"total": self.total, "trained": self.trained,
                                          "computed": self.computed}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, list):
            saved = saved[-1] if saved else None
        if saved:
            self.total = int(saved["attributes"]["total"])
            self.trained = int(saved["attributes"]["trained"])
            self.computed = int(saved["attributes"].get("computed", 0))
        self._started = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.session_seconds = time.perf_counter() - self._started


def count_tokens(trainer, counter: TokenCounter, total, trained, computed) -> None:
    """Add one micro-batch's token counts, summed over processes; training mode only."""
    import torch

    if not trainer.model.training:
        return
    counts = torch.tensor([int(total), int(trained), int(computed)], dtype=torch.long, device=trainer.accelerator.device)
    counts = trainer.accelerator.gather(counts).view(-1, 3).sum(0)
    counter.add(*(c.item() for c in counts))


def train_with_resume(trainer, job, counter: TokenCounter) -> dict:
    """Train from scratch or from the last complete checkpoint in the job's scratch folder."""
    folder = Path(job.scratch) / CHECKPOINTS
    checkpoint = resume_point(folder, trainer.is_world_process_zero())
    resumed_from = checkpoint.name if checkpoint else None
    trainer.add_callback(counter)
    trainer.add_callback(JsonlLogger(Path(job.scratch) / LIVE_LOG, resumed_from))
    trainer.add_callback(TrainingBar(f"{job.kind} training"))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    step = int(_CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else 0
    return {"resumed_from_step": step}


def save_final(trainer, out: Path, method: str, model_dir: str) -> str:
    """The adapter as a plain peft folder (`adapter/`), or the whole model (`model/`) for `full` with the
    base's tokenizer files. Every process calls it (ZeRO-3 gathers the weights); the main one writes."""
    name = "model" if method == "full" else "adapter"
    folder = out / name
    if name == "model":  # training turned the KV cache off; the saved model is for inference
        trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
    trainer.save_model(str(folder))
    if trainer.is_world_process_zero():
        for path in list(folder.iterdir()):
            extra = path.name not in ADAPTER_FILES if name == "adapter" else path.name in (*TOKENIZER_FILES, *NOT_MODEL_FILES)
            if extra:  # the Trainer's tokenizer copy, training_args.bin (a pickle), README.md, DPO's "ref" adapter
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if name == "model":
            for file in TOKENIZER_FILES:
                if (Path(model_dir) / file).is_file():
                    shutil.copy2(Path(model_dir) / file, folder / file)
    return name


def write_log(trainer, job, out: Path, layout: dict, title: str) -> list[str]:
    """trainer_log.jsonl (the whole history, resume events included) and the PNG plots; main process only."""
    if not trainer.is_world_process_zero():
        return []
    events = [r for r in read_log(Path(job.scratch) / LIVE_LOG) if r.get("event")]
    records = final_records(trainer.state.log_history, events)
    path = out / "trainer_log.jsonl"
    path.unlink(missing_ok=True)
    append_jsonl(path, records)
    return plot(records, out, layout, title)


def last_value(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def first_value(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[0]) if values else None


def summary(trainer, job, counter: TokenCounter, precision, resume: dict, trainable: tuple[int, int]) -> dict[str, Any]:
    """The facts every training stage puts in its manifest. Steps, tokens and losses cover the whole
    training; `train_seconds` and `tokens_per_s` this process's run (after a resume: the resumed part)."""
    history = trainer.state.log_history
    cfg = job.config
    rate = counter.session_total / counter.session_seconds if counter.session_seconds else None
    return {
        "kind": job.kind,
        "method": cfg["method"],
        "template": job.template,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "tokens": {"trained": counter.trained, "total": counter.total, "computed": counter.computed},
        "tokens_per_s": round(rate, 1) if rate else None,
        "train_seconds": round(counter.session_seconds, 2),
        "first_loss": first_value(history, "loss"),
        "final_loss": last_value(history, "loss"),
        "eval_loss": last_value(history, "eval_loss"),
        "device": precision.device,
        "precision": precision.name,
        "processes": trainer.accelerator.num_processes,
        "trainable_params": trainable[0],
        "total_params": trainable[1],
        "max_length": job.max_length,
        "config_overrides": job.config_overrides,
        **resume,
    }
