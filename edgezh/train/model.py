"""Load the model to train: the base for `full`, `lora` or `qlora`, with config overrides and a LoRA adapter.

Dtypes. `full` keeps fp32 weights (the Trainer autocasts to bf16/fp16). `lora` loads the frozen
base in the compute dtype on a GPU (fp32 on a CPU) and keeps every trainable tensor (LoRA factors,
`modules_to_save` copies) in fp32. `qlora` loads 4-bit weights through bitsandbytes (nf4/fp4,
double quantization, the recipe's compute dtype) and prepares them with peft's
`prepare_model_for_kbit_training`.

bitsandbytes on a CPU with AVX512-BF16 repacks a Linear4bit's weight into an inference layout the
first time it runs in eval mode without gradients (bitsandbytes/nn/modules.py, Linear4bit.forward);
training after that goes through the inference kernel and is silently wrong. `disable_cpu_repack`
turns that path off on every 4-bit layer right after loading, and `assert_not_repacked` checks it
before training starts. Nothing here runs the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgezh import templates
from edgezh.errors import UserError
from edgezh.models.context import context_changes
from edgezh.recipe import LoraSpec, QuantSpec
from edgezh.train.precision import Precision


def load_tokenizer(model_dir: str | Path, template: str, pad_token_id: int):
    """The base's tokenizer with the registry's inference template and the data's pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = templates.get(template).inference
    if not 0 <= pad_token_id < len(tokenizer):
        raise UserError(f"pad_token_id {pad_token_id} is outside the tokenizer's vocabulary ({len(tokenizer)} tokens)")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
    return tokenizer


def config_overrides_of(cfg: Any) -> dict:
    """`rope_theta` / `max_position_embeddings` from a section that has them (SFT), without the unset ones."""
    return {key: getattr(cfg, key) for key in ("rope_theta", "max_position_embeddings")
            if getattr(cfg, key, None) is not None}


def load_config(model_dir: str | Path, config_overrides: dict):
    """The model config with the context-extension overrides applied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    for key, value in context_changes(config.to_dict(), config_overrides).items():
        setattr(config, key, value)
    config.use_cache = False
    return config


def bnb_config(spec: QuantSpec):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
                              bnb_4bit_quant_storage=torch.uint8)


def lora_config(spec: LoraSpec, tied: bool = False):
    from peft import LoraConfig

    target = spec.target_modules if spec.target_modules == "all-linear" else list(spec.target_modules)
    # On a base that ties lm_head to embed_tokens (`tied`: SmolLM2, Llama 3.2), `ensure_weight_tying` gives the two
    # one shared trainable copy (saved under both names), so the trained model stays tied like the base it is
    # merged into.
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=target,
                      modules_to_save=list(spec.modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
                      ensure_weight_tying=tied and bool(spec.modules_to_save))


def load_base(model_dir: str | Path, method: str, precision: Precision, device, *, quant: QuantSpec | None = None,
              config_overrides: dict | None = None):
    """The base model for `method`, on `device` (a 4-bit model is placed at load time)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(model_dir, config_overrides or {})
    kwargs: dict[str, Any] = {"config": config, "attn_implementation": "sdpa"}
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("method: qlora needs bitsandbytes (pip install 'edgezh[qlora]')") from None
        kwargs.update(quantization_config=bnb_config(quant), dtype=torch.float32, device_map={"": str(device)})
    elif method == "lora" and precision.on_gpu:
        kwargs["dtype"] = precision.torch_dtype()
    else:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method == "qlora":
        disable_cpu_repack(model)
    return model


def attach_adapter(model, method: str, spec: LoraSpec, *, start_adapter: str | Path | None = None,
                   gradient_checkpointing: bool = False):
    """Make `model` trainable for `method`; returns (model, peft_config for the trainer or None).

    A new LoRA adapter is left to the TRL trainer (`peft_config`), which wraps the model itself — for
    DPO that is what makes the reference the adapter-off model. A `start_adapter` is loaded trainable
    (TRL then keeps a frozen copy as DPO's reference); for `full` it is folded into the weights."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if method == "full":
        if start_adapter is not None:
            model = PeftModel.from_pretrained(model, str(start_adapter)).merge_and_unload()
        return model, None
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if start_adapter is not None:
        return PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True), None
    return model, lora_config(spec, tied=bool(getattr(model.config, "tie_word_embeddings", False)))


def trainable_in_fp32(model) -> None:
    """Keep every trainable tensor in fp32 (master weights): optimizer steps at small learning rates
    vanish in bf16, and fp16 trainable parameters break the fp16 gradient scaler."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def linear4bit_modules(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def disable_cpu_repack(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every Linear4bit (see the module docstring)."""
    layers = linear4bit_modules(model)
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def assert_not_repacked(model) -> None:
    """Fail before training when a 4-bit weight is in the CPU inference layout (a forward ran before training)."""
    packed = [module for module in linear4bit_modules(model)
              if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if packed:
        raise RuntimeError(f"{len(packed)} 4-bit layer(s) were repacked for CPU inference before training "
                           "(a no-grad eval forward ran on the 4-bit model); training them would be silently wrong")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count their real element numbers."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if hasattr(param, "quant_state") and getattr(param, "quant_state", None) is not None:
            count = int(param.quant_state.shape.numel()) if hasattr(param.quant_state.shape, "numel") else count * 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def job_model(job, cfg, precision, device):
    """(tokenizer, model with its adapter attached, peft config) of a training job; nothing has run the model."""
    tokenizer = load_tokenizer(job.model_dir, job.template, job.pad_token_id)
    model = load_base(job.model_dir, cfg.method, precision, device, quant=cfg.qlora, config_overrides=job.config_overrides)
    model, peft_config = attach_adapter(model, cfg.method, cfg.lora, start_adapter=job.start_adapter,
                                        gradient_checkpointing=cfg.gradient_checkpointing)
    return tokenizer, model, peft_config
