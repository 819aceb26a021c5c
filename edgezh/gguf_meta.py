"""GGUF facts shared by the importer and the writer: llama.cpp's pre-tokenizer definitions, and a
reader of a few metadata values from a GGUF header without loading the model.

gguf-py's `GGUFReader` parses every field and tensor (seconds for a 128k-token vocabulary); this
scanner walks the key/value section once, skipping arrays, and keeps only the keys asked for.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable

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


def read_metadata(path: Path, keys: Iterable[str], *, check_data: bool = False) -> dict[str, Any]:
    """The values of `keys` found in the GGUF's header ("{arch}" in a key is the architecture).
    With `check_data`, also read the tensor table and raise UserError when a tensor's data lies
    past the end of the file (a truncated download or copy)."""
    wanted = set(keys)
    found: dict[str, Any] = {}
    with open(path, "rb") as handle:
        reader = _Reader(handle, Path(path))
        if reader.take(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")
        version = reader.unpack("<I")
        if version < 2:
            raise UserError(f"{path}: GGUF version {version} is too old for llama.cpp")
        n_tensors = reader.unpack("<Q")
        n_kv = reader.unpack("<Q")
        arch = None
        for _ in range(n_kv):
            key = reader.string().decode("utf-8", "replace")
            kind = reader.unpack("<I")
            if arch is not None:
                keep = key in wanted or key.replace(f"{arch}.", "{arch}.", 1) in wanted
            else:
                keep = key in wanted or key == "general.architecture" or key.endswith(".context_length")
            value = reader.value(kind, keep)
            if key == "general.architecture":
                arch = value
            if keep or key == "general.alignment":
                found[key] = value
        if check_data:
            _check_tensor_data(reader, n_tensors, int(found.get("general.alignment") or 32))
    if arch is not None:
        for key in list(found):
            if key.startswith(f"{arch}."):
                found[key.replace(f"{arch}.", "{arch}.", 1)] = found[key]
    return {key: found[key] for key in wanted if key in found}


def _check_tensor_data(reader: _Reader, n_tensors: int, alignment: int) -> None:
    import gguf

    extents = []
    for _ in range(n_tensors):
        name = reader.string().decode("utf-8", "replace")
        dims = [reader.unpack("<Q") for _ in range(reader.unpack("<I"))]
        kind, offset = reader.unpack("<I"), reader.unpack("<Q")
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise UserError(f"{reader.path}: corrupt GGUF (tensor {name} has unknown type {kind})") from None
        elements = 1
        for dim in dims:
            elements *= dim
        extents.append((offset + elements // block * size, name))
    start = reader.handle.tell()
    start += -start % alignment
    end, name = max(extents, default=(0, ""))
    actual = reader.path.stat().st_size
    if start + end > actual:
        raise UserError(f"{reader.path}: corrupt or truncated GGUF (tensor {name} ends at byte {start + end}, "
                        f"the file has {actual})")
