"""Training: SFT and DPO with TRL, LoRA/QLoRA, DeepSpeed launch."""
