"""Continued pre-training (`pretrain:`): every token is trained, the embedding and the head get their own
learning rate, the stage's whole model is what SFT / DPO train from and what the merge folds into, each
stage is cached on its own, and — on SmolLM2 with real weights — People's Daily lowers the perplexity on
held-out People's Daily text while SFT after it still trains. The text blocks come from the real data
stage (`format: text`), built by the pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, QUICKSTART
from edgezh.artifacts import Artifact
from edgezh.cli import main
from edgezh.pipeline import make_plan, run_plan
from edgezh.recipe import PretrainConfig
from edgezh.recipe_load import load_recipe
from test_train import CHATS, PAIRS

FAST = "learning_rate: 5.0e-3, lr_scheduler: constant, warmup_ratio: 0.0, logging_steps: 1"


def write_sources(folder: Path, news: str) -> None:
    """CHATS and PAIRS (test_train's) and People's Daily lines as a .txt file, rewritten only when they change."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"chats.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CHATS),
             "pairs.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), "news.txt": news}
    for name, text in files.items():
        if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text:
            (folder / name).write_text(text, encoding="utf-8")


def tiny_recipe(folder: Path, base: Path, news: str, training: str) -> Path:
    write_sources(folder, news)
    recipe = folder / "cpt.yaml"
    recipe.write_text(f"""\
name: cpt-tests
base: {{path: {base}}}
data:
  sources:
    - {{path: chats.jsonl, format: messages}}
    - {{path: pairs.jsonl, format: dpo}}
    - {{path: news.txt, format: text, document: line}}
  eval_ratio: 0.2
  max_length: 64
{training}""", encoding="utf-8")
    return recipe


@pytest.fixture(scope="module")
def text_data(tiny_llama3: Path, peoples_daily: str) -> Artifact:
    """The data stage's artifact with text blocks (People's Daily), conversations and pairs, cached in the fixtures."""
    recipe = load_recipe(tiny_recipe(FIXTURES / "cpt-tests-src", tiny_llama3, peoples_daily[:6000], ""),
                         [f"output.root={FIXTURES}"])
    plan = make_plan(recipe, until="data")
    run_plan(plan)
    return plan.step("data").artifact


def pretrain_job(tmp: Path, base: Path, data: Artifact, **section):
    from edgezh.train import pretrain_stage

    out = tmp / "pretrain-out"
    out.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(**section)
    return pretrain_stage.make_job(cfg, {"base": Artifact.load(base), "data": data}, out)


# ---------------------------------------------------------------- recipe


def test_recipe_section_defaults_to_trainable_embedding_and_head() -> None:
    assert PretrainConfig().lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert PretrainConfig(lora={"rank": 4}).lora.modules_to_save == ["embed_tokens", "lm_head"]  # a partial lora keeps them
    assert PretrainConfig(lora={"modules_to_save": []}).lora.modules_to_save == []
    assert PretrainConfig(method="full").trains_embeddings()
    assert not PretrainConfig(lora={"modules_to_save": ["norm"]}).trains_embeddings()


TINY = "name: t\nbase:\n  init: {hidden_size: 256}\n  tokenizer: llama3\n"
BAD = {
    "without-data": (TINY + "pretrain: {max_steps: 2}\n", "data: continued pre-training (pretrain) needs a `data` section"),
    "no-text-source": (TINY + "data: {sources: [{builtin: hsk-chat}]}\npretrain: {}\n",
                       "pretrain: no data source can give text blocks"),
    "embedding-lr-for-nothing": (TINY + "data: {sources: [{builtin: peoples-daily}]}\n"
                                 "pretrain: {lora: {modules_to_save: []}, embedding_learning_rate: 1.0e-5}\n",
                                 "pretrain.embedding_learning_rate: nothing it applies to is trained"),
    "bad-embedding-lr": (TINY + "data: {sources: [{builtin: peoples-daily}]}\npretrain: {embedding_learning_rate: 0}\n",
                         "pretrain.embedding_learning_rate: Input should be greater than 0"),
    "unknown-key": (TINY + "data: {sources: [{builtin: peoples-daily}]}\npretrain: {packing: true}\n",
                    "pretrain.packing: unknown key 'packing'"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_pretrain_section_exits_2_naming_the_place(name: str, tmp_path: Path, capsys, monkeypatch) -> None:
    text, expected = BAD[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


# ---------------------------------------------------------------- the trainer


def test_every_token_is_trained(tiny_llama3: Path, text_data: Artifact, tmp_path: Path) -> None:
    """The loss on a batch of text blocks is the model's plain causal-LM loss over every next token."""
    import pyarrow.parquet as pq

    from edgezh.train import pretrain

    blocks = pq.read_table(text_data.file("text_train.parquet")).to_pylist()
    assert blocks and all(b["labels"] == b["input_ids"] and set(b["loss_scale"]) == {1.0} for b in blocks)
    trainer, _ = pretrain.build_trainer(pretrain_job(tmp_path, tiny_llama3, text_data, lora={"rank": 4, "alpha": 8},
                                                     batch_size=4, max_steps=1))
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()  # full blocks, no padding
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        plain = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.isfinite(loss) and abs(loss.item() - plain.item()) < 1e-4 * plain.item()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_embedding_learning_rate_is_its_own_parameter_group(method: str, tiny_llama3: Path, text_data: Artifact,
                                                             tmp_path: Path) -> None:
    from edgezh.train import pretrain

    section = {"lora": {"rank": 4, "alpha": 8}} if method == "lora" else {}
    trainer, _ = pretrain.build_trainer(pretrain_job(
        tmp_path, tiny_llama3, text_data, method=method, learning_rate=1e-3, embedding_learning_rate=1e-4,
        weight_decay=0.01, lr_scheduler="linear", warmup_ratio=0.0, max_steps=10, **section))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    grouped = [(names[id(p)], group["lr"]) for group in optimizer.param_groups for p in group["params"]]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert sorted(n for n, _ in grouped) == sorted(trainable)  # every trainable parameter, once
    embedding = {n for n, lr in grouped if lr == 1e-4}
    expected = ({"base_model.model.model.embed_tokens.modules_to_save.default.weight",
                 "base_model.model.lm_head.modules_to_save.default.weight"} if method == "lora"
                else {"model.embed_tokens.weight", "lm_head.weight"})
    assert embedding == expected and all(lr == 1e-3 for n, lr in grouped if n not in embedding)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))  # the Trainer's rule (no decay on norms, biases)
    assert all(g["weight_decay"] == (0.01 if names[id(p)] in decayed else 0.0) for g in optimizer.param_groups for p in g["params"])

    scheduler = trainer.create_scheduler(10, optimizer)
    optimizer.step()
    scheduler.step()
    factors = {round(g["lr"] / g["initial_lr"], 6) for g in optimizer.param_groups}
    assert len(factors) == 1 and factors != {1.0}  # the schedule moves every group by the same factor

    plain, _ = pretrain.build_trainer(pretrain_job(tmp_path, tiny_llama3, text_data, max_steps=1, **section))
    assert {g["lr"] for g in plain.create_optimizer().param_groups} == {2e-4}  # without it: one learning rate


def test_merge_keeps_a_tied_embedding_and_head_tied(tmp_path: Path) -> None:
    """On a base that ties lm_head to embed_tokens, the trained copy (one, shared) is merged as the embedding."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgezh.errors import UserError
    from edgezh.export.merge import merge
    from edgezh.recipe import LoraSpec
    from edgezh.train.model import lora_config

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    spec = LoraSpec(rank=2, alpha=4, modules_to_save=["embed_tokens", "lm_head"])
    for tied in (True, False):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), lora_config(spec, tied=tied))
        copies = [p for n, p in model.named_parameters() if "modules_to_save" in n]
        assert len(copies) == (1 if tied else 2)
        with torch.no_grad():
            for copy in copies:
                copy.add_(1.0)
        model.save_pretrained(tmp_path / f"adapter-{tied}")
    merged = merge(tmp_path / "base", tmp_path / "adapter-True", tmp_path / "merged")
    weights, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    assert merged["modules_to_save"] == ["model.embed_tokens.weight"] and "lm_head.weight" not in weights
    assert torch.allclose(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + 1.0)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    with pytest.raises(UserError, match="ties lm_head to embed_tokens"):  # two untied copies cannot go into a tied base
        merge(tmp_path / "base", tmp_path / "adapter-False", tmp_path / "refused")


def test_qlora_with_trainable_embedding_and_head(tiny_llama3: Path, text_data: Artifact, tmp_path: Path) -> None:
    """QLoRA (4-bit base, on CUDA when there is one) with the embedding and the head trained in full, at their own
    learning rate: the stage trains, skips the forward before training, and merges into the 16-bit base."""
    from safetensors.torch import load_file

    from edgezh.train import pretrain_stage

    cfg = PretrainConfig(method="qlora", lora={"rank": 4, "alpha": 8}, max_steps=2, batch_size=2,
                         embedding_learning_rate=1e-3, learning_rate=5e-3, lr_scheduler="constant", warmup_ratio=0.0)
    out = tmp_path / "03-pretrain.tmp"
    out.mkdir()
    facts = pretrain_stage.run(cfg, {"base": Artifact.load(tiny_llama3), "data": text_data}, out)
    assert facts["method"] == "qlora" and facts["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert math.isfinite(facts["final_loss"]) and facts["eval_loss"] is not None
    assert facts["eval_loss_before"] is None and "qlora" in facts["eval_before_note"]
    assert facts["merged"]["qlora_note"] and facts["merged"]["modules_to_save"] == ["lm_head.weight", "model.embed_tokens.weight"]
    base, merged = load_file(tiny_llama3 / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert merged["lm_head.weight"].dtype == base["lm_head.weight"].dtype  # the 16-bit (here fp32) base's dtype
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


# ---------------------------------------------------------------- the chain through the pipeline


def test_pretrain_then_sft_then_merge_cached_per_stage(tiny_llama3: Path, peoples_daily: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from edgezh.train import dpo_stage
    from edgezh.recipe import DPOConfig

    training = (f"pretrain: {{lora: {{rank: 4, alpha: 8}}, max_steps: 2, batch_size: 2, embedding_learning_rate: 1.0e-3, {FAST}}}\n"
                f"sft: {{lora: {{rank: 4, alpha: 8}}, max_steps: 2, batch_size: 4, {FAST}}}\n")
    path = tiny_recipe(tmp_path / "src", tiny_llama3, peoples_daily[:6000], training)
    recipe = load_recipe(path, [f"output.root={tmp_path / 'builds'}"])
    plan = make_plan(recipe, until="merge")
    run_plan(plan)
    base, data, pre, sft, merged = (plan.step(n).artifact for n in ("base", "data", "pretrain", "sft", "merge"))

    assert pre.path.name == "03-pretrain" and pre.info["kind"] == "pretrain" and pre.info["steps"] == 2
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/chat_template.jinja",
            "adapter/adapter_model.safetensors", "trainer_log.jsonl", "loss.png"} <= set(pre.files)
    assert pre.info["template"] == "llama3" and pre.info["config_overrides"] == {}
    assert pre.info["eval_loss_before"] is not None and pre.info["eval_loss"] is not None
    assert math.isclose(pre.info["perplexity_after"], math.exp(pre.info["eval_loss"]), rel_tol=1e-3)
    # every token of every block is trained, but the first of a block has nothing to be predicted from
    assert pre.info["tokens"]["trained"] == pre.info["tokens"]["total"] - 2 * 2
    assert pre.info["merged"]["modules_to_save"] == ["lm_head.weight", "model.embed_tokens.weight"]

    start, first = load_file(tiny_llama3 / "model.safetensors"), load_file(pre.path / "model" / "model.safetensors")
    adapter = load_file(pre.path / "adapter" / "adapter_model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the modules_to_save copies are in the model
        assert torch.equal(first[name], adapter[f"base_model.model.{name}"]) and not torch.equal(first[name], start[name])

    # SFT trained the pretrain stage's model, and the merge folded SFT's adapter into it (not into the base)
    assert sft.info["trained_from"] == "pretrain" and sft.info["final_loss"] < sft.info["first_loss"]
    assert merged.info["base"] == str(pre.path / "model")
    folded = load_file(merged.path / "model.safetensors")
    assert torch.equal(folded["model.embed_tokens.weight"], first["model.embed_tokens.weight"])  # SFT's LoRA leaves it
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (folded[q] - first[q]).abs().max() > 0

    # DPO starts from the pretrain model too: without SFT afresh, after a LoRA SFT continuing its adapter on it
    cfg, out = DPOConfig(), tmp_path / "dpo-out"
    alone = dpo_stage.make_job(cfg, {"base": base, "data": data, "pretrain": pre}, out)
    after = dpo_stage.make_job(cfg, {"base": base, "data": data, "pretrain": pre, "sft": sft}, out)
    assert alone.model_dir == after.model_dir == str(pre.path / "model")
    assert alone.start_adapter is None and after.start_adapter == str(sft.path / "adapter")

    assert {s.status for s in make_plan(recipe, until="merge").steps} == {"cached"}
    changed = load_recipe(path, [f"output.root={tmp_path / 'builds'}", "sft.max_steps=3"])  # a changed sft section
    assert {s.name: s.status for s in make_plan(changed, until="merge").steps} == {
        "base": "cached", "data": "cached", "pretrain": "cached", "sft": "run", "merge": "run"}


# ---------------------------------------------------------------- acceptance: SmolLM2 on People's Daily


@pytest.mark.slow
def test_people_s_daily_lowers_the_perplexity_of_held_out_people_s_daily(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M (real weights, tied embedding) continues pre-training on People's Daily; the report shows the
    held-out People's Daily perplexity before (base), after pretrain and after SFT, which still trains."""
    recipe = load_recipe(QUICKSTART.parent / "quickstart-cpt.yaml", [
        f"output.root={tmp_path / 'builds'}", f"base.path={smollm2}", "data.sources.0.samples=200",
        "data.sources.1.samples=40", "pretrain.max_steps=8", "pretrain.save_steps=100", "sft.max_steps=4",
        "sft.save_steps=100", "export.gguf=null", "eval.texts=[heldout-text]", "eval.max_tokens=1024",
        "eval.chinese_reply_prompts=0"])
    plan = make_plan(recipe)
    run_plan(plan)
    pre, sft, evaluated = (plan.step(n).artifact for n in ("pretrain", "sft", "eval"))

    assert pre.info["eval_loss"] < pre.info["eval_loss_before"]
    assert pre.info["merged"]["modules_to_save"] == ["model.embed_tokens.weight"]  # SmolLM2 ties its head: one copy
    ppl = evaluated.info["perplexity"]
    assert ppl["pretrain"]["heldout-text"] < ppl["base"]["heldout-text"]
    assert math.isfinite(sft.info["final_loss"]) and sft.info["final_loss"] < sft.info["first_loss"]
    assert sft.info["trained_from"] == "pretrain" and math.isfinite(ppl["sft"]["heldout-text"])
    report = (plan.root / "report.md").read_text(encoding="utf-8")
    assert "Continued pre-training: perplexity on the held-out text (`heldout-text`) base" in report
