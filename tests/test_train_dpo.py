"""DPO on the tiny Llama 3 with TRL's DPOTrainer: reward accuracy rises on a separable toy set, one BOS
per tokenized prompt, chaining after an SFT adapter (the reference is the SFT model), IPO runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgezh.train.job import run_job
from test_train import FAST, build_data, info, make_job, read_log

DPO_FAST = {**FAST, "learning_rate": 5e-3, "batch_size": 2}


@pytest.fixture(scope="module")
def data_dir(tiny_llama3: Path) -> Path:
    return build_data(tiny_llama3)


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama3: Path, data_dir: Path, tmp_path_factory) -> Path:
    job = make_job("sft", tmp_path_factory.mktemp("sft"), tiny_llama3, data_dir, max_steps=4, **FAST)
    run_job(job)
    return Path(job.out) / "adapter"


@pytest.fixture(scope="module")
def fresh_dpo(tiny_llama3: Path, data_dir: Path, tmp_path_factory):
    """DPO with a new adapter: (job, facts)."""
    job = make_job("dpo", tmp_path_factory.mktemp("dpo"), tiny_llama3, data_dir, max_steps=6, beta=0.1, **DPO_FAST)
    return job, run_job(job)


def test_dpo_reward_accuracy_rises(fresh_dpo) -> None:
    job, facts = fresh_dpo
    records = [r for r in read_log(Path(job.out)) if "rewards/accuracies" in r]
    # step 1: policy == reference (the new adapter starts at zero): no margin, accuracy 0, loss ln 2
    assert records[0]["rewards/margins"] == 0 and records[0]["rewards/accuracies"] == 0
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert facts["reward_accuracy"] > 0.5 and facts["reward_margin"] > 0
    assert sum(r["rewards/accuracies"] for r in records[-3:]) / 3 > 0.5
    assert facts["final_loss"] < facts["first_loss"]
    assert facts["continued_adapter"] is False and facts["output"] == "adapter"
    assert 0 < facts["tokens"]["trained"] < facts["tokens"]["total"]
    for png in ("loss.png", "rewards.png", "reward_accuracy.png"):
        assert (Path(job.out) / png).read_bytes()[:4] == b"\x89PNG"


def test_dpo_prompt_has_exactly_one_bos_and_doubles_are_caught(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    from edgezh.train import dpo

    trainer, _ = dpo.build_trainer(make_job("dpo", tmp_path, tiny_llama3, data_dir, max_steps=1, **DPO_FAST))
    bos = trainer.processing_class.convert_tokens_to_ids("<|begin_of_text|>")
    prompts = list(trainer.train_dataset["prompt_ids"])
    assert len(prompts) == info(data_dir)["pairs_train"] >= 4 and all(ids[0] == bos and ids.count(bos) == 1 for ids in prompts)
    assert all(bos not in ids for ids in list(trainer.train_dataset["chosen_ids"]) + list(trainer.train_dataset["rejected_ids"]))
    # the reference is the adapter-off model: TRL got a peft_config, so there is no second ("ref") adapter
    assert list(trainer.model.peft_config) == ["default"] and trainer.ref_model is None
    doubled = Dataset.from_dict({"prompt_ids": [[bos, bos, 882, 271]]})
    with pytest.raises(RuntimeError, match="2 BOS"):
        dpo.check_bos(doubled, trainer.processing_class, "llama3", "pairs")


def test_dpo_continues_the_sft_adapter(tiny_llama3: Path, data_dir: Path, sft_adapter: Path, fresh_dpo, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    fresh = fresh_dpo[0]
    chained = make_job("dpo", tmp_path / "chained", tiny_llama3, data_dir, max_steps=2, **DPO_FAST)
    chained.start_adapter = str(sft_adapter)
    facts = run_job(chained)
    assert facts["continued_adapter"] is True
    first_fresh = next(r for r in read_log(Path(fresh.out)) if "logps/chosen" in r)
    first_chained = next(r for r in read_log(Path(chained.out)) if "logps/chosen" in r)
    # the policy starts as the SFT model (SFT raised the chosen answers' likelihood) ...
    assert first_chained["logps/chosen"] > first_fresh["logps/chosen"] + 1.0
    # ... and so does the reference: a frozen copy of the SFT adapter, so the first step has no margin
    assert first_chained["rewards/margins"] == 0 and first_chained["loss"] == pytest.approx(0.6931, abs=1e-3)
    sft_weights = load_file(sft_adapter / "adapter_model.safetensors")
    dpo_weights = load_file(Path(chained.out) / "adapter" / "adapter_model.safetensors")
    assert sorted(dpo_weights) == sorted(sft_weights)  # same adapter (no "ref" copy saved), trained further
    assert max((dpo_weights[k] - sft_weights[k]).abs().max().item() for k in sft_weights) > 0


def test_dpo_ipo_loss_runs(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    job = make_job("dpo", tmp_path, tiny_llama3, data_dir, max_steps=3, loss_type="ipo", **DPO_FAST)
    facts = run_job(job)
    records = [r for r in read_log(Path(job.out)) if "loss" in r]
    # IPO's loss at step 1 (no margin yet) is (0 - 1/(2β))² = 25 for β = 0.1, unlike sigmoid's ln 2
    assert records[0]["loss"] == pytest.approx(25.0, rel=1e-3)
    assert facts["loss_type"] == "ipo" and facts["final_loss"] < facts["first_loss"]
    assert torch.isfinite(torch.tensor(facts["final_loss"]))
