"""A peft LoRA adapter → a GGUF LoRA adapter for llama.cpp (`--lora`, llama-cpp-python) and Ollama (`ADAPTER`).

What llama.cpp's adapter loader (``src/llama-adapter.cpp`` of the llama.cpp that llama-cpp-python 0.3.36
vendors) accepts, and so what ``convert`` writes:

- **Metadata.** ``general.type = adapter``, ``general.architecture`` equal to the model's (``llama``; any other
  value is refused at load), ``adapter.type = lora``, ``adapter.lora.alpha`` (float32). These are the keys
  llama.cpp's ``convert_lora_to_gguf.py`` writes, with ``general.name`` and ``general.quantization_version``;
  ``tests/test_adapter_gguf.py`` checks the two files key by key.
- **Tensors.** ``<GGUF name of the base tensor>.lora_a`` / ``.lora_b`` in pairs (names from the model writer's
  ``hf_to_gguf_name``); the base tensor must exist in the model. Linear layers: A as peft saves it
  (numpy ``(r, n_in)``), B ``(n_out, r)``; the token embedding: A transposed ``(n_vocab, r)``, B ``(n_embd, r)``
  (``llm_build_inp_embd`` gathers rows of A). Q/K: B's rows are permuted like the weights (transformers'
  rotate-half RoPE layout → llama.cpp's interleaved one); A is untouched.
- **Scale.** llama.cpp scales each pair by ``user scale · alpha / r`` with r = B's rank, one alpha per file.
  peft's scale is ``alpha_m / r_m`` per module (``/ sqrt(r_m)`` with rslora, per-module values from
  ``rank_pattern`` / ``alpha_pattern``). Where the two differ the ratio is folded into B, so every pair carries
  exactly peft's update; a plain adapter is written unchanged (``facts["folded"]`` counts the others).
- **What it cannot carry.** The loader keeps only ``lora_a``/``lora_b`` pairs, skips ``*_norm.weight`` and
  refuses anything else, so ``modules_to_save`` (lm_head, embed_tokens, norms trained in full) are refused with
  their names and a pointer to the merged export. A tied model (SmolLM2, Llama 3.2) has no ``output.weight``
  and computes its head with ``token_embd.weight`` itself, so an lm_head LoRA or an embedding LoRA on a tied
  base is refused too. peft's full copy of a targeted embedding (``embed_tokens.base_layer.weight``) is
  checked against the base and left out when it is the base's own tensor.

Streaming like the model writer: the adapter's and the base's safetensors headers plan every tensor (names,
shapes, types, sizes) before a byte is written; the GGUF header and tensor table go first, then each factor
is read with positioned reads (no memory map), converted and written on its own. Atomic: ``<out>.part`` then
a rename; on any failure nothing is left.

``attach`` is the llama.cpp side: loading adapter GGUFs onto a ``llama_cpp.Llama`` with their scales.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgezh.errors import UserError
from edgezh.export.lora import WEIGHTS_NAME, LoraAdapter

OUTTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class _Factor:
    name: str                 # GGUF tensor name (`blk.0.attn_q.weight.lora_b`)
    key: str                  # the adapter file's tensor
    shape: tuple[int, ...]    # numpy order, as written
    transpose: bool = False   # token_embd's lora_a
    factor: float = 1.0       # folded into lora_b: peft's scale / llama.cpp's alpha / r
    heads: int | None = None  # Q/K lora_b: heads of the RoPE permutation


def _qtype(outtype: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}[outtype]


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _base_layout(base_dir: Path) -> tuple[dict, dict[str, tuple[Path, int, dict]]]:
    """The base's config and every tensor's (shard, data start, header entry), from headers only."""
    from edgezh.export.merge import base_shards, unquantized_config
    from edgezh.models.resolve import check_safetensors

    if not base_dir.is_dir():
        raise UserError(f"{base_dir}: base model folder not found (the Hugging Face folder the adapter was trained on)")
    config = unquantized_config(base_dir, "give the original 16-bit folder the adapter was trained on")
    tensors: dict[str, tuple[Path, int, dict]] = {}
    for shard in base_shards(base_dir):
        header = check_safetensors(shard)
        with open(shard, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
        tensors.update({name: (shard, start, info) for name, info in header.items()})
    return config, tensors


def _refuse_unsupported(adapter: LoraAdapter, tied: bool, base_dir: Path) -> None:
    """What an adapter GGUF cannot hold: full copies (modules_to_save) and the head of a tied model."""
    where = adapter.folder
    if adapter.modules_to_save:
        raise UserError(
            f"adapter {where} trains {len(adapter.modules_to_save)} module(s) in full (modules_to_save: "
            f"{', '.join(adapter.modules_to_save)}); llama.cpp's LoRA loader takes only lora_a/lora_b pairs (it skips "
            "*_norm.weight and refuses other tensors), so an adapter GGUF cannot carry them — ship the merged model "
            "instead (export.gguf in a recipe, or `edgezh merge` then `edgezh convert`)")
    if adapter.config.get("fan_in_fan_out"):
        raise UserError(f"{where / 'adapter_config.json'}: fan_in_fan_out is true (Conv1D layers); Llama's linear "
                        "layers never have it — the adapter was made for another model")
    loras = adapter._loras  # noqa: SLF001  (HF tensor name → factors: the adapter's own index)
    if tied and "lm_head.weight" in loras:
        raise UserError(f"adapter {where} has a LoRA on lm_head, but {base_dir} ties lm_head to embed_tokens "
                        "(tie_word_embeddings: true): llama.cpp's tied model has no output.weight to put it on — "
                        "ship the merged model instead")
    if tied and any(lora.embedding for lora in loras.values()):
        raise UserError(f"adapter {where} has a LoRA on embed_tokens, but {base_dir} ties the output head to it "
                        "(tie_word_embeddings: true): llama.cpp would apply the embedding's factors to the head's "
                        "matrix product as well — ship the merged model instead")
    alpha = float(adapter.config.get("lora_alpha", 8))
    if loras and alpha <= 0:
        raise UserError(f"{where / 'adapter_config.json'}: lora_alpha is {alpha:g}; the adapter changes nothing "
                        "(llama.cpp reads alpha 0 as 'do not scale')")


def _check_embedding_copies(adapter: LoraAdapter, base: dict[str, tuple[Path, int, dict]]) -> None:
    """peft saves a targeted embedding in full (`<module>.base_layer.weight`); the merge puts that copy in place of
    the base's tensor. An adapter GGUF cannot replace a tensor, so the copy must be the base's own (its dtype's
    rounding of it): compared row block by row block."""
    import torch

    from edgezh.export.tensor_stream import CODES, read_exact

    for plain, key in sorted(adapter._replaced.items()):  # noqa: SLF001
        if ".base_layer." not in key:
            continue  # modules_to_save copies were refused already
        copy_info = adapter._header[key]  # noqa: SLF001
        shard, start, info = base[plain]
        if list(copy_info["shape"]) != list(info["shape"]):
            raise UserError(f"adapter {adapter.folder}: {key} has shape {copy_info['shape']} but the base's {plain} "
                            f"{info['shape']} (tokens added while training?); an adapter GGUF cannot change the "
                            "vocabulary — ship the merged model instead")
        rows, width = info["shape"][0], math.prod(info["shape"][1:])
        copy_dtype, base_dtype = CODES[copy_info["dtype"]], CODES[info["dtype"]]
        step = max(1, (8 << 20) // max(width * 4, 1))
        with open(adapter.folder / WEIGHTS_NAME, "rb", buffering=0) as fa, open(shard, "rb", buffering=0) as fb:
            copy_start = 8 + struct.unpack("<Q", fa.read(8))[0] + copy_info["data_offsets"][0]
            for first in range(0, rows, step):
                count = min(step, rows - first)
                a = torch.empty((count, width), dtype=copy_dtype)
                b = torch.empty((count, width), dtype=base_dtype)
                read_exact(fa, copy_start + first * width * copy_dtype.itemsize, a, f"{adapter.folder}: {key}")
                read_exact(fb, start + info["data_offsets"][0] + first * width * base_dtype.itemsize, b,
                           f"{shard}: {plain}")
                if not torch.equal(b.to(copy_dtype), a):
                    raise UserError(f"adapter {adapter.folder}: {key} differs from the base's {plain} (from row {first}); "
                                    "the training changed the embedding in full, which an adapter GGUF cannot carry — "
                                    "ship the merged model instead")


def plan(base_dir: Path, adapter: LoraAdapter) -> tuple[list[_Factor], float, dict]:
    """Every factor to write, in llama.cpp's tensor order; the file's alpha; the base's hyperparameters."""
    from edgezh.export.gguf_writer import _hparams, hf_to_gguf_name

    config, base = _base_layout(base_dir)
    hp = _hparams(config, base_dir / "config.json")
    _refuse_unsupported(adapter, hp.tied, base_dir)
    shapes = {name: tuple(info["shape"]) for name, (_, _, info) in base.items()}
    adapter.check_covers(set(shapes))   # an adapter for another base fails here, naming the tensors
    adapter.check_shapes(shapes)
    _check_embedding_copies(adapter, base)

    alpha = float(adapter.config.get("lora_alpha", 8))
    header = adapter._header  # noqa: SLF001
    factors: list[_Factor] = []
    for hf_name, lora in sorted(adapter._loras.items()):  # noqa: SLF001
        name = hf_to_gguf_name(hf_name, hp.n_layers)
        if name is None:
            raise UserError(f"adapter {adapter.folder}: {hf_name} has no place in a llama GGUF (adapter_config names "
                            f"base {adapter.base_model!r})")
        a_shape, b_shape = tuple(header[lora.a_key]["shape"]), tuple(header[lora.b_key]["shape"])
        rank = a_shape[0]
        folded = lora.scale * rank / alpha  # 1.0 for a plain adapter: alpha_m / r_m == alpha / r
        heads = hp.n_head if name.endswith(".attn_q.weight") else hp.n_head_kv if name.endswith(".attn_k.weight") else None
        factors.append(_Factor(f"{name}.lora_a", lora.a_key, a_shape[::-1] if lora.embedding else a_shape,
                               transpose=lora.embedding))
        factors.append(_Factor(f"{name}.lora_b", lora.b_key, b_shape,
                               factor=1.0 if math.isclose(folded, 1.0, rel_tol=1e-12) else folded, heads=heads))

    def order(f: _Factor) -> tuple:
        parts = f.name.split(".")
        return (int(parts[1]), f.name) if parts[0] == "blk" else (-1, f.name)

    factors.sort(key=order)
    return factors, alpha, {"n_layers": hp.n_layers, "tied": hp.tied}


def _prepared(item: _Factor, tensor):
    """A factor as llama.cpp wants it (transposed / scaled / permuted), still a torch tensor."""
    import torch

    from edgezh.export.gguf_writer import _rope_permute

    if item.transpose:
        tensor = tensor.T.contiguous()
    if item.factor != 1.0:
        tensor = tensor.to(torch.float32) * item.factor
    if item.heads is not None:
        tensor = _rope_permute(tensor, item.heads)
    return tensor


def convert(base_dir: Path, adapter_dir: Path, out_file: Path, outtype: str = "f16", *, name: str | None = None) -> dict:
    """Write the adapter in `adapter_dir` (peft, trained on `base_dir`) as a GGUF LoRA adapter `out_file`
    (atomically); returns facts: {"outtype", "tensors", "pairs", "bytes", "alpha", "ranks", "folded", "modules",
    "base", "adapter"}. Everything is checked against the base before a byte is written."""
    import gguf

    from edgezh.export.gguf_writer import _encode, atomic_writer, output_part
    from edgezh.export.tensor_stream import read_tensor
    from edgezh.progress import track

    base_dir, adapter_dir, out_file = Path(base_dir), Path(adapter_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise UserError(f"adapter GGUF type {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")
    if not base_dir.exists():
        raise UserError(f"{base_dir}: base model folder not found (the Hugging Face folder the adapter was trained on)")
    adapter = LoraAdapter.load(adapter_dir)
    factors, alpha, hp = plan(base_dir, adapter)
    if not factors:
        raise UserError(f"adapter {adapter_dir}: no LoRA factors (lora_A / lora_B) in {WEIGHTS_NAME}")
    qtype = _qtype(outtype)

    payload = sum(gguf.GGUFWriter.ggml_pad(_nbytes(f.shape, qtype), gguf.GGUF_DEFAULT_ALIGNMENT) for f in factors)
    part = output_part(out_file, payload + (1 << 20))

    try:
        with atomic_writer(part, out_file) as writer:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_name(name or adapter_dir.resolve().name)
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for item in factors:
                dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype)
                writer.add_tensor_info(item.name, item.shape, np.dtype(dtype or np.float32), _nbytes(item.shape, qtype),
                                       raw_dtype=None if dtype else qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with open(adapter_dir / WEIGHTS_NAME, "rb", buffering=0) as f:
                data_start = 8 + struct.unpack("<Q", f.read(8))[0]
                for item in track(factors, "writing the adapter GGUF"):
                    tensor = read_tensor(f, data_start, adapter._header[item.key], f"{adapter_dir / WEIGHTS_NAME}: {item.key}")  # noqa: SLF001
                    data = _encode(_prepared(item, tensor), qtype)
                    writer.write_tensor_data(data)
                    del data, tensor
    finally:
        adapter.close()
    modules = sorted({f.name.split(".")[-3] if f.name.startswith("blk.") else f.name.split(".")[0]
                      for f in factors})
    return {
        "outtype": outtype,
        "tensors": len(factors),
        "pairs": len(factors) // 2,
        "bytes": out_file.stat().st_size,
        "alpha": alpha,
        "ranks": sorted({f.shape[-1] for f in factors if f.name.endswith(".lora_b")}),
        "folded": sum(1 for f in factors if f.factor != 1.0),
        "modules": modules,
        "base": str(base_dir),
        "adapter": str(adapter_dir),
    }


# ------------------------------------------------------------------ llama.cpp side


def attach(llm: Any, adapters: Sequence[tuple[Path, float]]) -> list:
    """Load LoRA adapter GGUFs onto a `llama_cpp.Llama` and switch them on together, each with its scale
    (llama.cpp: `llama_adapter_lora_init` per file, then one `llama_set_adapters_lora` on the context). Returns
    the adapter handles; llama.cpp frees them with the model. A file llama.cpp refuses (another base, another
    architecture, not an adapter) is a UserError naming it and llama.cpp's reason."""
    from edgezh.runtime.adapters import init_lora

    handles, scales = [], []
    for path, scale in adapters:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such LoRA adapter GGUF")
        handles.append(init_lora(llm.model, path, Path(llm.model_path).name))
        scales.append(float(scale))
    set_scales(llm, handles, scales)
    return handles


def set_scales(llm: Any, handles: Sequence, scales: Sequence[float]) -> None:
    """Switch the context to exactly these adapters with these scales (an empty list: the base alone)."""
    from edgezh.runtime.adapters import set_adapters

    set_adapters(llm.ctx, handles, scales)
