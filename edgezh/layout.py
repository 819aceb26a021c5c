"""Where artifacts keep their files, and what those files are called: the one place that knows.

Every stage, command and runtime lookup that needs a model folder, an adapter, a GGUF of a build or
an Ollama tag asks here, so a layout change is one edit:

| artifact | where |
|---|---|
| base / merge | an HF folder: the artifact itself, or the folder `info.model_path` references |
| pretrain | `model/` (a whole HF model: the LoRA folded into the base, or the fully trained weights); `adapter/` for LoRA |
| sft / dpo | `adapter/` (peft LoRA) or, for `method: full`, `model/`; `info.trained_from` the stage whose model it trained |
| gguf | `info.file` (`<name>-<outtype>.gguf`), `info.outtype` |
| imatrix | `info.file` (`<name>.imatrix.gguf`, llama.cpp's imatrix GGUF) |
| quantize | `info.quants[<kind>].file` per kind (`<name>-<kind>.gguf`) |
| modelfile | `Modelfile.<kind>`, `info.models[<kind>]` the Ollama tag |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from edgezh.errors import UserError

# A precision suffix a converted GGUF's stem carries (`name-f16.gguf`), dropped when naming its quants.
PRECISION_SUFFIXES = ("-f32", "-f16", "-bf16")


def build_name(out: Path) -> str:
    """The build's name, which its files are named after: a stage folder is `<root>/<name>/<NN-stage>[.tmp]`."""
    return Path(out).resolve().parent.name


def model_dir(artifact: Any) -> Path:
    """Where a base or merge artifact's HF files are: the artifact itself, or the folder it references."""
    return Path(artifact.info["model_path"]) if artifact.info.get("model_path") else artifact.path


def fingerprint_folder(source: Path) -> dict:
    """Identity of outside files a stage reads (name, size, mtime), hashed into its cache key."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return {"path": str(source), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def weights_dir(inputs: Mapping[str, Any]) -> Path:
    """The 16-bit weights to export: the merged model when training ran, else the continued pre-training's
    model, else the base."""
    if "merge" not in inputs and "pretrain" in inputs:
        return pretrained_dir(inputs["pretrain"])
    return model_dir(inputs["merge"] if "merge" in inputs else inputs["base"])


def pretrained_dir(pretrain: Any) -> Path:
    """The whole model the pretrain stage wrote (`model/`)."""
    return pretrain.path / "model"


def start_stage(inputs: Mapping[str, Any]) -> str:
    """The stage whose model a training stage that starts afresh trains: `pretrain` when the build has it, else `base`."""
    return "pretrain" if "pretrain" in inputs else "base"


def stage_model_dir(inputs: Mapping[str, Any], stage: str) -> Path:
    """The HF folder of the model stage `stage` stands for (a training stage's `info.trained_from`): the base's
    folder, the pretrain stage's `model/`, or a full fine-tune's `model/`."""
    if stage not in inputs:
        raise UserError(f"the model was trained from stage `{stage}`, which is not among this stage's inputs "
                        f"({', '.join(inputs)}); rebuild it")
    if stage == "base":
        return model_dir(inputs["base"])
    if stage == "pretrain":
        return pretrained_dir(inputs["pretrain"])
    return full_model_dir(inputs[stage])


def template_of(inputs: Mapping[str, Any]) -> str:
    """The chat format of the build (the base stage decides it; every later stage follows)."""
    return inputs["base"].info["template"]


def adapter_dir(training: Any) -> Path:
    """The LoRA adapter a training stage wrote (`adapter/` in its folder)."""
    folder = training.path / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{training.path}: no LoRA adapter (adapter/adapter_config.json); was it trained with method: full?")
    return folder


def full_model_dir(training: Any) -> Path:
    """The whole model a `method: full` training stage wrote."""
    return training.path / "model"


def gguf_name(name: str, kind: str) -> str:
    """`<name>-<kind>.gguf`: the file name of a build's GGUF of one type (f16, q4_k_m, …)."""
    return f"{name}-{kind}.gguf"


def imatrix_name(name: str) -> str:
    """The importance matrix a build computed, in llama.cpp's imatrix GGUF format."""
    return f"{name}.imatrix.gguf"


def plain_kind(kind: str) -> str:
    """The kind of a type built without the importance matrix beside the one with it."""
    return f"{kind}-plain"


def is_plain_twin(kind: str) -> bool:
    """Whether a kind is the plain twin of another (same tensor types, so the same speed)."""
    return kind.endswith("-plain")


FIT_KIND = "fit"  # the kind of the mix `export.gguf.fit` chose


def quant_stem(source: Path) -> str:
    """The name a GGUF's quants are called after: its stem without a precision suffix."""
    stem = source.name.removesuffix(".gguf")
    for suffix in PRECISION_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem


def ollama_tag(gguf_file: str, kind: str | None) -> str:
    """The Ollama model name for a GGUF: `<name>-<kind>.gguf` → `<name>:<kind>`."""
    stem = gguf_file.removesuffix(".gguf")
    if kind and stem.endswith(f"-{kind}"):
        return f"{stem.removesuffix(f'-{kind}')}:{kind}"
    return stem


def kind_of(gguf_file: str) -> str:
    """The type a GGUF's file name ends in (`x-q4_k_m.gguf` → `q4_k_m`), else `gguf`."""
    stem = gguf_file.removesuffix(".gguf")
    return stem.rsplit("-", 1)[-1] if "-" in stem else "gguf"


def quants(quantize_info: Mapping[str, Any]) -> dict[str, dict]:
    """kind → facts (file, bytes, bits_per_weight, tensor types, imatrix…) of every quant in a quantize
    manifest's `info`, in the order built."""
    return dict(quantize_info.get("quants") or {})


def quant_files(quantize_info: Mapping[str, Any]) -> dict[str, str]:
    """kind → file name of every quant in a quantize manifest's `info`."""
    return {kind: q["file"] for kind, q in quants(quantize_info).items()}


def build_artifacts(build: Path, stages: tuple[str, ...]) -> tuple[dict[str, Any], dict]:
    """The finished artifacts of `stages` in a build folder (by its manifest.json), and that manifest."""
    from edgezh.artifacts import Artifact
    from edgezh.jsonl import read_json

    path = Path(build) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{build}: a folder but not an edgezh build (no manifest.json); pass a .gguf file "
                        "or a builds/<name> folder")
    manifest = read_json(path)
    found = {}
    for stage in stages:
        entry = (manifest.get("stages") or {}).get(stage)
        if entry and entry.get("folder") and (Path(build) / entry["folder"] / "manifest.json").is_file():
            found[stage] = Artifact.load(Path(build) / entry["folder"])
    return found, manifest


def gguf_files(gguf_info: Mapping[str, Any] | None, quantize_info: Mapping[str, Any] | None) -> dict[str, str]:
    """kind → file name of every GGUF of a build: the converted one, then the quants (in the order built)."""
    files: dict[str, str] = {}
    if gguf_info and gguf_info.get("file"):
        files[gguf_info.get("outtype", "gguf")] = gguf_info["file"]
    if quantize_info:
        files.update(quant_files(quantize_info))
    return files


def build_gguf_files(inputs: Mapping[str, Any]) -> dict[str, Path]:
    """kind → path of every GGUF among a stage's input artifacts (`gguf`, `quantize`)."""
    paths = {}
    for stage in ("gguf", "quantize"):
        if stage in inputs:
            info = inputs[stage].info
            files = gguf_files(info, None) if stage == "gguf" else quant_files(info)
            paths.update({kind: inputs[stage].path / name for kind, name in files.items()})
    return paths
