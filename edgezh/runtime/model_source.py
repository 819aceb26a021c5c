"""`MODEL.gguf | BUILD_DIR` → which GGUF to run, its chat format, system prompt and sampling defaults.

A build folder (`builds/<name>/`, made by `edgezh build`) is read through its manifests:
`manifest.json` names each stage's folder; the base stage's `info.template` is the chat format;
the quantize stage's `info.quants` lists the quantized GGUFs (q4_k_m is the default pick), the
gguf stage's `info.file` the unquantized one; the modelfile stage's config holds the system
prompt and the sampling defaults the build recorded for Ollama.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgezh import layout
from edgezh.errors import UserError
from edgezh.jsonl import read_json

DEFAULT_QUANT = "q4_k_m"


@dataclass(frozen=True)
class ModelSource:
    path: Path
    """The GGUF file."""
    template: str | None = None
    """Chat format recorded by the build (None: detect from the GGUF)."""
    system: str | None = None
    """System prompt recorded by the build (None: the format's default)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Sampling defaults and context size recorded by the build: temperature, top_p, top_k,
    repeat_penalty, n_ctx."""
    build: Path | None = None
    """The build folder, when the model came from one."""
    kind: str | None = None
    """The GGUF's type in the build (q4_k_m, q8_0, f16, …)."""


def resolve(model: str | Path, quant: str | None = None) -> ModelSource:
    """A GGUF file as is, or the GGUF a build folder exported (`quant`, default q4_k_m)."""
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or build folder")
    if path.is_file():
        if quant:
            raise UserError(f"--quant picks a GGUF inside a build folder; {path} is already a file")
        return ModelSource(path=path)
    return from_build(path, quant)


def from_build(build: Path, quant: str | None = None) -> ModelSource:
    manifest_path = build / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{build}: a folder but not an edgezh build (no manifest.json); pass a .gguf file "
                        "or a builds/<name> folder")
    manifest = read_json(manifest_path)
    stages = manifest.get("stages") or {}

    def stage(name: str) -> dict[str, Any] | None:
        entry = stages.get(name)
        if not entry or not entry.get("folder"):
            return None
        return read_json(build / entry["folder"] / "manifest.json") | {"_folder": build / entry["folder"]}

    files: dict[str, Path] = {}
    for name in ("gguf", "quantize"):
        manifest = stage(name)
        if manifest is not None:
            info = manifest.get("info", {})
            found = layout.gguf_files(info, None) if name == "gguf" else layout.quant_files(info)
            files.update({kind: manifest["_folder"] / file for kind, file in found.items()})
    if not files:
        raise UserError(f"{build}: this build has no GGUF yet; add export.gguf to the recipe and run edgezh build")
    if quant is None:
        quant = DEFAULT_QUANT if DEFAULT_QUANT in files else next(
            (kind for kind in files if kind.startswith("q")), next(iter(files)))
    if quant not in files:
        raise UserError(f"{build}: no {quant} GGUF in this build (it has {', '.join(sorted(files))})")
    path = files[quant]
    if not path.is_file():
        exported = build / "export" / path.name
        if not exported.is_file():
            raise UserError(f"{path}: listed in the build's manifest but missing; rerun edgezh build")
        path = exported

    base = stage("base")
    template = (base or {}).get("info", {}).get("template")
    system = None
    defaults: dict[str, Any] = {}
    modelfile = stage("modelfile")
    if modelfile is not None:
        config = modelfile.get("config", {})
        system = config.get("system") or None
        template = template or modelfile.get("info", {}).get("template")
        for key in ("temperature", "top_p", "top_k", "repeat_penalty"):
            if config.get(key) is not None:
                defaults[key] = config[key]
        if config.get("num_ctx"):
            defaults["n_ctx"] = int(config["num_ctx"])
    return ModelSource(path=path, template=template, system=system, defaults=defaults, build=build, kind=quant)
