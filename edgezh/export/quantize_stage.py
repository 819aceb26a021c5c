"""Stage `quantize`: llama.cpp quantizes the converted GGUF into each requested type."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export.quantize import quantize
from edgezh.progress import status

VERSION = "1"


def run(cfg: dict, inputs: dict[str, Artifact], out: Path) -> dict:
    source = inputs["gguf"].file(inputs["gguf"].info["file"])
    results = {}
    for qtype in cfg["types"]:
        name = f"{cfg['name']}-{qtype}.gguf"
        with status(f"llama.cpp quantize → {name}"):
            results[qtype] = quantize(source, out / name, qtype)
    return {"quants": results, "exports": [r["file"] for r in results.values()]}
