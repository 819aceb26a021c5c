"""`MODEL.gguf | BUILD_DIR` → which GGUF to run, its chat format, system prompt and sampling defaults.

A build folder (`builds/<name>/`, made by `edgezh build`) is read through its manifests:
`manifest.json` names each stage's folder; the base stage's `info.template` is the chat format;
the quantize stage's `info.quants` lists the quantized GGUFs (q4_k_m is the default pick), the
gguf stage's `info.file` the unquantized one; the modelfile stage's config holds the system
prompt and the sampling defaults the build recorded for Ollama.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgezh.errors import UserError

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


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
    manifest = _read_json(manifest_path)
    stages = manifest.get("stages") or {}

    def stage(name: str) -> dict[str, Any] | None:
        entry = stages.get(name)
        if not entry or not entry.get("folder"):
            return None
        return _read_json(build / entry["folder"] / "manifest.json") | {"_folder": build / entry["folder"]}

    files: dict[str, Path] = {}
    gguf = stage("gguf")
    if gguf is not None:
        info = gguf.get("info", {})
        if info.get("file"):
            files[info.get("outtype", "gguf")] = gguf["_folder"] / info["file"]
    quantize = stage("quantize")
    if quantize is not None:
        for kind, entry in (quantize.get("info", {}).get("quants") or {}).items():
            files[kind] = quantize["_folder"] / entry["file"]
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
