"""Find and check a base model's files: local folder, hub cache, GGUF file. Nothing is loaded here."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from edgezh.errors import UserError
from edgezh.jsonl import read_json
from edgezh.paths import cache_dir, resolve_path

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def local_source(value: str) -> Path:
    """The file or folder a `base.path` names (already made absolute by the recipe loader)."""
    return resolve_path(value, Path.cwd())


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json — not a Hugging Face model folder")
    config = read_json(path)
    archs = config.get("architectures") or []
    if not any(a in LLAMA_ARCHITECTURES for a in archs):
        raise UserError(f"{path}: architecture {archs or config.get('model_type')} is not supported; "
                        f"edgezh handles Llama-family checkpoints ({', '.join(LLAMA_ARCHITECTURES)})")
    return config


def check_safetensors(path: Path) -> dict:
    """Validate a .safetensors file's header and length; returns its header (name → dtype, shape, offsets)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise UserError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: corrupt safetensors header (not JSON)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise UserError(f"{path}: truncated or padded safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    header.pop("__metadata__", None)
    return header


def check_weights(folder: Path, allow_pickle: bool) -> int | None:
    """Check the weight files of an HF folder (pickle only with allow_pickle); returns the
    parameter count read from the safetensors headers (None for pickle weights)."""
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        params = 0
        for shard in shards:
            for tensor in check_safetensors(shard).values():
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                params += count
        return params
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise UserError(f"{folder}: weights are pickle files ({pickles[0].name}), which can run code when loaded; "
                        "convert them to safetensors, or pass --allow-pickle if you trust the source")
    if not pickles:
        raise UserError(f"{folder}: no weights (*.safetensors) found")
    return None


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")


def hub_snapshot(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """A hub model folder from the local hub cache, downloading only when the hub is reachable."""
    os.environ.setdefault("HF_HOME", str(cache_dir() / "huggingface"))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as exc:
        raise UserError(f"base.hub: {repo_id!r} is not a valid hub id ({exc})") from None
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UserError(f"base.hub: {repo_id} is not in the hub cache ({os.environ['HF_HOME']}) and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 — any network/auth failure becomes one line
        raise UserError(f"base.hub: {repo_id} is not in the hub cache and the hub could not be reached "
                        f"({type(exc).__name__}); download it where there is network or point base.path at a local copy") from None


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
