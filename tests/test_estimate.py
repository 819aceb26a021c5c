"""Dry-run estimates against figures known for Llama 3 8B."""

from __future__ import annotations

import pytest

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


def _recipe(**sections):
    from edgezh.recipe import Recipe

    return Recipe.model_validate({"name": "r", "base": {"hub": "meta-llama/Meta-Llama-3-8B-Instruct"}, **sections})


def test_running_a_gguf_needs_its_weights_the_kv_cache_and_a_compute_buffer() -> None:
    from edgezh.estimate import GIB, run_gib

    weights, kv, total = run_gib(LLAMA3_8B, 4.57 * GIB, 8192)
    assert weights == 4.57 and kv == 1.0  # f16 K and V: 2 × 32 layers × 8192 tokens × 1024 × 2 bytes
    assert total - weights - kv == 4 * 512 * 32 * 8192 / GIB  # the attention scores outgrow the logits at 8k


def test_disk_and_run_tables_follow_the_recipe() -> None:
    from edgezh.estimate import GGUF_BPW, disk_table, run_table

    recipe = _recipe(export={"gguf": {"outtype": "f16", "quantize": ["q4_k_m", "q8_0"], "imatrix": {"text": ["hsk"]},
                                      "plain": ["q4_k_m"], "fit": {"budget": "4GiB"}}},
                     modelfile={"num_ctx": 2048})
    disk = dict(disk_table(recipe, LLAMA3_8B))
    assert disk["base download (hub cache, bf16)"] == pytest.approx(2 * LLAMA3_8B.params / 2**30)
    assert disk["r-q4_k_m.gguf"] == disk["r-q4_k_m-plain.gguf"] == pytest.approx(LLAMA3_8B.params * GGUF_BPW["q4_k_m"] / 8 / 2**30)
    assert disk["r-fit.gguf (at most)"] == 4.0
    ctx, rows = run_table(recipe, LLAMA3_8B)
    assert ctx == 2048 and [r[0] for r in rows] == ["r-f16.gguf", "r-q4_k_m.gguf", "r-q8_0.gguf", "r-fit.gguf"]
    assert run_table(_recipe(export={"gguf": {}}), LLAMA3_8B)[0] == 4096  # no modelfile: llama.cpp's usual 4k


def test_a_meta_hub_id_without_a_cached_config_gets_its_published_shape() -> None:
    from huggingface_hub import try_to_load_from_cache

    from edgezh.estimate import model_shape

    if isinstance(try_to_load_from_cache("meta-llama/Meta-Llama-3-8B-Instruct", "config.json"), str):
        pytest.skip("this machine's hub cache holds Meta-Llama-3-8B-Instruct's config (test_conformance covers an empty cache)")
    shape = model_shape(_recipe().base)
    assert shape is not None and shape.params == LLAMA3_8B.params and "published shape of Llama 3 8B" in shape.source
    assert model_shape(_recipe(base={"hub": "someone/unknown-model"}).base) is None
