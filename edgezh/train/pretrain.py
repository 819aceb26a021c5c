"""Continued pre-training: the SFT trainer (`edgezh.train.sft`) over the data stage's text blocks.

The blocks (`text_train.parquet` / `text_eval.parquet`: documents joined with the end-of-text token, cut
into `data.max_length` tokens) have `labels = input_ids` and `loss_scale` 1 everywhere, so the SFT loss
is plain next-token cross-entropy over every token, and no packing is needed (the blocks are full).
What differs from SFT:

- `embedding_learning_rate`: the trainable parameters of the embedding and the head (`embed_tokens`,
  `lm_head`: their modules_to_save copies, LoRA factors on them, or the weights themselves with
  `full`) form optimizer parameter groups of their own with that learning rate. The scheduler scales
  every group by the same factor, so the ratio holds through warmup and decay. The optimizer is the
  Trainer's own choice (`get_optimizer_cls_and_kwargs`); only its parameter groups change.
- The held-out blocks are evaluated before training as well as after, when a forward before training
  is safe (not on a 4-bit model, see `edgezh.train.model`; not across launched processes), so the
  manifest holds the eval loss and perplexity before and after.
"""

from __future__ import annotations

import math

from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory

from edgezh.errors import UserError
from edgezh.recipe import EMBEDDING_MODULES
from edgezh.train import run, sft
from edgezh.train.logs import SFT_PLOTS

TEXT_FILES = ("text_train.parquet", "text_eval.parquet")


def is_embedding(name: str) -> bool:
    """Whether a parameter belongs to the embedding or the head (`…embed_tokens…`, `…lm_head…` in its path)."""
    parts = name.split(".")
    return any(module in parts for module in EMBEDDING_MODULES)


def parameter_groups(model, decay: set[str], weight_decay: float, embedding_lr: float) -> list[dict]:
    """The trainable parameters in groups: (other | embedding) × (decayed | not); the embedding groups carry
    `embedding_lr`, the others the optimizer's default learning rate. Empty groups are left out."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((is_embedding(name), name in decay), []).append(param)
    found = []
    for (embedding, decayed), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if embedding:
            group["lr"] = embedding_lr
        found.append(group)
    return found


class PretrainTrainer(sft.WeightedSFTTrainer):
    """The SFT trainer with the embedding and the head at `embedding_learning_rate` (None: one learning rate)."""

    def __init__(self, *args, embedding_learning_rate: float | None = None, **kwargs):
        self.embedding_learning_rate = embedding_learning_rate
        super().__init__(*args, **kwargs)

    def get_optimizer_cls_and_kwargs(self, args, model=None):
        """The Trainer's optimizer class and arguments, with edgezh's parameter groups as `params` (which
        `Trainer.create_optimizer` uses in place of its own two groups)."""
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        own_params = {"params", "model", "optimizer_dict"} & set(kwargs)  # GaLore, LOMO… group parameters themselves
        if self.embedding_learning_rate is None or model is None or own_params or is_optimizer_factory(cls):
            return cls, kwargs
        groups = parameter_groups(model, set(self.get_decay_parameter_names(model)), args.weight_decay,
                                  self.embedding_learning_rate)
        return cls, {**kwargs, "params": groups}


def build_trainer(job, precision=None, cfg=None):
    """The model, the text blocks and the trainer of a pretrain job (nothing has run the model yet)."""
    cfg = job.section() if cfg is None else cfg
    if cfg.embedding_learning_rate is not None and (job.deepspeed or {}).get("optimizer"):
        raise UserError("pretrain.embedding_learning_rate: the DeepSpeed config has an `optimizer` section, which builds "
                        "its own optimizer without edgezh's parameter groups; drop one of the two")
    return sft.build_trainer(job, precision, cfg, files=TEXT_FILES, trainer_cls=PretrainTrainer,
                             embedding_learning_rate=cfg.embedding_learning_rate)


def evaluate_before(trainer, job, built) -> tuple[float | None, str | None]:
    """(eval loss of the untrained model on the held-out blocks, why it was not measured)."""
    if not built.has_eval:
        return None, "no held-out text blocks"
    if built.cfg.method == "qlora":
        return None, "not measured with qlora: a forward before training would repack the 4-bit weights on a CPU"
    if job.deepspeed is not None or trainer.accelerator.num_processes > 1:
        return None, "not measured in launched processes"
    return float(trainer.evaluate(metric_key_prefix="eval_before")["eval_before_loss"]), None


def perplexity(loss: float | None) -> float | None:
    return round(math.exp(loss), 4) if loss is not None and loss < 50 else None


def train(job, precision=None, cfg=None) -> dict:
    trainer, extra = build_trainer(job, precision, cfg)
    built = extra["built"]
    before, why = evaluate_before(trainer, job, built)
    facts = run.run_trainer(trainer, job, built, SFT_PLOTS, "Continued pre-training")
    facts.update({"blocks": extra["counts"], "embedding_learning_rate": built.cfg.embedding_learning_rate,
                  "eval_loss_before": before, "perplexity_before": perplexity(before),
                  "perplexity_after": perplexity(facts.get("eval_loss"))})
    if why:
        facts["eval_before_note"] = why
    return facts
