"""Stage `modelfile`: one Ollama Modelfile per GGUF the build made."""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.export import modelfile
from edgezh.recipe import ModelfileConfig

VERSION = "1"


def gguf_files(inputs: dict[str, Artifact]) -> dict[str, str]:
    """type → file name of every GGUF of the build (the converted one and the quants)."""
    files = {inputs["gguf"].info["outtype"]: inputs["gguf"].info["file"]}
    if "quantize" in inputs:
        files.update({kind: q["file"] for kind, q in inputs["quantize"].info["quants"].items()})
    return files


def run(cfg: ModelfileConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    template = inputs["base"].info["template"]
    written, models = [], {}
    for kind, gguf_name in gguf_files(inputs).items():
        name = f"Modelfile.{kind}"
        stem = gguf_name.removesuffix(".gguf")
        (out / name).write_text(modelfile.render(gguf_name, template, cfg, title=f"{stem} — written by edgezh"), encoding="utf-8")
        written.append(name)
        models[kind] = stem.replace(f"-{kind}", f":{kind}")
    return {"template": template, "exports": written, "models": models}
