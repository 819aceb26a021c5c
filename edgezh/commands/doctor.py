"""`edgezh doctor`: what is installed, what this machine can do, and what each missing piece disables."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

import psutil
from rich.markup import escape
from rich.table import Table

from edgezh import __version__, quiet
from edgezh.progress import out

# package → (stages or features it enables, how to get it)
OPTIONAL = {
    "trl": ("sft, dpo", "pip install 'edgezh[train]' -c constraints.txt"),
    "peft": ("sft, dpo (LoRA), merge", "pip install 'edgezh[train]' -c constraints.txt"),
    "datasets": ("data (hub datasets, Parquet)", "pip install 'edgezh[train]' -c constraints.txt"),
    "bitsandbytes": ("sft/dpo with method: qlora", "pip install 'edgezh[qlora]' -c constraints.txt"),
    "deepspeed": ("sft/dpo with deepspeed: or num_processes > 1", "pip install 'edgezh[deepspeed]' -c constraints.txt"),
    "gptqmodel": ("gptq", "pip install 'edgezh[gptq]' -c constraints.txt"),
    "textual": ("edgezh chat", "pip install 'edgezh[tui]' -c constraints.txt"),
    "fastapi": ("edgezh serve", "pip install 'edgezh[serve]' -c constraints.txt"),
}
CORE = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate", "gguf", "llama_cpp_python", "pydantic")
TOOLS = {"g++": "DeepSpeed compiles its CPU ops with it (apt-get install g++)",
         "ninja": "DeepSpeed op builds (pip install ninja)",
         "go": "the Go-template check of Modelfiles in the test suite (apt-get install golang-go)",
         "ollama": "running the written Modelfiles (https://ollama.com)"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _llama_cpp() -> tuple[str, str]:
    try:
        import llama_cpp
    except ImportError as exc:
        return "[red]missing[/]", f"llama-cpp-python does not import ({exc}); gguf, quantize, chat, serve need it"
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    offload = "GPU offload available" if llama_cpp.llama_supports_gpu_offload() else "CPU only (build with CMAKE_ARGS=\"-DGGML_CUDA=on\" for CUDA)"
    return "[green]ok[/]", f"{offload}; {info}"


def _cuda() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        return "[yellow]none[/]", "training runs on the CPU (slow; fine for tiny models); bf16/fp16 and QLoRA on GPU need CUDA torch"
    names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
             for i in range(torch.cuda.device_count())]
    return "[green]ok[/]", f"torch CUDA {torch.version.cuda}: " + ", ".join(names)


def _bitsandbytes() -> tuple[str, str]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "[yellow]missing[/]", f"disables {OPTIONAL['bitsandbytes'][0]} — {OPTIONAL['bitsandbytes'][1]}"
    import torch

    backend = "cuda" if torch.cuda.is_available() else "cpu (4-bit works; never run inference on the 4-bit model before training)"
    return "[green]ok[/]", f"bitsandbytes {_version('bitsandbytes')}, backend {backend}"


def _deepspeed() -> tuple[str, str]:
    if importlib.util.find_spec("deepspeed") is None:
        return "[yellow]missing[/]", f"disables {OPTIONAL['deepspeed'][0]} — {OPTIONAL['deepspeed'][1]}"
    try:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
    except Exception as exc:  # noqa: BLE001 — report, don't crash
        return "[red]broken[/]", f"deepspeed {_version('deepspeed')} imports but its accelerator fails: {exc}"
    comm = "nccl" if name == "cuda" else "gloo"
    return "[green]ok[/]", f"deepspeed {_version('deepspeed')}, accelerator {name} ({comm})"


class _Rows(Table):
    """A table whose last column is plain text (install hints contain [brackets])."""

    def add_row(self, *cells: str) -> None:  # type: ignore[override]
        super().add_row(*cells[:-1], escape(cells[-1]))


def doctor(verbose: bool = False) -> int:
    """The table of checks. What the libraries print or log while they are imported (DeepSpeed's "Setting
    accelerator to CPU" warning, …) stays off the console unless `verbose`."""
    with quiet.captured(verbose=verbose):
        table = _table()
    out.print(table)
    return 0


def _table() -> Table:
    table = _Rows(title=f"edgezh {__version__} doctor — Python {platform.python_version()} on {platform.machine()}")
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for dist in CORE:
        version = _version(dist)
        table.add_row(dist, "[green]ok[/]" if version else "[red]missing[/]", version or "core dependency: pip install -e . -c constraints.txt")
    for dist, (enables, how) in OPTIONAL.items():
        version = _version(dist)
        table.add_row(dist, "[green]ok[/]" if version else "[yellow]missing[/]", version or f"disables {enables} — {how}")
    table.add_row("llama.cpp", *_llama_cpp())
    table.add_row("CUDA", *_cuda())
    table.add_row("bitsandbytes backend", *_bitsandbytes())
    table.add_row("DeepSpeed accelerator", *_deepspeed())
    memory = psutil.virtual_memory()
    table.add_row("RAM", "[green]ok[/]" if memory.available > 4 * 2**30 else "[yellow]low[/]",
                  f"{memory.available / 2**30:.1f} GiB free of {memory.total / 2**30:.1f} GiB; {psutil.cpu_count()} CPU threads")
    disk = shutil.disk_usage(Path.cwd())
    table.add_row("disk", "[green]ok[/]" if disk.free > 20 * 2**30 else "[yellow]low[/]",
                  f"{disk.free / 2**30:.1f} GiB free at {Path.cwd()} (an 8B build needs ~50 GiB)")
    for tool, why in TOOLS.items():
        path = shutil.which(tool)
        table.add_row(tool, "[green]ok[/]" if path else "[dim]absent[/]", path or f"optional: {why}")
    table.add_row("python", "[green]ok[/]" if sys.version_info >= (3, 11) else "[red]old[/]", sys.executable)
    return table
