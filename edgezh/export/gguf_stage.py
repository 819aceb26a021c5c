"""Stage `gguf`: write `<name>-<outtype>.gguf` from the final 16-bit weights."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export.gguf_writer import convert
from edgezh.export.stages import template_of, weights_dir

VERSION = "1"


def run(cfg: dict, inputs: dict[str, Artifact], out: Path) -> dict:
    name = f"{cfg['name']}-{cfg['outtype']}.gguf"
    facts = convert(weights_dir(inputs), out / name, cfg["outtype"], template=template_of(inputs), name=cfg["name"])
    return {**facts, "file": name, "template": template_of(inputs), "exports": [name]}
