"""Stage `modelfile`: one Ollama Modelfile per GGUF the build made."""

from __future__ import annotations

from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.export import modelfile
from edgezh.recipe import ModelfileConfig

VERSION = "2"  # 2: no Modelfile for a plain twin


def run(cfg: ModelfileConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    template = layout.template_of(inputs)
    written, models = [], {}
    for kind, path in layout.build_gguf_files(inputs).items():
        if layout.is_plain_twin(kind):  # made to be compared in the report, not to be shipped
            continue
        name = f"Modelfile.{kind}"
        stem = path.name.removesuffix(".gguf")
        (out / name).write_text(modelfile.render(path.name, template, cfg, title=f"{stem} — written by edgezh"), encoding="utf-8")
        written.append(name)
        models[kind] = layout.ollama_tag(path.name, kind)
    return {"template": template, "exports": written, "models": models}
