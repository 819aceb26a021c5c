"""DeepSpeed configs for the recipe's `deepspeed:` setting, checked before any process starts.

`zero2`, `zero3` and `zero2_offload` are built in; anything else is a path to a DeepSpeed JSON file.
The config handed to the Trainer keeps DeepSpeed's `"auto"` values (the HF Trainer fills them from its
arguments and the model). To validate it here, without a GPU, a copy is resolved the way the Trainer
does (batch sizes, optimizer and scheduler fields, bf16/fp16 from the resolved precision; the
model-dependent bucket sizes get a placeholder) and parsed by DeepSpeed's own `DeepSpeedConfig`.
Explicit values that disagree with the recipe, options this machine cannot run (offloading without a
GPU, fp16 without CUDA, NVMe) and DeepSpeed's own complaints become UserErrors.

The built-in configs have no `optimizer` section: the Trainer then creates its torch AdamW, so no
DeepSpeed op (CPU Adam) has to be compiled. `zero2_offload` sets `zero_force_ds_cpu_optimizer: false`
for the same reason.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from edgezh.errors import UserError

BUILTIN = ("zero2", "zero3", "zero2_offload")
INSTALL = "pip install 'edgezh[deepspeed]' -c constraints.txt"


def require(where: str = "deepspeed") -> None:
    """DeepSpeed must be installed for `deepspeed:` and for launching several processes."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{where}: DeepSpeed is not installed ({INSTALL})")

_COMMON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}

_ZERO: dict[str, dict[str, Any]] = {
    "zero2": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "allgather_partitions": True,
              "reduce_scatter": True, "allgather_bucket_size": 200_000_000, "reduce_bucket_size": "auto"},
    "zero3": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
              "stage3_gather_16bit_weights_on_model_save": True},
    "zero2_offload": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "allgather_partitions": True,
                      "reduce_scatter": True, "allgather_bucket_size": 200_000_000, "reduce_bucket_size": "auto",
                      "offload_optimizer": {"device": "cpu", "pin_memory": True}},
}

# The TrainingArguments defaults edgezh leaves alone (max_grad_norm, adam betas / epsilon).
_MAX_GRAD_NORM = 1.0
_ADAM_BETAS = [0.9, 0.999]
_ADAM_EPS = 1e-8
_PLACEHOLDER_HIDDEN = 4096  # for the hidden-size based "auto" bucket sizes, which depend on the model


def world_size(cfg) -> int:
    """Processes in the whole launch: processes per machine × machines."""
    return int(cfg.num_processes) * int(cfg.num_nodes)


def load(name_or_path: str, where: str = "deepspeed") -> dict:
    """The unresolved config: a built-in one, or the JSON file's object."""
    if name_or_path in BUILTIN:
        config = copy.deepcopy(_COMMON)
        config["zero_optimization"] = copy.deepcopy(_ZERO[name_or_path])
        if name_or_path == "zero2_offload":
            config["zero_force_ds_cpu_optimizer"] = False  # the Trainer's torch AdamW, no CPU Adam op to compile
        return config
    path = Path(os.path.expanduser(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{where}: cannot read the DeepSpeed config {path}: {exc.strerror or exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: the DeepSpeed config {path} is not valid JSON: {exc.msg} "
                        f"(line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: the DeepSpeed config {path} must be a JSON object, not {type(config).__name__}")
    return config


def _node(config: dict, dotted: str) -> tuple[dict | None, str]:
    *parents, key = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, key
    return (node if isinstance(node, dict) else None), key


def resolve_auto(config: dict, cfg, precision, world: int) -> tuple[dict, list[str]]:
    """A copy with the Trainer's "auto" values filled in (TrainingArguments from `cfg`); also the
    mismatches between explicit values and the recipe, as the Trainer would report them."""
    resolved = copy.deepcopy(config)
    mismatches: list[str] = []
    hidden = _PLACEHOLDER_HIDDEN

    def fill(dotted: str, value, recipe_key: str | None = None) -> None:
        node, key = _node(resolved, dotted)
        if node is None or key not in node:
            return
        if node[key] == "auto":
            node[key] = value
        elif recipe_key is not None and node[key] != value:
            mismatches.append(f"{dotted}={node[key]!r} but the recipe's {recipe_key} gives {value!r}")

    fill("train_micro_batch_size_per_gpu", cfg.batch_size, "batch_size")
    fill("gradient_accumulation_steps", cfg.grad_accum, "grad_accum")
    fill("train_batch_size", cfg.batch_size * cfg.grad_accum * world,
         f"batch_size × grad_accum × processes ({cfg.batch_size} × {cfg.grad_accum} × {world})")
    fill("gradient_clipping", _MAX_GRAD_NORM, "max_grad_norm (Trainer default)")
    fill("optimizer.params.lr", cfg.learning_rate, "learning_rate")
    fill("optimizer.params.betas", _ADAM_BETAS, "adam betas (Trainer default)")
    fill("optimizer.params.eps", _ADAM_EPS, "adam epsilon (Trainer default)")
    fill("optimizer.params.weight_decay", cfg.weight_decay, "weight_decay")
    fill("scheduler.params.warmup_min_lr", 0)
    fill("scheduler.params.warmup_max_lr", cfg.learning_rate, "learning_rate")
    fill("fp16.enabled", precision.name == "fp16", f"precision ({precision.describe()})")
    fill("bf16.enabled", precision.name == "bf16", f"precision ({precision.describe()})")
    # Known only once the model and the step count are: placeholders, the Trainer fills the real ones.
    fill("zero_optimization.reduce_bucket_size", hidden * hidden)
    fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden)
    fill("scheduler.params.total_num_steps", max(1, cfg.max_steps or 1000))
    fill("scheduler.params.warmup_num_steps", 1)
    return resolved, mismatches


def _auto_left(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_left(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _gpu_only(resolved: dict, name: str) -> list[str]:
    """Options that need CUDA, as messages (empty when everything runs on this CPU-only machine)."""
    found = []
    zero = resolved.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device") if isinstance(zero.get(key), dict) else None
        if device in ("cpu", "nvme"):
            found.append(f"zero_optimization.{key}.device={device} (offloading moves GPU memory to "
                         f"{'CPU memory' if device == 'cpu' else 'an NVMe drive'})")
    if (resolved.get("fp16") or {}).get("enabled") is True:
        found.append("fp16.enabled (fp16 mixed precision needs CUDA)")
    if (resolved.get("amp") or {}).get("enabled") is True:
        found.append("amp.enabled (apex AMP needs CUDA)")
    return found


def validate(resolved: dict, world: int, where: str) -> None:
    """DeepSpeed's own parser over a resolved config; its complaints become a UserError."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig

    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    class _Config(DeepSpeedConfig):
        """Without a process group DeepSpeedConfig assumes one process; the launch will have `world`."""

        def _configure_train_batch_size(self):
            self.world_size = world
            super()._configure_train_batch_size()

    try:
        _Config(copy.deepcopy(resolved))
    except UserError:
        raise
    except Exception as exc:  # DeepSpeed raises AssertionError, ValueError, pydantic's ValidationError, ...
        lines = [line.strip() for line in str(exc).splitlines()
                 if line.strip() and not line.strip().startswith("For further information")]
        message = "; ".join(lines) or type(exc).__name__
        raise UserError(f"{where}: DeepSpeed rejects the config: {message}") from None
    finally:
        ds_logger.setLevel(level)


def build_config(name_or_path: str, cfg, *, cuda: bool | None = None, gpu_bf16: bool | None = None,
                 where: str = "deepspeed") -> dict:
    """The DeepSpeed config for the recipe section `cfg` (TrainCommon), validated for this machine
    (hardware detected unless `cuda` / `gpu_bf16` are given). Returns the config with its "auto"
    values left for the Trainer. Raises UserError for anything DeepSpeed or this machine would refuse."""
    from edgezh.train import precision as train_precision

    require(where)
    config = load(name_or_path, where)
    precision = train_precision.resolve(cfg.precision, cuda=cuda, gpu_bf16=gpu_bf16,
                                        where=where.rsplit(".", 1)[0] + ".precision")
    world = world_size(cfg)
    resolved, mismatches = resolve_auto(config, cfg, precision, world)
    if mismatches:
        raise UserError(f"{where}: the DeepSpeed config {name_or_path} disagrees with the recipe: "
                        + "; ".join(mismatches) + ' (use "auto" or match the recipe)')
    left = _auto_left(resolved)
    if left:
        raise UserError(f"{where}: the DeepSpeed config {name_or_path} has \"auto\" values the Trainer does not fill: "
                        f"{', '.join(left)}")
    if not precision.on_gpu:
        gpu_only = _gpu_only(resolved, name_or_path)
        if gpu_only:
            raise UserError(f"{where}: {name_or_path} needs a CUDA GPU and this machine has none: {'; '.join(gpu_only)}. "
                            "Use zero2 or zero3 on a CPU")
    validate(resolved, world, where)
    return config
