"""Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

No tool is compiled: the quantizer is the one inside the llama.cpp library that
llama-cpp-python built. The result's tensor types are read back, so the manifest records the
real size, bits per weight, and every tensor that fell back from the requested type (K-quants
and most IQ types need rows that are a multiple of 256; narrower tensors get another type).

What `quantize` passes, as llama-quantize does (llama.cpp vendored by llama-cpp-python 0.3.36):
- `params.imatrix`: a C array of `llama_model_imatrix_data {name, data, size}` ended by an entry
  whose name is NULL; names are GGUF weight names, data the per-column means
  (`edgezh.export.imatrix.means`);
- `params.kv_overrides`: `llama_model_kv_override` entries (ended by an empty key) that the
  quantizer writes into the output header: `quantize.imatrix.file` and `quantize.imatrix.dataset`
  as strings (LLAMA_KV_OVERRIDE_TYPE_STR, at most 127 bytes, truncated as llama-quantize does),
  `quantize.imatrix.entries_count` and `quantize.imatrix.chunks_count` as integers (written u32);
- `params.tt_overrides`: `llama_model_tensor_override {pattern, type}` (a regex searched in the
  tensor name, first match wins) ended by a NULL pattern; `output_tensor_type`,
  `token_embedding_type` (GGML_TYPE_COUNT = unset) and `pure`.

`dry_run_size` runs the quantizer with `params.dry_run`: llama.cpp decides every tensor's type
(its mixes, overrides, fallbacks) and only logs it — the API returns nothing else — so the log
lines are parsed for each tensor's type, and the exact size is computed from the tensor shapes
with gguf-py's GGML_QUANT_SIZES (the log's MiB figures are rounded).
"""

from __future__ import annotations

import ctypes
import os
import re
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgezh.errors import UserError
from edgezh.estimate import GGUF_BPW
from edgezh.export.native import captured_stderr, ensure_writable
from edgezh.gguf_meta import Header, tensor_nbytes
from edgezh.recipe import NEEDS_IMATRIX, QuantType

# Every llama.cpp file type edgezh offers (the LLAMA_FTYPE_MOSTLY_* names, lower case), and the ones that
# need an importance matrix (the recipe's lists: one copy; see `edgezh.recipe.NEEDS_IMATRIX` for why).
ALL_TYPES: tuple[str, ...] = typing.get_args(QuantType)
# ggml tensor types that need an imatrix (llama.cpp's rule, plus the same policy for IQ types)
_GGML_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL"})

# The main ggml type of each file type (llama_ftype_get_default_type), whose block size decides
# whether a tensor's row length forced a fallback.
_DEFAULT_TYPE = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2_k": "Q2_K", "q2_k_s": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
    "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL", "iq3_m": "IQ3_S", "iq3_s": "IQ3_S", "iq3_xs": "IQ3_S",
    "iq3_xxs": "IQ3_XXS", "iq2_m": "IQ2_S", "iq2_s": "IQ2_S", "iq2_xs": "IQ2_XS", "iq2_xxs": "IQ2_XXS",
    "iq1_m": "IQ1_M", "iq1_s": "IQ1_S",
}
K_FAMILY = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# Tensors llama.cpp deliberately gives their own type in every mix (output and embeddings).
OWN_TYPE_TENSORS = {"output.weight", "token_embd.weight"}
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")


def ftype(qtype: str) -> int:
    import llama_cpp

    if qtype not in ALL_TYPES:
        raise UserError(f"quantization type {qtype!r} is not supported (choose from {', '.join(ALL_TYPES)})")
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")


def ggml_type(name: str, what: str) -> int:
    """A ggml tensor type by name (`q6_k`, `Q8_0`, `f16`, `iq4_xs`…) → its enum value."""
    from gguf import GGMLQuantizationType

    try:
        return int(GGMLQuantizationType[name.upper()])
    except KeyError:
        choices = ", ".join(t.name.lower() for t in GGMLQuantizationType)
        raise UserError(f"{what}: {name!r} is not a ggml tensor type (choose from {choices})") from None


def _bpw(qtype: str) -> float:
    return GGUF_BPW.get(qtype) or 8.5


class _Params:
    """`llama_model_quantize_params` and the C buffers its pointers refer to (kept alive with it)."""

    def __init__(self, src: Path, qtype: str, threads: int | None, imatrix: dict[str, np.ndarray] | None,
                 imatrix_meta: dict | None, tensor_types: list[tuple[str, str]] | None, output_type: str | None,
                 token_embedding_type: str | None, pure: bool, dry_run: bool):
        import llama_cpp

        code = ftype(qtype)
        self._keep: list[Any] = []
        if qtype in NEEDS_IMATRIX and not imatrix:
            raise UserError(f"quantization type {qtype} needs an importance matrix: set an imatrix "
                            f"(export.gguf.imatrix in the recipe, --imatrix FILE on the command line) or choose a k-quant")
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = code
        p.nthread = threads or os.cpu_count() or 1
        p.pure = bool(pure)
        p.dry_run = bool(dry_run)
        if output_type is not None:
            p.output_tensor_type = self._checked_type(output_type, "output tensor type", imatrix)
        if token_embedding_type is not None:
            p.token_embedding_type = self._checked_type(token_embedding_type, "token embedding type", imatrix)
        if tensor_types:
            arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
            for i, (pattern, tname) in enumerate(tensor_types):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UserError(f"tensor type override {pattern!r}: not a regular expression ({exc})") from None
                encoded = pattern.encode()
                self._keep.append(encoded)
                arr[i].pattern = encoded
                arr[i].type = self._checked_type(tname, f"tensor type override {pattern!r}", imatrix)
            arr[len(tensor_types)].pattern = None
            arr[len(tensor_types)].type = 0
            self._keep.append(arr)
            p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        if imatrix:
            entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
            for i, (name, values) in enumerate(sorted(imatrix.items())):
                buf = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
                if not np.all(np.isfinite(buf)):
                    raise UserError(f"the imatrix entry for {name} has non-finite values")
                encoded = name.encode()
                self._keep += [buf, encoded]
                entries[i].name = encoded
                entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                entries[i].size = buf.size
            entries[len(imatrix)].name = None
            self._keep.append(entries)
            p.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
            kv = self._kv_overrides(imatrix, imatrix_meta or {})
            p.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        self.params = p

    @staticmethod
    def _checked_type(name: str, what: str, imatrix: dict | None) -> int:
        from gguf import GGMLQuantizationType

        code = ggml_type(name, what)
        if not imatrix and GGMLQuantizationType(code).name in _GGML_NEEDS_IMATRIX:
            raise UserError(f"{what}: {name} needs an importance matrix: set an imatrix or choose a k-quant")
        return code

    def _kv_overrides(self, imatrix: dict, meta: dict) -> Any:
        """The four keys llama-quantize writes when it has an imatrix (the dataset: the first one)."""
        import llama_cpp

        items: list[tuple[str, Any]] = []
        if meta.get("file"):
            items.append((IMATRIX_KEYS[0], str(meta["file"])))
        datasets = meta.get("datasets") or ([meta["dataset"]] if meta.get("dataset") else [])
        if datasets:
            items.append((IMATRIX_KEYS[1], str(datasets[0])))
        items.append((IMATRIX_KEYS[2], len(imatrix)))
        if int(meta.get("chunk_count") or 0) > 0:
            items.append((IMATRIX_KEYS[3], int(meta["chunk_count"])))
        arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
        for i, (key, val) in enumerate(items):
            arr[i].key = key.encode()
            if isinstance(val, str):
                arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                arr[i].value.val_str = _utf8_prefix(val, 127)
            else:
                arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                arr[i].value.val_i64 = int(val)
        arr[len(items)].key = b""  # terminator: an empty key
        self._keep.append(arr)
        return arr


def _utf8_prefix(text: str, limit: int) -> bytes:
    """`text` in UTF-8, cut to at most `limit` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def _check_src(src: Path) -> None:
    if not src.is_file():
        raise UserError(f"{src}: no such GGUF file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{src}: not a GGUF file")


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None, *,
             imatrix: dict[str, np.ndarray] | None = None, imatrix_meta: dict | None = None,
             tensor_types: list[tuple[str, str]] | None = None, output_type: str | None = None,
             token_embedding_type: str | None = None, pure: bool = False) -> dict:
    """Write `dst` (atomically) as `qtype` from the f32/f16/bf16 GGUF `src`; return what came out.

    `imatrix`: GGUF weight name → per-column means (`edgezh.export.imatrix.means`);
    `imatrix_meta`: {"file", "datasets", "chunk_count"} written as `quantize.imatrix.*`;
    `tensor_types`: (tensor-name regex, ggml type) overrides, first match wins;
    `output_type`, `token_embedding_type`: ggml types of output.weight and token_embd.weight;
    `pure`: every tensor in the default type, no mix."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    held = _Params(src, qtype, threads, imatrix, imatrix_meta, tensor_types, output_type, token_embedding_type,
                   pure, dry_run=False)
    _check_src(src)
    if tensor_types or output_type or token_embedding_type:  # a type asked for by name must fit the rows: say so first
        dry_run_size(src, qtype, threads, imatrix=imatrix, imatrix_meta=imatrix_meta, tensor_types=tensor_types,
                     output_type=output_type, token_embedding_type=token_embedding_type, pure=pure)
    bpw = max([_bpw(qtype)] + [16.0 for _ in (output_type, token_embedding_type, *(tensor_types or ())) if _])
    ensure_writable(dst.parent, int(src.stat().st_size * bpw / 16), f"{dst.name}")
    part = dst.with_name(dst.name + ".part")
    try:
        with captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(held.params))
        if rc != 0 or not part.is_file():
            tail = "; ".join(line for line in log[-5:] if line.strip())
            raise UserError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc}): {tail}")
        os.replace(part, dst)
    finally:
        if part.exists():
            part.unlink()
    return describe(dst, qtype)


# One line of the quantizer's per-tensor log: "[  12/ 272] blk.1.attn_q.weight - [ 576,  576,  1,  1], type = f16, size = ..."
_TENSOR_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(\S+),\s+size\s+=\s+[\d.]+\s+MiB"
                          r"(?:\s+->\s+[\d.]+\s+MiB\s+\((\w+)\))?")


def dry_run_size(src: Path, qtype: str, threads: int | None = None, *,
                 imatrix: dict[str, np.ndarray] | None = None, imatrix_meta: dict | None = None,
                 tensor_types: list[tuple[str, str]] | None = None, output_type: str | None = None,
                 token_embedding_type: str | None = None, pure: bool = False) -> dict:
    """The file `quantize` would write with these arguments, without writing it: llama.cpp's
    dry run decides each tensor's type; the size is computed from the shapes.

    Returns {"type", "bytes" (the file size), "params", "bits_per_weight", "tensor_types"
    (histogram), "tensors" (name → type)}."""
    import gguf
    import llama_cpp

    src = Path(src)
    # the imatrix only changes types chosen for iq3_xxs/iq4_xs/iq4_nl/q4_0/q5_0 mixes; pass it on
    held = _Params(src, qtype, threads, imatrix, imatrix_meta, tensor_types, output_type, token_embedding_type,
                   pure, dry_run=True)
    _check_src(src)
    text: list[str] = []

    @llama_cpp.llama_log_callback
    def sink(level: int, msg: bytes, user_data: Any) -> None:
        text.append(msg.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(sink, ctypes.c_void_p(0))
    try:
        with captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), b"", ctypes.byref(held.params))
    finally:
        _restore_log()
    if rc != 0:
        tail = "; ".join(line for line in ("".join(text).splitlines() + log)[-5:] if line.strip())
        raise UserError(f"llama.cpp could not size {src.name} as {qtype} (code {rc}): {tail}")
    chosen: dict[str, str] = {}
    for m in _TENSOR_LINE.finditer("".join(text)):
        chosen[m.group(1)] = (m.group(3) or m.group(2)).upper()
    table = Header(src, tensors=True)
    if len(chosen) != len(table.tensors) or any(name not in chosen for name, *_ in table.tensors):
        raise UserError(f"llama.cpp's dry run of {src.name} named {len(chosen)} of {len(table.tensors)} tensors; "
                        "cannot size it (its log format may have changed)")
    align = table.alignment
    data = params = raw = 0
    types: Counter[str] = Counter()
    for name, dims, _, _ in table.tensors:
        kind = chosen[name]
        block = _block(kind)
        if int(dims[0]) % block:
            # llama.cpp falls back for its own mix rules, but not for a type asked for by name (an override,
            # output_type, token_embedding_type): that file would fail its row validation when written
            raise UserError(f"{name}: rows of {int(dims[0])} values are not a multiple of {kind.lower()}'s block of "
                            f"{block}; give that tensor a type whose block divides {int(dims[0])} (e.g. q8_0, q5_0, q4_0)")
        size = tensor_nbytes(dims, kind)
        data += -(-size // align) * align
        raw += size
        params += int(np.prod(dims))
        types[kind] += 1
    header = _header_bytes(table, imatrix, imatrix_meta)
    return {"type": qtype, "bytes": -(-header // align) * align + data, "params": params,
            "bits_per_weight": round(raw * 8 / params, 3) if params else None,
            "tensor_types": dict(sorted(types.items())), "tensors": chosen}


def _restore_log() -> None:
    """Give llama.cpp's log back to llama-cpp-python's callback (or to stderr if it has none)."""
    import llama_cpp

    try:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError):
        llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p(0))


def _header_bytes(table: Header, imatrix: dict | None, imatrix_meta: dict | None) -> int:
    """Bytes before the tensor data (unpadded) of the quantizer's output: the source header plus the
    keys the quantizer adds (general.quantization_version, general.file_type, quantize.imatrix.*)."""
    import gguf

    end = table.end

    def kv_size(key: str, value: Any) -> int:
        size = 8 + len(key.encode()) + 4
        return size + (8 + len(value) if isinstance(value, bytes) else 4)

    added = 0
    for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
        if key not in table.keys:
            added += kv_size(key, 0)
    if imatrix:
        meta = imatrix_meta or {}
        datasets = meta.get("datasets") or ([meta["dataset"]] if meta.get("dataset") else [])
        values: list[tuple[str, Any]] = []
        if meta.get("file"):
            values.append((IMATRIX_KEYS[0], _utf8_prefix(str(meta["file"]), 127)))
        if datasets:
            values.append((IMATRIX_KEYS[1], _utf8_prefix(str(datasets[0]), 127)))
        values.append((IMATRIX_KEYS[2], 0))
        if int(meta.get("chunk_count") or 0) > 0:
            values.append((IMATRIX_KEYS[3], 0))
        added += sum(kv_size(k, v) for k, v in values if k not in table.keys)
    return end + added


def _block(ggml_name: str) -> int:
    """Values per block of a ggml tensor type (a row must hold a whole number of blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_name.upper()]][0]


def _fallback_block(qtype: str) -> int:
    return _block(_DEFAULT_TYPE[qtype])


def describe(path: Path, qtype: str | None = None) -> dict:
    """Size, bits per weight, tensor-type histogram and fallbacks of a GGUF file (and the
    `quantize.imatrix.*` keys when the file has them).

    A fallback is a 2-D tensor (other than output/token_embd) whose row length is not a multiple
    of the block of `qtype`'s main type (256 for K and most IQ types, 32 for legacy and iq4_nl):
    llama.cpp had to give it another type than the mix intended."""
    table = Header(Path(path), lambda key, arch: key in IMATRIX_KEYS, tensors=True)
    types: Counter[str] = Counter()
    fallback = []
    params = data = 0
    block = _fallback_block(qtype) if qtype in _DEFAULT_TYPE else None
    for name, dims, kind, _ in table.tensors:
        types[kind] += 1
        params += int(np.prod(dims))
        data += tensor_nbytes(dims, kind)
        if qtype is None or len(dims) < 2 or name in OWN_TYPE_TENSORS:
            continue
        row = int(dims[0])
        if block is not None:
            if row % block != 0:
                fallback.append({"tensor": name, "type": kind, "row": row})
        elif kind != qtype.upper():
            fallback.append({"tensor": name, "type": kind, "row": row})
    size = Path(path).stat().st_size
    # bits per weight over tensor data, as llama.cpp reports it (metadata such as the vocabulary excluded)
    out = {"file": Path(path).name, "type": qtype, "bytes": size, "params": params,
           "bits_per_weight": round(data * 8 / params, 3) if params else None,
           "tensor_types": dict(sorted(types.items())), "fallback": fallback}
    meta = {key.rsplit(".", 1)[1]: table.values[key] for key in IMATRIX_KEYS if key in table.values}
    if meta:
        out["imatrix"] = meta
    return out
