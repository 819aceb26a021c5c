"""Stage `pretrain`: continued pre-training (增量预训练) of the base on the data artifact's text blocks.

Trains on `text_train.parquet` (every token), evaluates on `text_eval.parquet` (held-out documents)
before and after, and writes a whole model that the next training stage starts from:

- `model/`: an HF folder. With `lora` / `qlora` it is the base's 16-bit weights with the adapter folded
  in (`edgezh.export.merge.merge`, `modules_to_save` copies included; a QLoRA adapter goes into the
  original 16-bit weights, not a dequantized 4-bit copy); with `full` it is the trained model. The
  base's tokenizer and chat template files come along, so `sft` / `dpo` load it like a base.
- `adapter/` (LoRA): what was trained, as a plain peft folder.
- `trainer_log.jsonl`, `loss.png`, `learning_rate.png`.

The manifest's `info` holds what the next stage needs besides the folder: `template` (the base's chat
format, which every later stage keeps), `config_overrides` (none: continued pre-training keeps the
base's context), and the eval loss and perplexity on the held-out blocks before (`eval_loss_before`,
`perplexity_before`) and after (`eval_loss`, `perplexity_after`) training.
"""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact, scratch_dir
from edgezh.errors import UserError
from edgezh.layout import model_dir
from edgezh.recipe import PretrainConfig
from edgezh.train.job import TrainJob
from edgezh.train.sft_stage import data_facts, execute

VERSION = "1"
MODEL = "model"


def make_job(cfg: PretrainConfig, inputs: dict[str, Artifact], out: Path) -> TrainJob:
    data = inputs["data"]
    template, pad_token_id, data_max = data_facts(data, inputs["base"], "pretrain")
    if not data.info.get("text_train"):
        raise UserError(f"pretrain: the data artifact {data.path} has no text blocks (text_train.parquet); add a "
                        "`format: text` source (or `builtin: peoples-daily`) to data.sources")
    return TrainJob(kind="pretrain", config=cfg.model_dump(mode="json"), model_dir=str(model_dir(inputs["base"])),
                    data_dir=str(data.path), template=template, pad_token_id=pad_token_id,
                    max_length=cfg.max_length or data_max, out=str(out), scratch=str(scratch_dir(out, cfg, inputs)))


def run(cfg: PretrainConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    from edgezh.export.merge import merge

    facts = execute(make_job(cfg, inputs, out), cfg, "pretrain")
    if cfg.method != "full":  # fold the adapter into the 16-bit base: the next stage needs a whole model
        merged = merge(model_dir(inputs["base"]), out / "adapter", out / MODEL, trained_4bit=cfg.method == "qlora")
        facts["merged"] = {k: merged[k] for k in ("tensors_changed", "modules_to_save", "dtype", "shards", "qlora_note")}
    facts.update({"model": MODEL, "trained_from": "base", "text_train": inputs["data"].info.get("text_train"),
                  "text_eval": inputs["data"].info.get("text_eval")})
    return facts

