"""Preference tuning with TRL's DPOTrainer on the data stage's conversational pairs.

TRL tokenizes each pair itself (trl/trainer/dpo_trainer.py `_prepare_dataset`): it renders the
prompt with `add_generation_prompt=True` and prompt+chosen / prompt+rejected through the
tokenizer's chat template — here the registry's inference template — with
`apply_chat_template(tokenize=True)`, which tokenizes without adding special tokens
(transformers/tokenization_utils_base.py `apply_chat_template`), so the only BOS is the one the
template prints: exactly one for llama3/llama3.1, none for chatml. `check_bos` verifies that on
the tokenized dataset before training.

Reference model. A new LoRA adapter: the same model with the adapter switched off (TRL's
`use_adapter(model, None)`), no second copy. Continuing the SFT adapter: TRL adds a frozen copy of
it named "ref" (a second small adapter, not a second model), so the reference is the SFT model, as
DPO wants. `full`: TRL's `precompute_ref_log_probs` scores every pair with the starting model
before training, again without a second copy. QLoRA: the model is only run in train mode or after
`disable_cpu_repack`, see `edgezh.train.model`.

Loss types: `sigmoid` and `ipo` are DPOTrainer's own. `orpo` is not a DPO loss in TRL 1.16 (it
lives in `trl.experimental.orpo`, an experimental trainer with its own tokenization); it is refused
with a clear message.
"""

from __future__ import annotations

from pathlib import Path

from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from edgezh import templates
from edgezh.train import data as train_data
from edgezh.train import model as train_model
from edgezh.train import run, session
from edgezh.train.logs import DPO_PLOTS


class CountingDPOTrainer(DPOTrainer):
    """DPOTrainer that counts the tokens it trains on (sequence tokens; trained = completion tokens)."""

    def __init__(self, *args, token_counter: session.TokenCounter, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        session.count_tokens(self, self.token_counter, inputs["attention_mask"].sum(), inputs["completion_mask"].sum(),
                             inputs["input_ids"].numel())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def check_bos(dataset, tokenizer, template: str, where: str) -> None:
    """Every tokenized prompt starts with the BOS the chat format prints, and holds no second one
    (formats without a BOS, like chatml, have nothing to double)."""
    bos = templates.get(template).bos_token
    if bos is None:
        return
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    for index, ids in enumerate(dataset["prompt_ids"]):
        count = ids.count(bos_id)
        if count != 1 or ids[0] != bos_id:
            raise RuntimeError(f"{where}: pair {index}: the tokenized prompt has {count} BOS token(s) "
                               f"(expected exactly one, at the start, for {template})")


def build_trainer(job, precision=None, cfg=None):
    """The model, the pairs and the trainer of a DPO job (nothing has run the model yet)."""
    built = run.setup(job, "pairs_eval.jsonl", cfg, precision)
    cfg = built.cfg
    args = session.training_arguments(TRLDPOConfig, cfg, job, built.precision, has_eval=built.has_eval,
                                      beta=cfg.beta, loss_type=[cfg.loss_type],
                                      precompute_ref_log_probs=cfg.method == "full")
    train_set = train_data.load_pairs(built.data_dir / "pairs_train.jsonl")
    eval_set = train_data.load_pairs(built.data_dir / "pairs_eval.jsonl", limit=built.cfg.eval_examples) if built.has_eval else None
    tokenizer, model, peft_config = train_model.job_model(job, cfg, built.precision, args.device)
    trainer = CountingDPOTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                 processing_class=tokenizer, peft_config=peft_config, token_counter=session.TokenCounter())
    run.trained_in_fp32(trainer, built)
    check_bos(trainer.train_dataset, tokenizer, job.template, "pairs_train.jsonl")
    return trainer, {"built": built, "precision": built.precision, "cfg": cfg, "pairs": len(train_set)}


def train(job, precision=None, cfg=None) -> dict:
    trainer, extra = build_trainer(job, precision, cfg)
    cfg = extra["built"].cfg
    facts = run.run_trainer(trainer, job, extra["built"], DPO_PLOTS, "DPO")
    history = trainer.state.log_history
    facts.update({
        "beta": cfg.beta, "loss_type": cfg.loss_type, "pairs": extra["pairs"],
        "continued_adapter": job.start_adapter is not None,
        "reward_accuracy": session.last_value(history, "rewards/accuracies"),
        "reward_margin": session.last_value(history, "rewards/margins"),
        "eval_reward_accuracy": session.last_value(history, "eval_rewards/accuracies"),
    })
    return facts
