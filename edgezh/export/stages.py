"""Pipeline stages of the export half: merge → gguf → quantize → modelfile.

Each stage is a thin `run(cfg, inputs, out) -> info` over the library functions in this
package; `info["exports"]` names the files that `builds/<name>/export/` shows side by side.
"""

from __future__ import annotations

from pathlib import Path

from edgezh.artifacts import Artifact
from edgezh.errors import UserError
from edgezh.models.base_stage import model_dir


def weights_dir(inputs: dict[str, Artifact]) -> Path:
    """The 16-bit weights to export: the merged model when training ran, else the base."""
    if "merge" in inputs:
        return model_dir(inputs["merge"])
    return model_dir(inputs["base"])


def template_of(inputs: dict[str, Artifact]) -> str:
    return inputs["base"].info["template"]


def adapter_dir(training: Artifact) -> Path:
    """The LoRA adapter a training stage wrote (`adapter/` in its folder)."""
    folder = training.path / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{training.path}: no LoRA adapter (adapter/adapter_config.json); was it trained with method: full?")
    return folder
