"""Training: continued pre-training, SFT and DPO with TRL, LoRA/QLoRA/full, one job description for one or many processes.

- `job`: `TrainJob` (JSON-serialisable: everything a worker needs) and `run_job(job)`;
  `python -m edgezh.train.job JOB.json [RESULT.json]` runs one from the command line (a launcher's worker).
- `pretrain_stage`, `sft_stage`, `dpo_stage`: the pipeline stages; they build a TrainJob and call `run_job`
  (pretrain then folds its adapter into the base: a whole model for the next stage).
- `sft`: SFTTrainer with the per-token `loss_scale` loss; `pretrain`: the same trainer over text blocks with
  `embedding_learning_rate` parameter groups; `dpo`: DPOTrainer (BOS check, reference model).
- `model`: tokenizer, base model (full / lora / qlora), config overrides, LoRA config, 4-bit CPU guard.
- `data`: the data artifact's encoded examples and pairs, packing, the SFT collator.
- `precision`: auto / bf16 / fp16 / fp32 for this machine.
- `session`: training arguments, checkpoints and resume, token counting, final save, manifest facts.
- `logs`: trainer log as JSONL, PNG plots.
"""
