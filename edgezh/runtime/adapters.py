"""LoRA adapter sets at runtime: `edgezh chat|serve BASE.gguf --lora [NAME=]FILE[:SCALE][,FILE[:SCALE]…]`.

One `--lora` flag is one adapter set: its files are switched on together, each with its scale
(default 1.0); repeating the flag gives several sets. A set's name defaults to its file stems joined
by '+'. `parse_specs` reads the flags and `check` the files (before llama.cpp sees them): each must
be a GGUF with `general.type = adapter` and the base's `general.architecture`. Everything wrong is a
`UserError` naming the flag or the file.

`load` puts every adapter on the model once (`llama_adapter_lora_init`; llama.cpp frees them with
the model). In llama.cpp 0.3.36 the adapters in use belong to the context, and every row of one
`llama_decode` is computed with the same set: the decode loop (`batch`) switches the context to a
generation's set (`LoadedSet.apply`, `llama_set_adapters_lora`) before a call that holds its rows.
A generation names its set; None is the base alone.
"""

from __future__ import annotations

import ctypes
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgezh.errors import UserError

_NAME = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class AdapterSet:
    """Adapters applied together: (GGUF path, scale) each, under one name."""

    name: str
    adapters: tuple[tuple[Path, float], ...]

    def label(self) -> str:
        """`zh ×0.8`, `zh+math ×1/0.5`: the name and the scales, for a status line."""
        return f"{self.name} ×{'/'.join(f'{scale:g}' for _, scale in self.adapters)}"


def parse_spec(spec: str) -> AdapterSet:
    """One `--lora` value: `[NAME=]FILE[:SCALE][,FILE[:SCALE]…]`."""
    name, sep, rest = spec.partition("=")
    if not sep or not _NAME.match(name):  # no NAME= (a '=' in a path stays part of it)
        name, rest = "", spec
    adapters = []
    for item in rest.split(","):
        item = item.strip()
        path, scale = item, 1.0
        head, colon, tail = item.rpartition(":")
        if colon and head and not re.search(r"[/\\]|\.gguf$", tail, re.I):  # C:\x.gguf and a/b:c.gguf are paths
            try:
                scale = float(tail)
            except ValueError:
                raise UserError(f"--lora {spec}: scale {tail!r} is not a number (FILE:SCALE, e.g. zh.gguf:0.8)") from None
            if not math.isfinite(scale):
                raise UserError(f"--lora {spec}: scale {tail!r} is not a finite number")
            path = head
        if not path:
            raise UserError(f"--lora {spec!r}: an empty file name (expected [NAME=]FILE[:SCALE][,FILE[:SCALE]…])")
        adapters.append((Path(path).expanduser(), scale))
    name = name or "+".join(path.stem for path, _ in adapters)
    return AdapterSet(name, tuple(adapters))


def parse_specs(specs: Iterable[str] | None) -> tuple[AdapterSet, ...]:
    """Every `--lora` value; set names must differ."""
    sets = tuple(parse_spec(spec) for spec in specs or ())
    seen: set[str] = set()
    for item in sets:
        if item.name == "off":
            raise UserError(f"--lora {item.name}=…: 'off' means the base alone; give the set another name")
        if item.name in seen:
            raise UserError(f"--lora: two adapter sets are named {item.name!r}; name one with NAME=FILE")
        seen.add(item.name)
    return sets


def check(sets: Sequence[AdapterSet], base: Path) -> None:
    """Each file is a LoRA adapter GGUF for the base's architecture (read from the headers)."""
    from edgezh.gguf_meta import read_metadata
    from edgezh.runtime.loader import check_gguf

    arch = read_metadata(base, ["general.architecture"]).get("general.architecture")
    for item in sets:
        for path, _ in item.adapters:
            try:
                check_gguf(path)
                meta = read_metadata(path, ["general.type", "general.architecture", "adapter.type"])
            except UserError as exc:
                raise UserError(f"--lora {exc}") from None
            if meta.get("general.type") != "adapter":
                raise UserError(f"--lora {path}: not a LoRA adapter GGUF (general.type is "
                                f"{meta.get('general.type') or 'missing'}, expected adapter); "
                                "make one with edgezh convert BASE_DIR --lora ADAPTER_DIR")
            if meta.get("adapter.type", "lora") != "lora":
                raise UserError(f"--lora {path}: adapter.type is {meta['adapter.type']}, expected lora")
            if arch is not None and meta.get("general.architecture") != arch:
                raise UserError(f"--lora {path}: an adapter for {meta.get('general.architecture')}, "
                                f"but {base.name} is {arch}")


def init_lora(model: Any, path: Path, base_name: str) -> Any:
    """`llama_adapter_lora_init` on a model pointer; llama.cpp's refusal (another base, not an adapter)
    is a UserError naming the file and the reason from llama.cpp's log."""
    import llama_cpp

    from edgezh.runtime.loader import log_detail, quiet_llama_cpp

    with quiet_llama_cpp(False) as log:
        handle = llama_cpp.llama_adapter_lora_init(model, str(path).encode("utf-8"))
    if not handle:
        marker = "failed to apply lora adapter: "
        text = "".join(log)
        reason = text.split(marker, 1)[1].splitlines()[0].strip() if marker in text else log_detail(log)
        raise UserError(f"{path}: llama.cpp cannot put this LoRA adapter on {base_name}"
                        + (f": {reason}" if reason else ""))
    return handle


def set_adapters(ctx: Any, handles: Sequence[Any], scales: Sequence[float]) -> None:
    """Switch a context to exactly these adapters with these scales (none: the base alone)."""
    import llama_cpp

    n = len(handles)
    array = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*handles) if n else None
    values = (ctypes.c_float * n)(*scales) if n else None
    if llama_cpp.llama_set_adapters_lora(ctx, array, n, values) != 0:
        raise RuntimeError("llama_set_adapters_lora failed")


@dataclass
class LoadedSet:
    spec: AdapterSet
    handles: tuple[Any, ...]

    def apply(self, ctx: Any) -> None:
        set_adapters(ctx, self.handles, [scale for _, scale in self.spec.adapters])


def load(model: Any, sets: Sequence[AdapterSet], base_name: str) -> dict[str, LoadedSet]:
    """Every set's adapters on `model` (a llama_model pointer). A file is loaded once for all sets; a
    file named twice in one set is loaded twice (llama.cpp keeps one scale per handle)."""
    pool: dict[Path, list[Any]] = {}
    loaded = {}
    for item in sets:
        used: dict[Path, int] = {}
        handles = []
        for path, _ in item.adapters:
            key = path.resolve()
            index = used[key] = used.get(key, -1) + 1
            if index == len(pool.setdefault(key, [])):
                pool[key].append(init_lora(model, path, base_name))
            handles.append(pool[key][index])
        loaded[item.name] = LoadedSet(item, tuple(handles))
    return loaded


def apply(ctx: Any, loaded: LoadedSet | None) -> None:
    """The context decodes with `loaded` from now on (None: the base alone)."""
    if loaded is None:
        set_adapters(ctx, (), ())
    else:
        loaded.apply(ctx)
