"""Loading a GGUF into llama.cpp: the one place that makes the model and its context.

`load_native` checks the file, loads the weights (`llama_model_load_from_file`) and creates one
context for `parallel` sequences (`llama_init_from_model` with `n_seq_max = parallel`): every
sequence has its own `n_ctx` KV cells (`kv_unified` off, so `n_ctx × parallel` cells in all) and
the decode loop (`batch`) puts their tokens into one `llama_batch` per step. Anything that changes
the weights for every request belongs here, so the chat and the server get it alike: LoRA adapter
sets (`adapters`) are loaded onto the model here, once (`Native.adapters`); the decode loop switches
the context to a generation's set (`llama_set_adapters_lora`) before the calls that hold its rows.

Batch invariance: llama.cpp's CPU backend repacks some quantized weights (Q4_0, Q4_K, IQ4_NL …)
into interleaved layouts ("extra buffer types") whose matrix kernels differ between one row
(gemv) and several rows (gemm); the rounding then depends on how many sequences share a decode
step, and a greedy answer given next to other requests drifts from the same answer given alone.
`repack=False` (the default) loads plain layouts (`use_extra_bufts = false`): every row of a
batch is computed by the same kernel, so an answer does not depend on what else is decoding
(measured in `bench/bench_serve.py`; docs/benchmarks.md). `repack=True` is llama.cpp's default.

Errors are one line (`UserError`): no file, not a GGUF, damaged or truncated (the header and
tensor table are checked before llama.cpp reads the weights), too large for the machine's
memory, or not enough memory for the context.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from edgezh.errors import UserError
from edgezh.gguf_meta import read_metadata

DEFAULT_BATCH = 512
"""Tokens per `llama_decode` call (prompt chunks and decode rows of every sequence together)."""


@dataclass
class Native:
    """A loaded model and its context (llama-cpp-python's thin wrappers own the native handles)."""

    model: Any
    """`llama_cpp._internals.LlamaModel`"""
    context: Any
    """`llama_cpp._internals.LlamaContext`"""
    n_ctx: int
    """KV cells of each sequence."""
    parallel: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    repack: bool
    adapters: dict[str, Any] = field(default_factory=dict)
    """LoRA adapter sets loaded on the model, by name (`edgezh.runtime.adapters.LoadedSet`)."""

    def close(self) -> None:
        self.context.close()
        self.model.close()


def default_threads() -> int:
    """Physical cores (llama.cpp decodes best with one thread per core), at least 1."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:
        return max(1, os.cpu_count() or 1)


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def check_gguf(path: Path) -> Path:
    """The path of a readable GGUF file, or a UserError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a GGUF file (an edgezh build folder has manifest.json)")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def gguf_problem(path: Path) -> str:
    """Why the GGUF's header or tensor table is damaged ('' if it looks whole)."""
    try:
        read_metadata(path, [], check_data=True)
    except UserError as exc:
        return str(exc).split(": ", 1)[-1]
    return ""


def load_native(path: Path, *, n_ctx: int, parallel: int = 1, n_threads: int | None = None,
                n_gpu_layers: int | None = None, repack: bool = False, n_batch: int = DEFAULT_BATCH,
                flash_attn: bool = True, verbose: bool = False, adapters: Sequence[Any] = ()) -> Native:
    """Load `path` and make a context of `parallel` sequences of `n_ctx` tokens each.
    `n_gpu_layers` None: every layer on the GPU when llama.cpp can offload, else 0. `flash_attn`:
    llama.cpp's fused attention where the backend has it (its default; False: the unfused graph).
    `adapters`: `AdapterSet`s to load onto the model (checked from their headers first)."""
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install llama-cpp-python") from None
    path = check_gguf(Path(path))
    problem = gguf_problem(path)
    if problem:  # a truncated file would otherwise fail deep inside llama.cpp, or be read past its end
        raise UserError(f"{path}: {problem}")
    if adapters:
        from edgezh.runtime import adapters as lora

        lora.check(adapters, path)
    if parallel < 1:
        raise UserError(f"--parallel must be ≥ 1, got {parallel}")
    max_parallel = int(llama_cpp.llama_max_parallel_sequences())
    if parallel > max_parallel:
        raise UserError(f"--parallel {parallel}: llama.cpp runs at most {max_parallel} sequences in one context")
    gpu_layers = (-1 if gpu_offload_supported() else 0) if n_gpu_layers is None else n_gpu_layers
    threads = n_threads or default_threads()
    _check_memory(path)

    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = gpu_layers
    model_params.use_extra_bufts = bool(repack)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = n_ctx * parallel
    context_params.n_batch = context_params.n_ubatch = n_batch
    context_params.n_seq_max = parallel
    context_params.kv_unified = False
    context_params.n_threads = context_params.n_threads_batch = threads
    # llama.cpp's own default (its CLI and server): flash attention wherever the backend has it, the CPU
    # included, where it decodes faster than the unfused attention (docs/benchmarks.md, "Decode steps").
    context_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    model = context = None
    try:
        with quiet_llama_cpp(verbose) as log:
            try:
                model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=True)
            except ValueError:
                raise UserError(f"{path}: llama.cpp {llama_cpp.__version__} could not load this GGUF "
                                f"({log_detail(log) or 'unsupported architecture or tensor type, or out of memory'})"
                                ) from None
            try:
                context = _internals.LlamaContext(model=model, params=context_params, verbose=True)
            except ValueError:
                size = f"a {n_ctx}-token context" if parallel == 1 else f"{parallel} sequences of {n_ctx} tokens"
                raise UserError(f"{path}: not enough memory for {size} (llama.cpp: "
                                f"{log_detail(log) or 'could not allocate it'}); try a smaller --ctx"
                                f"{' or --parallel' if parallel > 1 else ''}"
                                f"{' or fewer --gpu-layers' if gpu_layers else ''}") from None
        loaded = lora.load(model.model, adapters, path.name) if adapters else {}
    except MemoryError:
        raise UserError(f"{path}: out of memory while loading the model; close other programs or use a "
                        "smaller quant (q4_k_m)") from None
    except BaseException:
        if context is not None:
            context.close()
        if model is not None:
            model.close()
        raise
    return Native(model=model, context=context, n_ctx=n_ctx, parallel=parallel, n_batch=n_batch,
                  n_threads=threads, n_gpu_layers=gpu_layers, repack=bool(repack), adapters=loaded)


def _check_memory(path: Path) -> None:
    """Refuse a model larger than the machine's memory before llama.cpp tries (and the OS kills us)."""
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:
        return
    size = path.stat().st_size
    if size > total:
        raise UserError(f"{path}: the model is {size / 2**30:.1f} GiB and this machine has {total / 2**30:.1f} GiB "
                        "of memory; use a smaller quant (q4_k_m) or a smaller model")


def log_detail(fragments: Iterable[str]) -> str:
    """The last error-looking lines of llama.cpp's log (it logs in fragments)."""
    lines = [line.strip() for line in "".join(fragments).splitlines() if line.strip()]
    errors = [line for line in lines if any(word in line.lower() for word in ("error", "failed", "unable", "cannot"))]
    return "; ".join((errors or lines)[-2:])[:300]


@contextlib.contextmanager
def quiet_llama_cpp(verbose: bool) -> Iterator[collections.deque]:
    """Keep llama.cpp's loader log off the terminal without touching file descriptors (a terminal UI
    owns fd 2 while a model loads in a worker thread): native log lines go to a ring buffer (for
    error messages), llama-cpp-python's own prints to a string. llama-cpp-python's log callback
    and logger level are restored afterwards."""
    import llama_cpp
    from llama_cpp import _logger

    lines: collections.deque[str] = collections.deque(maxlen=40)
    if verbose:
        yield lines
        return

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    level = _logger.logger.level
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _logger.logger.setLevel(level or logging.ERROR)  # ERROR: what llama-cpp-python's verbose=False sets
