"""Stage `gguf`: write `<name>-<outtype>.gguf` from the final 16-bit weights."""

from __future__ import annotations

from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.export.gguf_writer import convert

VERSION = "1"


def run(cfg: dict, inputs: dict[str, Artifact], out: Path) -> dict:
    name = layout.build_name(out)
    file = layout.gguf_name(name, cfg["outtype"])
    template = layout.template_of(inputs)
    facts = convert(layout.weights_dir(inputs), out / file, cfg["outtype"], template=template, name=name)
    return {**facts, "file": file, "template": template, "exports": [file]}
