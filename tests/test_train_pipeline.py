"""base → data → sft → dpo → merge through the pipeline on the tiny Llama 3: the training stages read the
data stage's real artifact, DPO continues SFT's adapter, merge folds DPO's adapter in, and a rerun is
all cached."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgezh.pipeline import make_plan, run_plan
from edgezh.recipe_load import load_recipe
from test_train import stages_with_data, write_recipe


def test_sft_dpo_merge_through_the_pipeline(tiny_llama3: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    fast = "learning_rate: 5.0e-3, lr_scheduler: constant, warmup_ratio: 0.0, logging_steps: 1"
    training = (f"sft: {{lora: {{rank: 4, alpha: 8}}, max_steps: 3, batch_size: 4, save_steps: 2, {fast}}}\n"
                f"dpo: {{max_steps: 2, batch_size: 2, {fast}}}\n")
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama3, training), [f"output.root={tmp_path / 'builds'}"])
    plan = make_plan(recipe, until="merge", stages=stages_with_data())
    run_plan(plan)

    data, sft, dpo, merged = (plan.step(n).artifact for n in ("data", "sft", "dpo", "merge"))
    assert sft.info["method"] == "lora" and sft.info["steps"] == 3 and sft.info["template"] == "llama3"
    assert sft.info["max_length"] == 64 and sft.info["examples"]["examples"] == data.info["train"]
    assert sft.info["eval_loss"] is not None and sft.info["final_loss"] < sft.info["first_loss"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "trainer_log.jsonl", "loss.png",
            "learning_rate.png"} <= set(sft.files)
    assert not sft.path.with_name(sft.path.name + ".scratch").exists()  # checkpoints are dropped on commit
    assert dpo.info["continued_adapter"] is True and dpo.info["pairs"] == data.info["pairs_train"]
    assert json.loads((dpo.path / "adapter" / "adapter_config.json").read_text())["r"] == 4  # SFT's shape, continued

    base = load_file(tiny_llama3 / "model.safetensors")
    folded = load_file(merged.path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (folded[name] - base[name]).abs().max() > 0 and torch.equal(folded["model.norm.weight"], base["model.norm.weight"])

    again = make_plan(recipe, until="merge", stages=stages_with_data())
    assert [s.status for s in again.steps if s.name in ("sft", "dpo", "merge")] == ["cached"] * 3
