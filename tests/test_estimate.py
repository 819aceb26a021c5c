"""Dry-run estimates against figures known for Llama 3 8B."""

from __future__ import annotations

from edgezh.estimate import Shape, training_gib
from edgezh.recipe import SFTConfig

LLAMA3_8B = Shape(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, tied=False)


def test_llama3_8b_parameter_count() -> None:
    assert LLAMA3_8B.params == 8_030_261_248  # Meta-Llama-3-8B's published count


def test_lora_all_linear_rank8_matches_peft() -> None:
    assert LLAMA3_8B.lora_params(8, "all-linear") == 20_971_520  # what peft prints for r=8, all linear
    assert LLAMA3_8B.lora_params(8, ["q_proj", "v_proj"]) == 32 * 8 * (4096 + 4096 + 4096 + 1024)


def test_methods_order_and_plausible_sizes() -> None:
    cfg = SFTConfig(batch_size=1, gradient_checkpointing=True)
    full, lora, qlora = (training_gib(LLAMA3_8B, cfg, m, 2048) for m in ("full", "lora", "qlora"))
    assert full > 110  # 16 bytes per parameter alone is 120 GiB
    assert 15 < lora < 25  # 16 GiB of bf16 weights plus activations
    assert 6 < qlora < 12  # QLoRA on an 8B model fits a 12 GiB card at 2k context
    assert qlora < lora < full


def test_dpo_needs_more_than_sft_and_checkpointing_saves_memory() -> None:
    cfg = SFTConfig(batch_size=2)
    assert training_gib(LLAMA3_8B, cfg, "lora", 2048, dpo=True) > training_gib(LLAMA3_8B, cfg, "lora", 2048)
    ckpt = SFTConfig(batch_size=2, gradient_checkpointing=True)
    assert training_gib(LLAMA3_8B, ckpt, "lora", 2048) < training_gib(LLAMA3_8B, cfg, "lora", 2048)
