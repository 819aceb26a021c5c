"""GGUF facts shared by the importer and the writer: llama.cpp's pre-tokenizer definitions, and the
one reader of GGUF headers without loading the model (`Header`: keys, a few values, the tensor
table; `read_metadata` on top of it).

gguf-py's `GGUFReader` parses every field and tensor (seconds for a 128k-token vocabulary); this
scanner walks the header once, skipping arrays, and keeps only the values asked for.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from edgezh.errors import UserError

# --- pre-tokenizers -------------------------------------------------------------------------------

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # Meta's Llama 3 tokenizer.json (and transformers' conversion of Meta's tiktoken file):
    # Llama 3's split regex, then byte-level mapping without GPT-2's own regex.
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    },
    # SmolLM/SmolLM2 on the hub: every digit on its own, then GPT-2's byte-level regex.
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    # Plain GPT-2 byte-level regex. This is also what transformers builds when it imports a GGUF whose
    # pre-tokenizer it has no regex for (e.g. SmolLM2's "smollm": the digit split is lost on import).
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}
"""llama.cpp pre-tokenizer name → the ``tokenizer.json`` ``pre_tokenizer`` definition that splits text the
same way (compared after dropping ``trim_offsets``, which only affects offsets, and unwrapping one-element
sequences). Complete definitions: the GGUF import in ``edgezh.models.base_stage`` installs them as they are."""


# GGUF value types (gguf-py's GGUFValueType)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path):
        self.handle, self.path = handle, path

    def take(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise UserError(f"{self.path}: corrupt or truncated GGUF (the header ends early)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        size = self.unpack("<Q")
        if size > 1 << 30:
            raise UserError(f"{self.path}: corrupt GGUF (a {size}-byte string in the header)")
        return self.take(size)

    def skip(self, size: int) -> None:
        self.handle.seek(size, 1)

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            raw = self.string()
            return raw.decode("utf-8", "replace") if keep else None
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS and not keep:
                self.skip(struct.calcsize(_SCALARS[item]) * count)
                return None
            values = [self.value(item, keep) for _ in range(count)]
            return values if keep else None
        raise UserError(f"{self.path}: corrupt GGUF (unknown value type {kind} in the header)")


class Header:
    """A GGUF's header, read in one pass without gguf-py (arrays not asked for are skipped): `keys`, every
    key present; `values`, the values of the keys for which `keep(key, arch)` is true (`arch`: the value
    of general.architecture once it has been read; general.alignment is always kept, and without `keep`
    only it); with `tensors`,
    the tensor table as (name, ggml dims, ggml type name, data offset) and `end`, where the table ends.
    A corrupt header, or a tensor type gguf-py does not know, is a UserError naming the file."""

    def __init__(self, path: Path, keep: Callable[[str, str | None], bool] | None = None, *, tensors: bool = False):
        import gguf

        self.path = Path(path)
        self.keys: set[str] = set()
        self.values: dict[str, Any] = {}
        self.tensors: list[tuple[str, list[int], str, int]] = []
        self.end: int | None = None
        with open(path, "rb") as handle:
            reader = _Reader(handle, self.path)
            if reader.take(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file")
            version = reader.unpack("<I")
            if version < 2:
                raise UserError(f"{path}: GGUF version {version} is too old for llama.cpp")
            n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
            arch = None
            for _ in range(n_kv):
                key = reader.string().decode("utf-8", "replace")
                wanted = key == "general.alignment" or (keep is not None and keep(key, arch))
                value = reader.value(reader.unpack("<I"), wanted)
                self.keys.add(key)
                if key == "general.architecture":
                    arch = value
                if wanted:
                    self.values[key] = value
            if tensors:
                for _ in range(n_tensors):
                    name = reader.string().decode("utf-8", "replace")
                    dims = [reader.unpack("<Q") for _ in range(reader.unpack("<I"))]
                    kind, offset = reader.unpack("<I"), reader.unpack("<Q")
                    try:
                        ggml_type = gguf.GGMLQuantizationType(kind)
                        gguf.GGML_QUANT_SIZES[ggml_type]  # a type whose size gguf-py knows
                    except (ValueError, KeyError):
                        raise UserError(f"{path}: corrupt GGUF (tensor {name} has unknown ggml type {kind})") from None
                    self.tensors.append((name, dims, ggml_type.name, offset))
                self.end = handle.tell()
        self.alignment = int(self.values.get("general.alignment") or 32)


def tensor_nbytes(dims: list[int], kind: str) -> int:
    """Bytes of a tensor's data: `dims` ggml dimensions, `kind` a ggml type name (Q4_K, F16…)."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    elements = 1
    for dim in dims:
        elements *= int(dim)
    return elements // block * type_size


def read_metadata(path: Path, keys: Iterable[str], *, check_data: bool = False) -> dict[str, Any]:
    """The values of `keys` found in the GGUF's header ("{arch}" in a key is the architecture).
    With `check_data`, also read the tensor table and raise UserError when a tensor's data lies
    past the end of the file (a truncated download or copy)."""
    wanted = set(keys)

    def keep(key: str, arch: str | None) -> bool:
        if arch is not None:
            return key in wanted or key.replace(f"{arch}.", "{arch}.", 1) in wanted
        return key in wanted or key == "general.architecture" or key.endswith(".context_length")

    header = Header(Path(path), keep, tensors=check_data)
    found = dict(header.values)
    if check_data:
        _check_tensor_data(header)
    arch = found.get("general.architecture")
    if arch is not None:
        for key in list(found):
            if key.startswith(f"{arch}."):
                found[key.replace(f"{arch}.", "{arch}.", 1)] = found[key]
    return {key: found[key] for key in wanted if key in found}


def _check_tensor_data(header: Header) -> None:
    extents = [(offset + tensor_nbytes(dims, kind), name) for name, dims, kind, offset in header.tensors]
    start = header.end + -header.end % header.alignment
    end, name = max(extents, default=(0, ""))
    actual = header.path.stat().st_size
    if start + end > actual:
        raise UserError(f"{header.path}: corrupt or truncated GGUF (tensor {name} ends at byte {start + end}, "
                        f"the file has {actual})")
