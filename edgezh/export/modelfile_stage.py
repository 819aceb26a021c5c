"""Stage `modelfile`: one Ollama Modelfile per GGUF the build made, and with an adapter GGUF (stage `adapter`)
one per base it can go on: `Modelfile.lora-<kind>` (FROM ./<name>-base-<kind>.gguf, ADAPTER ./<name>-lora-….gguf)
for each base GGUF, `Modelfile.lora` (FROM the recipe's `export.adapter.ollama_base`) when one is named."""

from __future__ import annotations

from pathlib import Path

from edgezh import layout
from edgezh.artifacts import Artifact
from edgezh.export import modelfile
from edgezh.recipe import ModelfileConfig

VERSION = "3"  # 2: no Modelfile for a plain twin; 3: ADAPTER Modelfiles


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
    if "adapter" in inputs:
        adapter = inputs["adapter"].info
        name = layout.build_name(out)
        targets = {f"lora-{kind}": base["file"] for kind, base in adapter["bases"].items()}
        if adapter.get("ollama_base"):
            targets["lora"] = adapter["ollama_base"]
        for kind, source in targets.items():
            title = f"{name}: {adapter['file']} on {source} — written by edgezh"
            (out / f"Modelfile.{kind}").write_text(modelfile.render(source, template, cfg, title=title, adapter=adapter["file"]),
                                                   encoding="utf-8")
            written.append(f"Modelfile.{kind}")
            models[kind] = f"{name}-{kind.replace('-', ':', 1)}" if "-" in kind else f"{name}-lora"
    return {"template": template, "exports": written, "models": models}
