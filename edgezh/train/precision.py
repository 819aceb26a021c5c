"""Which number format training runs in, decided once from the recipe and the hardware.

`auto`: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on a CPU.

On a CPU, `bf16` is allowed: torch runs CPU autocast in bfloat16 (fast on CPUs with AVX512-BF16
or AMX, correct everywhere) while the trained weights stay fp32. `fp16` is GPU-only (it needs a
CUDA gradient scaler), so asking for it without CUDA is a UserError, as is `bf16` on a GPU
without bfloat16 (pre-Ampere). QLoRA's `compute_dtype: bfloat16` on such a GPU is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgezh.errors import UserError

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Precision:
    """The resolved number format and device."""

    name: str  # bf16 | fp16 | fp32
    device: str  # cuda | cpu

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        """The torch dtype name of the compute (autocast) precision."""
        return _DTYPES[self.name]

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    def trainer_flags(self) -> dict:
        """The TrainingArguments switches for this precision."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16", "use_cpu": not self.on_gpu}

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def hardware() -> tuple[bool, bool]:
    """(CUDA available, the GPU supports bfloat16)."""
    import torch

    if not torch.cuda.is_available():
        return False, False
    return True, bool(torch.cuda.is_bf16_supported())


def resolve(requested: str, *, cuda: bool | None = None, gpu_bf16: bool | None = None, where: str = "precision") -> Precision:
    """Turn the recipe's `precision` into a Precision for this machine (hardware detected unless given)."""
    if cuda is None or gpu_bf16 is None:
        detected_cuda, detected_bf16 = hardware()
        cuda = detected_cuda if cuda is None else cuda
        gpu_bf16 = detected_bf16 if gpu_bf16 is None else gpu_bf16
    if requested not in ("auto", *_DTYPES):
        raise UserError(f"{where}: unknown precision {requested!r} (auto, bf16, fp16, fp32)")
    if not cuda:
        if requested == "fp16":
            raise UserError(f"{where}: fp16 needs a CUDA GPU (mixed precision with a gradient scaler); "
                            "this machine has none — use auto (fp32) or bf16 (CPU autocast)")
        return Precision("fp32" if requested == "auto" else requested, "cpu")
    if requested == "auto":
        return Precision("bf16" if gpu_bf16 else "fp16", "cuda")
    if requested == "bf16" and not gpu_bf16:
        raise UserError(f"{where}: this GPU has no bfloat16 support (it needs compute capability 8.0+); "
                        "use fp16 or auto")
    return Precision(requested, "cuda")


def check_compute_dtype(compute_dtype: str, precision: Precision, *, gpu_bf16: bool | None = None,
                        where: str = "qlora.compute_dtype") -> None:
    """QLoRA's matmul dtype must exist on the hardware."""
    if compute_dtype != "bfloat16" or not precision.on_gpu:
        return
    if gpu_bf16 is None:
        gpu_bf16 = hardware()[1]
    if not gpu_bf16:
        raise UserError(f"{where}: bfloat16 is not supported by this GPU; set it to float16")


def job_precision(job, cfg, precision: Precision | None = None) -> Precision:
    """The precision a training job runs in (resolved unless given; QLoRA's compute dtype checked against it)."""
    precision = precision or resolve(cfg.precision, where=f"{job.kind}.precision")
    if cfg.method == "qlora":
        check_compute_dtype(cfg.qlora.compute_dtype, precision, where=f"{job.kind}.qlora.compute_dtype")
    return precision
