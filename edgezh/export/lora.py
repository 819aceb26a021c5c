"""Read a peft LoRA adapter folder lazily and fold it into base tensors one at a time.

What peft (0.21) writes with `save_pretrained` and what this module relies on:

- `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `use_rslora`, `rank_pattern` /
  `alpha_pattern` (regex → value, matched against the module path like peft's `get_pattern_key`),
  `fan_in_fan_out`, `modules_to_save`, `base_model_name_or_path`, and the variant switches
  (`use_dora`, `lora_bias`, …) that change what a merge means.
- `adapter_model.safetensors`, keys prefixed `base_model.model.` then the HF module path:
  - Linear LoRA: `<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r);
  - Embedding LoRA: `<module>.lora_embedding_A` (r, num_embeddings), `<module>.lora_embedding_B`
    (dim, r) — parameters, so no `.weight` suffix; the delta is (B @ A)ᵀ;
  - `modules_to_save`: the trained copy under the plain module name (`lm_head.weight`);
  - `modules_to_save` on a base that ties lm_head to embed_tokens, trained with `ensure_weight_tying`:
    one shared copy, saved under both names (`drop_tied_head` keeps the embedding's);
  - a targeted embedding is also saved in full as `<module>.base_layer.weight`
    (`save_embedding_layers="auto"`); peft loads it back into the base layer, so it replaces
    the base tensor before the delta is added.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgezh.errors import UserError
from edgezh.jsonl import read_json
from edgezh.models.resolve import check_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config fields that turn on something a plain W + scale·B·A merge cannot reproduce
UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora: true) rescales each merged weight by a learned magnitude",
    "lora_bias": "a bias on lora_B (lora_bias: true)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication) changes the model's structure",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) cannot be merged",
    "velora_config": "the VeLoRA variant (velora_config)",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "the KaSA variant (kasa_config)",
}
# init_lora_weights values that rewrite the base weights at initialisation (unless converted on save)
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])$")


def _pattern_value(patterns: dict, module: str, default):
    """peft's `get_pattern_key`: the first pattern key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Lora:
    module: str       # HF module path, e.g. model.layers.0.self_attn.q_proj
    a_key: str        # adapter file keys
    b_key: str
    embedding: bool
    scale: float
    shape: tuple[int, ...]  # shape of the delta, i.e. of the base tensor it is added to


class LoraAdapter:
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors), read lazily."""

    def __init__(self, folder: Path, config: dict, header: dict):
        self.folder = folder
        self.config = config
        self.base_model: str | None = config.get("base_model_name_or_path")
        self._file = None
        self._header = header
        self._loras: dict[str, _Lora] = {}        # HF tensor name → LoRA factors
        self._replaced: dict[str, str] = {}       # HF tensor name → adapter key of its trained copy
        self.modules_to_save: list[str] = []      # HF tensor names replaced by a modules_to_save copy
        self._index(header)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, folder: Path) -> "LoraAdapter":
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: adapter folder not found")
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise UserError(f"{folder}: no {CONFIG_NAME} — not a peft adapter folder")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            hint = (" (only adapter_model.bin, a pickle file: re-save the adapter with safe_serialization=True)"
                    if (folder / "adapter_model.bin").is_file() else "")
            raise UserError(f"{folder}: no {WEIGHTS_NAME}{hint}")
        config = read_json(config_path)
        peft_type = str(config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise UserError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged")
        problems = [why for flag, why in UNSUPPORTED_FLAGS.items() if config.get(flag)]
        init = str(config.get("init_lora_weights", True)).lower()
        if init.startswith(BASE_MUTATING_INITS):
            problems.append(f"init_lora_weights: {config['init_lora_weights']} changed the base weights when training "
                            "began (re-save the adapter with peft's path_initial_model_for_weight_conversion to get a "
                            "plain LoRA adapter)")
        if problems:
            raise UserError(f"{config_path}: unsupported adapter option(s) for merging: " + "; ".join(problems))
        return cls(folder, config, check_safetensors(weights))

    def _index(self, header: dict) -> None:
        cfg = self.config
        where = self.folder / WEIGHTS_NAME
        factors: dict[tuple[str, bool], dict[str, str]] = {}
        for key in header:
            name = key.removeprefix(PREFIX)
            if m := _LINEAR.match(name):
                factors.setdefault((m["module"], False), {})[m["ab"]] = key
            elif m := _EMBEDDING.match(name):
                factors.setdefault((m["module"], True), {})[m["ab"]] = key
            elif ".lora_" in name or "lora_magnitude_vector" in name or "trainable_tokens" in name:
                raise UserError(f"{where}: tensor {key} is not plain LoRA; merging it is not supported")
            else:
                plain = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                if plain in self._replaced:
                    raise UserError(f"{where}: two tensors ({self._replaced[plain]}, {key}) replace {plain}")
                self._replaced[plain] = key
                if ".base_layer." not in name:
                    self.modules_to_save.append(plain)
        for (module, embedding), ab in sorted(factors.items()):
            if set(ab) != {"A", "B"}:
                missing = "B" if "A" in ab else "A"
                raise UserError(f"{where}: {module} has lora_{'embedding_' if embedding else ''}"
                                f"{'A' if missing == 'B' else 'B'} but no matching {missing} factor")
            a_shape, b_shape = header[ab["A"]]["shape"], header[ab["B"]]["shape"]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise UserError(f"{where}: {module}: LoRA factors of shapes A {a_shape} and B {b_shape} do not fit together "
                                "(a ZeRO-3/FSDP save without gathering the shards?)")
            rank = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
            if rank != a_shape[0]:
                raise UserError(f"{where}: {module} has rank {a_shape[0]} but adapter_config says r = {rank}")
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            delta = (b_shape[0], a_shape[1])
            if embedding or cfg.get("fan_in_fan_out"):
                delta = delta[::-1]
            name = f"{module}.weight"
            self._loras[name] = _Lora(module, ab["A"], ab["B"], embedding, scale, tuple(delta))
        self.modules_to_save.sort()

    def _tensor(self, key: str) -> torch.Tensor:
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.folder / WEIGHTS_NAME), framework="pt")
        return self._file.get_tensor(key)

    def close(self) -> None:
        self._file = None

    def drop_tied_head(self) -> bool:
        """Drop a head copy that is the embedding's tied twin: with peft's `ensure_weight_tying` on a tied base, one
        trained tensor is saved under both names (`lm_head.weight`, `model.embed_tokens.weight`), so a tied base
        takes the embedding's alone. Returns whether it was dropped."""
        head, embedding = "lm_head.weight", "model.embed_tokens.weight"
        if not self.config.get("ensure_weight_tying") or head in self._loras \
                or head not in self._replaced or embedding not in self._replaced:
            return False
        del self._replaced[head]
        self.modules_to_save = [name for name in self.modules_to_save if name != head]
        return True

    # ------------------------------------------------------------------ queries

    def targets(self) -> set[str]:
        """HF tensor names the adapter changes (LoRA deltas and replaced copies)."""
        return set(self._loras) | set(self._replaced)

    def adapter_shape(self, hf_name: str) -> tuple[int, ...] | None:
        """The shape the adapter gives `hf_name` (None when it does not change it)."""
        if hf_name in self._replaced:
            return tuple(self._header[self._replaced[hf_name]]["shape"])
        if hf_name in self._loras:
            return self._loras[hf_name].shape
        return None

    def _check_shape(self, hf_name: str, what: str, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(base_shape):
            raise UserError(f"adapter {self.folder}: {hf_name}: the adapter's {what} has shape {list(shape)} but the "
                            f"base model's tensor has shape {list(base_shape)} — the adapter was trained on another model")

    def check_shapes(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Every changed tensor's shape must equal the base's (checked from headers, before any merging)."""
        for name in sorted(self.targets()):
            if name in base_shapes:
                if name in self._replaced:
                    self._check_shape(name, "trained copy", self.adapter_shape(name), base_shapes[name])
                if name in self._loras:
                    self._check_shape(name, "LoRA update (B @ A)", self._loras[name].shape, base_shapes[name])

    def check_covers(self, base_names: set[str]) -> None:
        """Every tensor the adapter changes must exist in the base, else it was made for another model."""
        missing = sorted(self.targets() - set(base_names))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"adapter {self.folder} changes {len(missing)} tensor(s) the base model does not have "
                            f"({shown}); it was made for another model (adapter_config names base "
                            f"{self.base_model!r})")

    # ------------------------------------------------------------------ merging

    def merged(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` with the adapter folded in, computed and returned in fp32: W + scale · B @ A
        (transposed for embeddings and fan_in_fan_out); a modules_to_save copy replaces W."""
        lora = self._loras.get(hf_name)
        weight = tensor.to(torch.float32, copy=lora is not None)  # a copy when it is changed in place below
        if hf_name in self._replaced:
            copy = self._tensor(self._replaced[hf_name])
            self._check_shape(hf_name, "trained copy", tuple(copy.shape), tuple(tensor.shape))
            weight = copy.to(torch.float32, copy=True)
        if lora is not None:
            self._check_shape(hf_name, "LoRA update (B @ A)", lora.shape, tuple(tensor.shape))
            a = self._tensor(lora.a_key).to(torch.float32)
            b = self._tensor(lora.b_key).to(torch.float32)
            delta = b @ a   # the operations and their order are peft's get_delta_weight + merge: fp32 results match
            if lora.embedding or self.config.get("fan_in_fan_out"):
                delta = delta.T
            weight.add_(delta.mul_(lora.scale))
        return weight
