"""Supervised fine-tuning with TRL's SFTTrainer on the data stage's encoded examples.

The loss is per-token cross-entropy weighted by `loss_scale`, averaged over the trained tokens:

    loss = Σ_t loss_scale[t] · CE(labels[t]) / N

over the tokens t whose label is not -100, N being their number in the whole optimizer step
(TRL's `num_items_in_batch`: all gradient-accumulation micro-batches, all processes), so a weight of
1 everywhere is exactly TRL's own loss. It is computed from TRL's fused LM head
(`model(..., fused_lm_head=True).log_probs`, trl/trainer/utils.py `add_fused_lm_head`: the
log-probability of each next-token label, zero where the label is -100), so the full logits are
never built; the eval loss is weighted the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from edgezh.train import data as train_data
from edgezh.train import model as train_model
from edgezh.train import run, session
from edgezh.train.logs import SFT_PLOTS


def scaled_token_loss(log_probs: torch.Tensor, loss_scale: torch.Tensor, label_mask: torch.Tensor,
                      num_items_in_batch=None) -> torch.Tensor:
    """Σ scale·(−log p) over trained tokens / number of trained tokens. `log_probs` and `label_mask` are
    the fused head's (batch, seq−1) next-token outputs; `loss_scale` is per input position (batch, seq)
    and is shifted like the labels."""
    scale = loss_scale[:, 1:].to(log_probs.dtype)
    per_token = -log_probs * scale * label_mask
    count = label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token.sum() / torch.as_tensor(count, device=per_token.device).clamp(min=1)


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss weights each token by the batch's `loss_scale` and counts tokens."""

    def __init__(self, *args, token_counter: session.TokenCounter, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        loss_scale = inputs.pop("loss_scale")
        token_count = inputs.pop("token_count", None)  # padding-free rows: the real tokens (no attention mask)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        loss = scaled_token_loss(outputs.log_probs, loss_scale, outputs.label_mask, num_items_in_batch)
        # As in TRL/Trainer: `num_items_in_batch` counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        trained = outputs.label_mask.sum()
        total = inputs["attention_mask"].sum() if token_count is None else token_count
        session.count_tokens(self, self.token_counter, total, trained, inputs["input_ids"].numel())
        valid = self.accelerator.gather_for_metrics(trained.detach().reshape(1)).sum()
        correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum().detach().reshape(1)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            self._metrics[mode]["num_tokens"] = [self.token_counter.total]
        return (loss, outputs) if return_outputs else loss


def build_trainer(job, precision=None, cfg=None, *, files: tuple[str, str] = ("train.parquet", "eval.parquet"),
                  trainer_cls=WeightedSFTTrainer, **trainer_kwargs):
    """The model, the datasets and the trainer of an SFT job (nothing has run the model yet). Continued
    pre-training reuses it with its own `files` (the text blocks) and `trainer_cls`."""
    train_file, eval_file = files
    built = run.setup(job, eval_file, cfg, precision)
    packing = getattr(built.cfg, "packing", False)
    args = session.training_arguments(TRLSFTConfig, built.cfg, job, built.precision, has_eval=built.has_eval,
                                      remove_unused_columns=False,  # keep loss_scale (and seq_lengths)
                                      dataset_kwargs={"skip_prepare_dataset": True}, packing=False, padding_free=False)
    cache = Path(job.scratch) / "datasets"
    with args.main_process_first(desc="reading the encoded examples"):  # one process writes the dataset caches
        train_set, counts = train_data.load_sft(built.data_dir / train_file, cache, job.max_length)
        eval_set = train_data.load_sft(built.data_dir / eval_file, cache, job.max_length,
                                       limit=built.cfg.eval_examples)[0] if built.has_eval else None
        if packing:
            train_set = train_data.pack(train_set, job.max_length)
            eval_set = train_data.pack(eval_set, job.max_length) if eval_set is not None else None
    tokenizer, model, peft_config = train_model.job_model(job, built.cfg, built.precision, args.device)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, processing_class=tokenizer,
        peft_config=peft_config,
        data_collator=train_data.SFTCollator(job.pad_token_id, padding_free=packing),
        token_counter=session.TokenCounter(), **trainer_kwargs,
    )
    run.trained_in_fp32(trainer, built)
    return trainer, {"built": built, "precision": built.precision, "cfg": built.cfg, "counts": counts}


def train(job, precision=None, cfg=None) -> dict:
    trainer, extra = build_trainer(job, precision, cfg)
    built = extra["built"]
    facts = run.run_trainer(trainer, job, built, SFT_PLOTS, "SFT")
    facts.update({"packing": built.cfg.packing, "examples": extra["counts"]})
    return facts
