"""Stage `gptq`: a 4-bit GPTQ checkpoint calibrated on the recipe's own training data."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export.gptq import calibration_texts, quantize_gptq, read_conversations
from edgezh.layout import template_of, weights_dir
from edgezh.progress import status
from edgezh.recipe import GPTQConfig

VERSION = "1"


def run(cfg: GPTQConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    conversations = read_conversations(inputs["data"].file("train.jsonl"))
    texts = calibration_texts(conversations, template_of(inputs), cfg.samples)
    with status(f"GPTQModel: {cfg.bits}-bit, group {cfg.group_size}, {len(texts)} calibration samples"):
        return quantize_gptq(weights_dir(inputs), out, texts, bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act)
