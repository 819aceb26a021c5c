"""Sizes people write (`4.5GB`, `80MiB`) and the machines a model must fit (`laptop-8gb`, `gpu-6gb`)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}

# memory of the machine, and what the OS, the runtime and its compute buffers keep for themselves
# (a desktop OS with a browser open on a laptop; the CUDA context and llama.cpp's compute buffers on a GPU)
TARGETS: dict[str, tuple[int, int]] = {
    "phone-4gb": (4 * 2**30, int(2.0 * 2**30)),
    "laptop-8gb": (8 * 2**30, int(3.0 * 2**30)),
    "laptop-16gb": (16 * 2**30, int(4.0 * 2**30)),
    "gpu-6gb": (6 * 2**30, int(0.75 * 2**30)),
    "gpu-8gb": (8 * 2**30, int(0.75 * 2**30)),
    "gpu-12gb": (12 * 2**30, int(0.75 * 2**30)),
    "gpu-24gb": (24 * 2**30, int(1.0 * 2**30)),
}


def parse_size(text: str | int) -> int:
    """Bytes in `4.5GB` (decimal units), `80MiB` (binary units) or a plain byte count."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, not {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (write e.g. 4.5GB, 800MiB or a byte count)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"a size must be positive, not {text!r}")
    return int(value)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, ctx: int, bytes_per_value: int = 2) -> int:
    """llama.cpp's KV cache for `ctx` tokens: keys and values of every layer, f16 by default."""
    return 2 * layers * kv_heads * head_dim * ctx * bytes_per_value


def target_budget(target: str, *, layers: int, kv_heads: int, head_dim: int, ctx: int) -> dict:
    """The largest GGUF a machine holds with `ctx` tokens of KV cache, and how it was reckoned."""
    memory, reserve = TARGETS[target]
    kv = kv_cache_bytes(layers, kv_heads, head_dim, ctx)
    return {"target": target, "memory": memory, "reserve": reserve, "kv_cache": kv, "ctx": ctx,
            "budget": memory - reserve - kv}


def human(size: int) -> str:
    """A byte count as MiB or GiB with one decimal."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
