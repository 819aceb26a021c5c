"""Fold a LoRA adapter into the original 16-bit (or fp32) base, shard by shard, tensor by tensor.

The base is never loaded as a model: the shards' headers are validated and the output shards
planned first; then each output file is written tensor by tensor (`edgezh.export.tensor_stream`):
a tensor the adapter changes is read whole and merged in fp32 (`LoraAdapter.merged`), every other
tensor is copied (and cast when the dtype changes) in chunks of rows. Peak memory ≈ the adapter +
one adapted tensor's fp32 temporaries, whatever the size of the model or of its shards.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from edgezh.errors import UserError
from edgezh.export.lora import LoraAdapter
from edgezh.export.tensor_stream import CODES, SafetensorsWriter, read_tensor, row_chunks
from edgezh.models.context import context_changes
from edgezh.models.resolve import PICKLE_SUFFIXES, check_safetensors, read_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOAT_CODES = {code: CODES[code] for code in ("F16", "BF16", "F32", "F64")}
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
INDEX_NAME = "model.safetensors.index.json"


def base_shards(base_dir: Path) -> list[Path]:
    """The safetensors files holding a base model's weights (from its index when it has one)."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: not a safetensors index ({exc})") from None
        shards = [base_dir / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise UserError(f"{index} lists shard(s) that are not there: {', '.join(missing)}")
        return shards
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        pickles = [p.name for p in base_dir.iterdir() if p.suffix in PICKLE_SUFFIXES] if base_dir.is_dir() else []
        hint = f" (only pickle weights: {pickles[0]}; convert them to safetensors)" if pickles else ""
        raise UserError(f"{base_dir}: no safetensors weights to merge into{hint}")
    return shards


def unquantized_config(base_dir: Path, instead: str) -> dict:
    """The base's config.json, refused (a UserError ending with `instead`) when the checkpoint is quantized:
    adapters go onto the 16-bit weights they were trained on."""
    config = read_config(base_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserError(f"{base_dir}: the base is quantized ({method}); {instead}")
    return config


def _trained_4bit_recorded(adapter_dir: Path) -> bool:
    """Whether a training manifest beside the adapter (its artifact folder or the one above) says QLoRA."""
    for folder in (adapter_dir, adapter_dir.parent):
        path = folder / "manifest.json"
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(manifest, dict):
            continue
        for section in ("config", "info"):
            value = manifest.get(section)
            if isinstance(value, dict) and value.get("method") == "qlora":
                return True
    return False


def _plan_shards(entries: list[tuple[str, int]], limit: int) -> list[int]:
    """Output shard number of each (name, bytes) entry, in order, no shard over `limit` unless one tensor is."""
    groups, current, size = [], 0, 0
    for _, nbytes in entries:
        if size and size + nbytes > limit:
            current, size = current + 1, 0
        groups.append(current)
        size += nbytes
    return groups


@dataclass
class MergePlan:
    """Everything the writing half needs, found by reading headers only: which tensor goes to which output
    shard in which dtype, and which ones the adapter changes."""

    base_dir: Path
    adapter_dir: Path
    adapter: LoraAdapter
    config: dict
    dtype: str
    flat: list[tuple[Path, int, str, dict]]  # (shard, data start, tensor name, header entry), in file order
    groups: list[int]  # output shard number of each flat entry
    names: list[str]  # output shard file names
    plans: list[list[tuple[str, torch.dtype, tuple]]]  # per output shard: (name, dtype, shape)
    nbytes: list[int]  # output bytes of each flat entry

    def out_dtype(self, code: str) -> torch.dtype | None:
        if code not in FLOAT_CODES:
            return None  # integer tensors are kept as they are
        return FLOAT_CODES[code] if self.dtype == "auto" else DTYPES[self.dtype]


def plan_merge(base_dir: Path, adapter_dir: Path, *, dtype: str = "auto", shard_size_mb: int = 2000) -> MergePlan:
    """Validate the base and the adapter and plan the output shards, reading only headers."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"merge dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if shard_size_mb <= 0:
        raise UserError(f"merge shard_size_mb must be positive, not {shard_size_mb}")
    config = unquantized_config(base_dir, "merge the adapter into the original 16-bit checkpoint it was trained from")
    adapter = LoraAdapter.load(adapter_dir)
    layout: list[tuple[Path, int, list[tuple[str, dict]]]] = []
    owner: dict[str, Path] = {}
    for shard in base_shards(base_dir):
        header = check_safetensors(shard)
        unknown = sorted({info["dtype"] for info in header.values()} - set(CODES))
        if unknown:
            raise UserError(f"{shard}: tensor dtype(s) {', '.join(unknown)} are not supported by the merge")
        with open(shard, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name in header:
            if name in owner:
                raise UserError(f"{base_dir}: tensor {name} is in both {owner[name].name} and {shard.name}")
            owner[name] = shard
        layout.append((shard, data_start, sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])))
    base_shapes = {name: tuple(info["shape"]) for _, _, items in layout for name, info in items}
    if config.get("tie_word_embeddings") and "lm_head.weight" in adapter.targets() and "lm_head.weight" not in base_shapes \
            and not adapter.drop_tied_head():
        raise UserError(f"adapter {adapter_dir} changes lm_head, but {base_dir} ties lm_head to embed_tokens "
                        "(tie_word_embeddings: true); merging an untied lm_head into a tied model is not supported")
    adapter.check_covers(set(base_shapes))
    adapter.check_shapes(base_shapes)

    plan = MergePlan(base_dir, adapter_dir, adapter, config, dtype,
                     [(shard, start, name, info) for shard, start, items in layout for name, info in items], [], [], [], [])
    for _, _, name, info in plan.flat:
        numel = 1
        for dim in info["shape"]:
            numel *= dim
        plan.nbytes.append(numel * (plan.out_dtype(info["dtype"]) or CODES[info["dtype"]]).itemsize)
    plan.groups = _plan_shards([(entry[2], n) for entry, n in zip(plan.flat, plan.nbytes)], shard_size_mb * 2**20)
    n_out = plan.groups[-1] + 1 if plan.groups else 0
    if n_out == 0:
        raise UserError(f"{base_dir}: the safetensors files hold no tensors")
    plan.names = ["model.safetensors"] if n_out == 1 else \
        [f"model-{i + 1:05d}-of-{n_out:05d}.safetensors" for i in range(n_out)]
    plan.plans = [[] for _ in range(n_out)]
    for position, (_, _, name, info) in enumerate(plan.flat):
        plan.plans[plan.groups[position]].append((name, plan.out_dtype(info["dtype"]) or CODES[info["dtype"]], tuple(info["shape"])))
    return plan


def merge(base_dir: Path, adapter_dir: Path, out: Path, *, dtype: str = "auto", shard_size_mb: int = 2000,
          trained_4bit: bool | None = None, config_overrides: dict | None = None) -> dict:
    """Write `base + adapter` as an HF model folder into `out` (a fresh folder); returns facts for the manifest.

    `trained_4bit`: the adapter was trained over a 4-bit (QLoRA) copy of this base; None reads it from
    a training manifest beside the adapter (`method: qlora`), since adapter_config does not record it.
    `config_overrides`: the context extension the adapter was trained with (rope_theta,
    max_position_embeddings), written into the merged config.
    """
    plan = plan_merge(base_dir, adapter_dir, dtype=dtype, shard_size_mb=shard_size_mb)
    changed, written_dtypes = write_merge(plan, Path(out), config_overrides or {})
    if trained_4bit is None:
        trained_4bit = _trained_4bit_recorded(plan.adapter_dir)
    note = None
    if trained_4bit:
        note = (f"the adapter was trained over a 4-bit (QLoRA) copy of the base; it was merged into the original "
                f"16-bit weights in {plan.base_dir}, not into a dequantized 4-bit model, so the merged model can differ "
                "slightly from the one evaluated during training")
    return {
        "tensors_changed": changed,
        "modules_to_save": list(plan.adapter.modules_to_save),
        "base": str(plan.base_dir),
        "adapter": str(plan.adapter_dir),
        "dtype": dtype if dtype != "auto" else (written_dtypes.pop() if len(written_dtypes) == 1
                                                else "mixed: " + ", ".join(sorted(written_dtypes))),
        "shards": len(plan.names),
        "qlora_note": note,
        "config_overrides": dict(config_overrides or {}),
    }


def write_merge(plan: MergePlan, out: Path, config_overrides: dict) -> tuple[int, set[str]]:
    """Write the planned output shards tensor by tensor, then the config and tokenizer files; on any failure
    remove what was written. Returns (tensors changed, float dtypes written)."""
    from edgezh.progress import track

    created = not out.exists()
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".edgezh-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{out}: cannot write the merged model there ({exc.strerror or exc})") from None

    adapter, names, config = plan.adapter, plan.names, dict(plan.config)
    changed, written_dtypes, weight_map, total_size = 0, set(), {}, 0
    targets = adapter.targets()
    writer: SafetensorsWriter | None = None
    handles: dict[Path, object] = {}
    try:
        for position, (shard, data_start, name, info) in enumerate(
                track(plan.flat, f"merging {plan.adapter_dir.name} into {plan.base_dir.name}")):
            group = plan.groups[position]
            if writer is None or writer.path != out / names[group]:
                if writer is not None:
                    writer.close()
                written.append(out / names[group])
                writer = SafetensorsWriter(out / names[group], plan.plans[group])
            if shard not in handles:
                handles[shard] = open(shard, "rb", buffering=0)
            target = plan.out_dtype(info["dtype"])
            if target is not None:
                written_dtypes.add(str(target).removeprefix("torch."))
            writer.begin(name)
            where = f"{shard}: tensor {name}"
            if name in targets:
                merged = adapter.merged(name, read_tensor(handles[shard], data_start, info, where))
                writer.write(merged.to(target) if target is not None else merged)
                changed += 1
                del merged
            else:
                for chunk in row_chunks(handles[shard], data_start, info, where):
                    writer.write(chunk.to(target) if target is not None else chunk)
            weight_map[name] = names[group]
            total_size += plan.nbytes[position]
        if writer is not None:
            writer.close()
        adapter.close()
        if len(names) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            written.append(out / INDEX_NAME)
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config.update(context_changes(config, config_overrides))
        if plan.dtype != "auto":
            config["dtype"] = plan.dtype
            if "torch_dtype" in config:
                config["torch_dtype"] = plan.dtype
        written.append(out / "config.json")
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in COPIED:
            if (plan.base_dir / name).is_file():
                written.append(out / name)
                shutil.copyfile(plan.base_dir / name, out / name)
    except BaseException as exc:
        adapter.close()
        if writer is not None:
            writer.f.close()
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"{out}: writing the merged model failed ({exc.strerror or exc})") from None
        raise
    finally:
        for handle in handles.values():
            handle.close()
    return changed, written_dtypes
