"""SFT on the tiny Llama 3 with the real TRL trainer: the loss falls, the adapter reloads and changes the
model, loss_scale weights the loss exactly as documented, packing equals padding, QLoRA trains on
CPU, bad configurations are refused. The data artifact comes from the data stage, run by the pipeline
(cached under .cache/test-fixtures); the helpers here are shared by the other test_train*.py files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from edgezh.errors import UserError
from edgezh.recipe import DPOConfig, SFTConfig
from edgezh.stages import STAGES
from edgezh.train import precision as train_precision
from edgezh.train.job import TrainJob, run_job

# Twelve short arithmetic chats a 2-layer model starts to fit in a few steps, and preference pairs that
# always prefer the Chinese answer over the English one.
CHATS = [{"messages": [{"role": "user", "content": f"{a}加{b}等于几？"}, {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"}]}
         for a in range(1, 5) for b in range(1, 4)]
PAIRS = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": zh}],
          "rejected": [{"role": "assistant", "content": en}]}
         for q, zh, en in [("你好", "你好！", "Hello there!"), ("谢谢", "不客气。", "You are welcome."),
                           ("再见", "再见！", "Goodbye!"), ("早上好", "早上好！", "Good morning!"),
                           ("晚安", "晚安。", "Good night."), ("对不起", "没关系。", "No problem."),
                           ("请坐", "谢谢！", "Thanks!")]]
FAST = dict(learning_rate=5e-3, lr_scheduler="constant", warmup_ratio=0.0, batch_size=4, logging_steps=1)


def stages_with_data():
    """The stage table, with the data stage's module filled in until edgezh/stages.py registers it."""
    return tuple(dataclasses.replace(s, module="edgezh.data.data_stage") if s.name == "data" and s.module is None else s
                 for s in STAGES)


def write_recipe(folder: Path, base: Path, training: str = "") -> Path:
    """A recipe over the tiny base with CHATS and PAIRS as local data sources (files rewritten only when
    they change, so the data stage stays cached)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("chats.jsonl", CHATS), ("pairs.jsonl", PAIRS)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text:
            (folder / name).write_text(text, encoding="utf-8")
    recipe = folder / "train.yaml"
    recipe.write_text(f"""\
name: train-tests
base: {{path: {base}}}
data:
  sources:
    - {{path: chats.jsonl, format: messages}}
    - {{path: pairs.jsonl, format: dpo}}
  eval_ratio: 0.2
  max_length: 64
{training}""", encoding="utf-8")
    return recipe


def build_data(base: Path) -> Path:
    """The data stage's artifact for CHATS and PAIRS, built by the pipeline into the fixture cache."""
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    recipe = load_recipe(write_recipe(FIXTURES / "train-tests-src", base), [f"output.root={FIXTURES}"])
    plan = make_plan(recipe, until="data", stages=stages_with_data())
    run_plan(plan)
    return plan.step("data").artifact.path


def rows(data_dir: Path, split: str = "train") -> list[dict]:
    """The encoded examples of the data artifact."""
    import pyarrow.parquet as pq

    return pq.read_table(data_dir / f"{split}.parquet").to_pylist()


def info(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))["info"]


def make_job(kind: str, tmp: Path, model_dir: Path, data_dir: Path, **section) -> TrainJob:
    cfg = (SFTConfig if kind == "sft" else DPOConfig)(**section)
    out, scratch = tmp / f"{kind}-out", tmp / f"{kind}-scratch"
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    facts = info(data_dir)
    return TrainJob(kind=kind, config=cfg.model_dump(mode="json"), model_dir=str(model_dir), data_dir=str(data_dir),
                    template=facts["template"], pad_token_id=facts["pad_token_id"],
                    max_length=cfg.max_length or facts["max_length"], out=str(out), scratch=str(scratch))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def data_dir(tiny_llama3: Path) -> Path:
    return build_data(tiny_llama3)


# ---------------------------------------------------------------- SFT runs


def test_sft_lora_loss_falls_and_adapter_changes_the_model(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = make_job("sft", tmp_path, tiny_llama3, data_dir, max_steps=6, **FAST)
    facts = run_job(job)
    out = Path(job.out)
    assert facts["steps"] == 6 and facts["method"] == "lora" and facts["output"] == "adapter"
    assert facts["final_loss"] < facts["first_loss"] - 1.0, facts
    assert facts["eval_loss"] is not None and facts["eval_loss"] < facts["first_loss"]
    assert 0 < facts["tokens"]["trained"] < facts["tokens"]["total"] <= facts["tokens"]["computed"]  # padding counts
    assert facts["tokens_per_s"] > 0 and facts["device"] == "cpu" and facts["precision"] == "fp32"
    assert facts["trainable_params"] == 2 * 8 * (256 + 256 + 2 * (256 + 128) + 256 + 256 + 2 * (256 + 512) + 512 + 256)

    records = read_log(out)
    assert records[0] == {"event": "train_begin", "step": 0, "resumed_from": None}
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert any("eval_loss" in r for r in records)
    for png in ("loss.png", "learning_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    ids = torch.tensor([rows(data_dir)[0]["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter").eval()
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max() > 0.1
    # the tuned model prefers the trained answer's tokens more than the base did
    labels = ids[0, 1:]
    gain = (after.log_softmax(-1)[0, :-1].gather(1, labels[:, None]) - before.log_softmax(-1)[0, :-1].gather(1, labels[:, None]))
    assert gain[-8:].mean() > 0


@pytest.fixture(scope="module")
def sft_trainer(tiny_llama3: Path, data_dir: Path, tmp_path_factory):
    """A built (never trained) SFT trainer: its model is the base plus a zero LoRA update."""
    from edgezh.train import sft

    job = make_job("sft", tmp_path_factory.mktemp("loss"), tiny_llama3, data_dir, max_steps=1, **FAST)
    trainer, _ = sft.build_trainer(job)
    trainer.model.eval()
    return trainer


def test_loss_scale_weights_each_token(sft_trainer, data_dir: Path) -> None:
    from edgezh.train.data import SFTCollator

    pad = info(data_dir)["pad_token_id"]
    examples = rows(data_dir)[:2]
    assert all(scale == (1.0 if label != -100 else 0.0) for e in examples for label, scale in zip(e["labels"], e["loss_scale"]))
    trained = [i for i, label in enumerate(examples[1]["labels"]) if label != -100][:3]
    weighted_examples = [examples[0], {**examples[1], "loss_scale": [2.0 if i in trained else v
                                                                     for i, v in enumerate(examples[1]["loss_scale"])]}]
    plain, weighted = SFTCollator(pad)(examples), SFTCollator(pad)(weighted_examples)
    model = sft_trainer.model
    n = int((plain["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss_plain = sft_trainer.compute_loss(model, dict(plain)).item()
        loss_weighted = sft_trainer.compute_loss(model, dict(weighted)).item()
        loss_over_2n = sft_trainer.compute_loss(model, dict(weighted), num_items_in_batch=torch.tensor(2 * n)).item()
        logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), plain["labels"][:, 1:].clamp(min=0), reduction="none")
    mask = plain["labels"][:, 1:] != -100
    assert loss_plain == pytest.approx((ce * mask).sum().item() / n, rel=1e-5)  # scale 1: the plain mean CE
    # scale 2 on three tokens of the second example adds their cross-entropy once more, over the same count
    extra = sum(ce[1, i - 1].item() for i in trained)
    assert loss_weighted == pytest.approx(loss_plain + extra / n, rel=1e-5)
    assert loss_over_2n == pytest.approx(loss_weighted / 2, rel=1e-5)  # gradient accumulation: N over the whole step


def test_packed_rows_give_the_padded_loss_of_their_examples(sft_trainer, data_dir: Path, tmp_path: Path) -> None:
    from edgezh.train.data import SFTCollator, load_sft, pack

    pad = info(data_dir)["pad_token_id"]
    dataset, counts = load_sft(data_dir / "train.parquet", tmp_path, 64)
    packed = pack(dataset, 64)
    assert len(packed) < counts["examples"] and sum(len(r["seq_lengths"]) for r in packed) == counts["examples"]
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= 64
        assert [label != -100 for label in row["labels"]] == [scale > 0 for scale in row["loss_scale"]]
    chosen = sorted(packed, key=lambda r: -len(r["seq_lengths"]))[:2]  # rows holding several examples
    chosen = chosen if len(chosen[0]["input_ids"]) != len(chosen[1]["input_ids"]) else [chosen[0], packed[-1]]
    examples = []
    for row in chosen:
        start = 0
        for length in row["seq_lengths"]:
            examples.append({c: row[c][start:start + length] for c in ("input_ids", "labels", "loss_scale")})
            start += length
    assert len(examples) > len(chosen)

    batch = SFTCollator(pad, padding_free=True)(chosen)
    width = max(len(r["input_ids"]) for r in chosen)
    assert batch["input_ids"].shape == (2, width) and "attention_mask" not in batch  # one row per packed row
    assert int(batch["token_count"]) == sum(len(e["input_ids"]) for e in examples)
    for r, row in enumerate(chosen):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist()
        n = len(row["input_ids"])
        assert starts[:len(row["seq_lengths"])] == [sum(row["seq_lengths"][:i]) for i in range(len(row["seq_lengths"]))]
        assert all(batch["labels"][r, i] == -100 for i in starts)  # no example is trained to follow the previous one
        assert (batch["labels"][r, n:] == -100).all() and (batch["loss_scale"][r, n:] == 0).all()  # the pad tail
    padded = SFTCollator(pad)(examples)
    with torch.no_grad():
        a = sft_trainer.compute_loss(sft_trainer.model, dict(padded)).item()
        b = sft_trainer.compute_loss(sft_trainer.model, dict(batch)).item()
    assert a == pytest.approx(b, rel=1e-5)
    # without restarting positions the packed examples would attend to each other: a different loss
    with torch.no_grad():
        joined = dict(batch, position_ids=torch.arange(width).expand(2, -1))
        c = sft_trainer.compute_loss(sft_trainer.model, joined).item()
    assert abs(c - a) > 1e-3


def test_sft_packed_with_gradient_checkpointing_trains(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["norm"]}
    job = make_job("sft", tmp_path, tiny_llama3, data_dir, max_steps=3, packing=True, gradient_checkpointing=True,
                   lora=lora, **{**FAST, "batch_size": 1})
    facts = run_job(job)
    assert facts["packing"] is True and facts["steps"] == 3
    # ~20-token examples packed into 64-token rows: one optimizer step sees several examples
    assert facts["tokens"]["total"] / 3 > 40
    assert facts["tokens"]["total"] <= facts["tokens"]["computed"]  # packed rows padded to the widest of the batch
    assert facts["final_loss"] < facts["first_loss"]
    weights = load_file(Path(job.out) / "adapter" / "adapter_model.safetensors")
    base = load_file(tiny_llama3 / "model.safetensors")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_" in k}
    assert adapted == {"q_proj", "v_proj"}
    copies = {k.removeprefix("base_model.model."): t for k, t in weights.items() if ".lora_" not in k}
    assert sorted(copies) == sorted(k for k in base if k.endswith("norm.weight"))  # every *norm, trained in full
    assert all((t - base[k]).abs().max() > 0 for k, t in copies.items())


def test_qlora_trains_on_cpu(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    job = make_job("sft", tmp_path, tiny_llama3, data_dir, method="qlora", max_steps=3, **FAST)
    facts = run_job(job)
    assert facts["method"] == "qlora" and facts["final_loss"] < facts["first_loss"]
    weights = load_file(Path(job.out) / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    # peft starts every lora_B at zero: training over the 4-bit base moved all of them, in fp32
    assert len(lora_b) == 14 and all(t.abs().max() > 0 and t.dtype == torch.float32 for t in lora_b)


def test_4bit_eval_forward_before_training_cannot_corrupt_gradients(tiny_llama3: Path) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward; training
    afterwards gives wrong gradients. edgezh disables the repack at load time and checks it before training."""
    from peft import get_peft_model

    from edgezh.recipe import LoraSpec, QuantSpec
    from edgezh.train import model as train_model

    ids = torch.tensor([[128000, 57668, 53901, 3922, 9906, 1917, 0, 42]])

    def lora_grads(eval_first: bool, allow_repack: bool):
        model = train_model.load_base(tiny_llama3, "qlora", train_precision.Precision("fp32", "cpu"), "cpu", quant=QuantSpec())
        if allow_repack:  # what bitsandbytes does by default on a CPU with AVX512-BF16
            for layer in train_model.linear4bit_modules(model):
                layer.support_avx512bf16_for_cpu = True
        model, config = train_model.attach_adapter(model, "qlora", LoraSpec(rank=4, alpha=8, dropout=0.0))
        torch.manual_seed(1)
        model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        repacked = False
        try:
            train_model.assert_not_repacked(model)
        except RuntimeError:
            repacked = True
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_A" in n]), repacked

    reference, _ = lora_grads(eval_first=False, allow_repack=False)
    guarded, repacked = lora_grads(eval_first=True, allow_repack=False)
    assert not repacked and torch.equal(guarded, reference)
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        corrupted, repacked = lora_grads(eval_first=True, allow_repack=True)
        assert repacked  # the guard sees it ...
        assert (corrupted - reference).abs().max() > 0.1 * reference.abs().max()  # ... and this is why


# ---------------------------------------------------------------- refused configurations


def test_precision_rules() -> None:
    resolve = train_precision.resolve
    assert resolve("auto", cuda=False, gpu_bf16=False) == train_precision.Precision("fp32", "cpu")
    assert resolve("bf16", cuda=False, gpu_bf16=False).trainer_flags() == {"bf16": True, "fp16": False, "use_cpu": True}
    assert resolve("auto", cuda=True, gpu_bf16=True).name == "bf16"
    assert resolve("auto", cuda=True, gpu_bf16=False).name == "fp16"
    assert resolve("fp16", cuda=True, gpu_bf16=False).trainer_flags() == {"bf16": False, "fp16": True, "use_cpu": False}
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve("fp16", cuda=False, gpu_bf16=False, where="sft.precision")
    with pytest.raises(UserError, match="no bfloat16 support"):
        resolve("bf16", cuda=True, gpu_bf16=False)
    with pytest.raises(UserError, match="set it to float16"):
        train_precision.check_compute_dtype("bfloat16", resolve("fp16", cuda=True, gpu_bf16=False), gpu_bf16=False)
    train_precision.check_compute_dtype("bfloat16", resolve("auto", cuda=False, gpu_bf16=False))  # CPU: fine


def test_fp16_on_cpu_exits_2_before_loading_anything(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    job = make_job("sft", tmp_path, tiny_llama3, data_dir, max_steps=1, precision="fp16")
    path = job.save(tmp_path / "job.json")
    done = subprocess.run([sys.executable, "-m", "edgezh.train.job", str(path)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: sft.precision: fp16 needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not any(Path(job.out).iterdir())


def test_job_round_trips_as_json(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    job = make_job("dpo", tmp_path, tiny_llama3, data_dir, method="qlora", beta=0.5)
    again = TrainJob.load(job.save(tmp_path / "job.json"))
    assert again == job and again.section().beta == 0.5 and again.section().qlora.quant_type == "nf4"
    full = make_job("sft", tmp_path, tiny_llama3, data_dir, method="full")
    assert full.section().method == "full"  # the dumped (default) lora/qlora settings do not trip the validator
    with pytest.raises(ValueError, match="kind"):
        TrainJob(**{**json.loads(job.to_json()), "kind": "ppo"})


def _artifacts(tiny_llama3: Path, data_dir: Path, tmp_path: Path, **data_info):
    from edgezh.artifacts import Artifact

    info = {**json.loads((data_dir / "manifest.json").read_text())["info"], **data_info}
    base = Artifact("base", tmp_path / "01-base", {}, {"template": "llama3", "model_path": str(tiny_llama3)})
    return base, Artifact("data", data_dir, {"train.parquet": "x"}, {k: v for k, v in info.items() if v is not None})


def test_stage_refusals(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from edgezh.artifacts import Artifact
    from edgezh.train import dpo_stage, sft_stage

    base, data = _artifacts(tiny_llama3, data_dir, tmp_path)
    out = tmp_path / "04-dpo.tmp"
    out.mkdir()
    full_sft = tmp_path / "03-sft"
    (full_sft / "model").mkdir(parents=True)
    sft_full = Artifact("sft", full_sft, {}, {"method": "full"})
    job = dpo_stage.make_job(DPOConfig(method="full"), {"base": base, "data": data, "sft": sft_full}, out)
    assert job.model_dir == str(full_sft / "model") and job.start_adapter is None

    lora_sft = tmp_path / "03-sft-lora"
    (lora_sft / "adapter").mkdir(parents=True)
    (lora_sft / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    sft_lora = Artifact("sft", lora_sft, {}, {"method": "lora", "config_overrides": {"rope_theta": 1e6}})
    job = dpo_stage.make_job(DPOConfig(), {"base": base, "data": data, "sft": sft_lora}, out)
    assert job.start_adapter == str(lora_sft / "adapter") and job.config_overrides == {"rope_theta": 1e6}
    assert job.max_length == 64 and job.pad_token_id == info(data_dir)["pad_token_id"] and Path(job.scratch).parent.name == "04-dpo.scratch"

    _, no_pad = _artifacts(tiny_llama3, data_dir, tmp_path, pad_token_id=None)
    with pytest.raises(UserError, match="no pad_token_id"):
        sft_stage.make_job(SFTConfig(), {"base": base, "data": no_pad}, tmp_path / "03-sft.tmp")
    _, chatml = _artifacts(tiny_llama3, data_dir, tmp_path, template="chatml")
    with pytest.raises(UserError, match="encoded for chat format 'chatml'"):
        sft_stage.make_job(SFTConfig(), {"base": base, "data": chatml}, tmp_path / "03-sft.tmp")


def test_chain_refusals_are_recipe_errors(tmp_path: Path) -> None:
    """What DPO after SFT cannot do is known from the recipe: it fails when the recipe loads (exit 2,
    dotted path), not after SFT has trained."""
    from edgezh.recipe_load import RecipeError, load_recipe

    def problems(sft: str, dpo: str) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(f"name: r\nbase: {{init: {{}}, tokenizer: llama3}}\ndata: {{sources: [{{builtin: hsk-chat}}]}}\nsft: {sft}\ndpo: {dpo}\n")
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        return "\n".join(str(p) for p in info.value.problems)

    assert "dpo.method" in problems("{method: full}", "{method: qlora}") and "after a full SFT is not supported" in \
        problems("{method: full}", "{method: lora}")
    text = problems("{lora: {rank: 8, alpha: 16}}", "{lora: {rank: 16, alpha: 16}}")
    assert "dpo.lora" in text and "differs from it: rank 16 vs 8" in text
    assert "orpo" in problems("{}", "{loss_type: orpo}")


def test_full_sft_then_full_dpo(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = make_job("sft", tmp_path / "sft", tiny_llama3, data_dir, method="full", max_steps=1, **{**FAST, "learning_rate": 1e-3})
    facts = run_job(sft)
    model_dir = Path(sft.out) / "model"
    assert facts["output"] == "model" and facts["trainable_params"] == facts["total_params"] > 60_000_000
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "training_args.bin").exists()  # no pickles in the artifact
    assert json.loads((model_dir / "config.json").read_text())["use_cache"] is True
    base, tuned = load_file(tiny_llama3 / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert (tuned["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 0
    AutoModelForCausalLM.from_pretrained(model_dir)  # a complete HF folder

    # DPO (full) from SFT's model: the reference log-probs are precomputed with the starting model (no copy)
    dpo = make_job("dpo", tmp_path / "dpo", model_dir, data_dir, method="full", max_steps=1, **{**FAST, "batch_size": 2})
    facts = run_job(dpo)
    assert facts["output"] == "model" and facts["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert (Path(dpo.out) / "model" / "model.safetensors").is_file()


def test_context_overrides_reach_the_model(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from edgezh.artifacts import Artifact
    from edgezh.train import sft, sft_stage

    base = Artifact("base", tmp_path / "01-base", {}, {"template": "llama3", "model_path": str(tiny_llama3)})
    data = Artifact("data", data_dir, {"train.parquet": "x"}, info(data_dir))
    (tmp_path / "03-sft.tmp").mkdir()
    job = sft_stage.make_job(SFTConfig(rope_theta=1e6, max_position_embeddings=8192, max_steps=1),
                             {"base": base, "data": data}, tmp_path / "03-sft.tmp")
    assert job.config_overrides == {"rope_theta": 1e6, "max_position_embeddings": 8192}
    trainer, _ = sft.build_trainer(job)
    config = trainer.model.config
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 8192
    rotary = trainer.model.get_base_model().model.rotary_emb
    assert rotary.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / 64), rel=1e-5)  # head_dim 64


def test_examples_longer_than_max_length_are_cut(data_dir: Path, tmp_path: Path) -> None:
    from edgezh.train.data import has_rows, load_sft

    lengths = [len(r["input_ids"]) for r in rows(data_dir)]
    first_trained = min(next(i for i, label in enumerate(r["labels"]) if label != -100) for r in rows(data_dir))
    cut = first_trained + 2
    dataset, counts = load_sft(data_dir / "train.parquet", tmp_path, cut)
    assert counts["truncated"] == sum(n > cut for n in lengths) > 0
    assert max(len(ids) for ids in dataset["input_ids"]) == cut and counts["examples"] == len(dataset)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["loss_scale"]) for r in dataset)
    _, untouched = load_sft(data_dir / "train.parquet", tmp_path, max(lengths))
    assert untouched == {"examples": len(lengths), "truncated": 0, "dropped_untrained": 0}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), tmp_path / "empty.parquet")
    assert not has_rows(tmp_path / "empty.parquet") and not has_rows(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="missing column"):
        load_sft(tmp_path / "empty.parquet", tmp_path, 64)
    pq.write_table(pq.read_table(data_dir / "train.parquet").slice(0, 0), tmp_path / "none.parquet")
    with pytest.raises(UserError, match="no examples — the recipe's data has no SFT source"):
        load_sft(tmp_path / "none.parquet", tmp_path, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_lora_and_qlora(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    from edgezh.train import sft

    lora = make_job("sft", tmp_path / "lora", tiny_llama3, data_dir, max_steps=3, lora={"rank": 4, "alpha": 8, "modules_to_save": ["norm"]},
                    **FAST)
    trainer, built = sft.build_trainer(lora)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert built["precision"].describe() == f"{expected} on cuda"
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {built["precision"].torch_dtype()}
    del trainer
    facts = run_job(lora)
    assert facts["device"] == "cuda" and facts["final_loss"] < facts["first_loss"]
    qlora = make_job("sft", tmp_path / "qlora", tiny_llama3, data_dir, method="qlora", max_steps=3, **FAST)
    facts = run_job(qlora)
    assert facts["device"] == "cuda" and facts["final_loss"] < facts["first_loss"]
