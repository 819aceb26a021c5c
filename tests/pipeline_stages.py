"""A small real stage for runner tests: counts the tokens of the recipe's description with the
base model's tokenizer and writes them. It gives the runner a downstream stage to cache,
invalidate and rerun; its outputs are real files hashed like any other."""

from __future__ import annotations

import json
from pathlib import Path

from edgezh.layout import model_dir
from edgezh.stages import STAGES, StageSpec

VERSION = "1"

COUNT = StageSpec("count", "description", lambda r: True, lambda r: {"text": r.description}, lambda r: ["base"],
                  "pipeline_stages", "count the description's tokens")
TEST_STAGES = (STAGES[0], COUNT)


def run(cfg: dict, inputs: dict, out: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(inputs["base"]))
    ids = tokenizer(cfg["text"], add_special_tokens=False)["input_ids"]
    (out / "count.json").write_text(json.dumps({"text": cfg["text"], "ids": ids}, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"tokens": len(ids)}
