"""Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

No tool is compiled: the quantizer is the one inside the llama.cpp library that
llama-cpp-python built. The result's tensor types are read back, so the manifest records the
real size, bits per weight, and every tensor that fell back from the requested type (K-quants
need rows that are a multiple of 256; narrower tensors get a legacy type instead).
"""

from __future__ import annotations

import ctypes
import os
import typing
from collections import Counter
from pathlib import Path

from edgezh.errors import UserError
from edgezh.export.native import captured_stderr, ensure_writable
from edgezh.estimate import GGUF_BPW
from edgezh.recipe import QuantType

QUANT_TYPES = typing.get_args(QuantType)
K_FAMILY = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# Tensors llama.cpp deliberately gives their own type in every legacy mix (output and embeddings).
OWN_TYPE_TENSORS = {"output.weight", "token_embd.weight"}


def ftype(qtype: str) -> int:
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise UserError(f"quantization type {qtype!r} is not supported (choose from {', '.join(QUANT_TYPES)})")
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None) -> dict:
    """Write `dst` (atomically) as `qtype` from the f32/f16/bf16 GGUF `src`; return what came out."""
    import llama_cpp

    code = ftype(qtype)
    if not src.is_file():
        raise UserError(f"{src}: no such GGUF file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{src}: not a GGUF file")
    ensure_writable(dst.parent, int(src.stat().st_size * GGUF_BPW[qtype] / 16), f"{dst.name}")
    part = dst.with_name(dst.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads or os.cpu_count() or 1
    try:
        with captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))
        if rc != 0 or not part.is_file():
            tail = "; ".join(line for line in log[-5:] if line.strip())
            raise UserError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc}): {tail}")
        os.replace(part, dst)
    finally:
        if part.exists():
            part.unlink()
    return describe(dst, qtype)


def describe(path: Path, qtype: str | None = None) -> dict:
    """Size, bits per weight, tensor-type histogram and fallbacks of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    types: Counter[str] = Counter()
    fallback = []
    params = data = 0
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        types[kind] += 1
        params += int(tensor.n_elements)
        data += int(tensor.n_bytes)
        if qtype is None or len(tensor.shape) < 2 or tensor.name in OWN_TYPE_TENSORS:
            continue
        if qtype.startswith("q") and "_k" in qtype:
            if kind not in K_FAMILY:
                fallback.append({"tensor": tensor.name, "type": kind, "row": int(tensor.shape[0])})
        elif kind != qtype.upper():
            fallback.append({"tensor": tensor.name, "type": kind, "row": int(tensor.shape[0])})
    size = path.stat().st_size
    # bits per weight over tensor data, as llama.cpp reports it (metadata such as the vocabulary excluded)
    return {"file": path.name, "type": qtype, "bytes": size, "params": params,
            "bits_per_weight": round(data * 8 / params, 3) if params else None,
            "tensor_types": dict(sorted(types.items())), "fallback": fallback}
