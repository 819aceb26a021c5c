"""The `base` stage: resolve the recipe's base model into a Hugging Face folder plus its chat format.

A local folder or hub snapshot in its own dtype is referenced, not copied (its files are
fingerprinted into the cache key); a GGUF import, a random init or a dtype change is written
as safetensors into the artifact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgezh import templates
from edgezh.artifacts import Artifact
from edgezh.errors import UserError
from edgezh.layout import fingerprint_folder
from edgezh.models import resolve
from edgezh.progress import status
from edgezh.recipe import BaseConfig

VERSION = "2"  # 2: GGUF imports keep the pre-tokenizer the GGUF declares
log = logging.getLogger("edgezh.base")


def fingerprint(cfg: BaseConfig) -> dict:
    """Identity of the outside files the stage reads, so edits invalidate the cache."""
    return fingerprint_folder(resolve.local_source(cfg.path)) if cfg.path is not None else {}


def run(cfg: BaseConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    if cfg.init is not None:
        return _write(cfg, *_init_model(cfg), out, source="init")
    if cfg.path is not None:
        source = resolve.local_source(cfg.path)
        if source.is_file():
            if not resolve.is_gguf(source):
                raise UserError(f"base.path: {source} is neither a model folder nor a GGUF file")
            return _write(cfg, *_import_gguf(source), out, source="gguf")
        return _reference(cfg, source, out, source_kind="folder")
    with status(f"hub: {cfg.hub}"):
        folder = resolve.hub_snapshot(cfg.hub, cfg.revision, cfg.allow_pickle)
    return _reference(cfg, folder, out, source_kind="hub")


def _torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _init_model(cfg: BaseConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _init_tokenizer(cfg.tokenizer)
    spec = cfg.init
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    with status(f"random Llama: {spec.num_hidden_layers} layers × {spec.hidden_size}"):
        model = LlamaForCausalLM(config).to(torch.float32)
    return model, tokenizer


def _init_tokenizer(source: str):
    if source == "llama3":
        from edgezh.models.tokenizers import llama3_tokenizer

        return llama3_tokenizer()
    from transformers import AutoTokenizer

    folder = resolve.local_source(source)
    resolve.check_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def _import_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with status(f"importing {path.name} (dequantizing with transformers' GGUF loader)"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(f"base.path: {path}: transformers cannot import this GGUF ({exc})") from None
    _restore_pre_tokenizer(tokenizer, path)
    # The weights are plain dequantized tensors now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _restore_pre_tokenizer(tokenizer, path: Path) -> None:
    """transformers' GGUF import falls back to GPT-2's pre-tokenizer when it has no regex for the one
    the GGUF declares (SmolLM2's `smollm` loses its one-digit-per-token split); put the declared one back
    so the imported tokenizer splits text as the original model does."""
    from tokenizers import Tokenizer

    from edgezh.gguf_meta import PRE_TOKENIZERS
    from edgezh.gguf_meta import read_metadata

    declared = read_metadata(path, ["tokenizer.ggml.pre"]).get("tokenizer.ggml.pre")
    if declared not in PRE_TOKENIZERS:
        return
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = PRE_TOKENIZERS[declared]
    tokenizer.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    log.info("pre-tokenizer restored to %s as declared by %s", declared, path.name)


def _chat_format(cfg: BaseConfig, tokenizer_template: str | None, where: str) -> str:
    if cfg.template:
        return cfg.template
    detected = templates.detect(tokenizer_template)
    if detected is None:
        raise UserError(f"base: cannot tell the chat format of {where} from its chat template; "
                        f"set base.template to one of {', '.join(templates.names())}")
    return detected


def _write(cfg: BaseConfig, model, tokenizer, out: Path, source: str) -> dict:
    template = _chat_format(cfg, getattr(tokenizer, "chat_template", None), cfg.path or "the model")
    dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
    model = model.to(_torch_dtype(dtype))
    tokenizer.chat_template = templates.get(template).inference
    with status(f"writing safetensors ({dtype})"):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return _info(model.config.to_dict(), sum(p.numel() for p in model.parameters()), template, dtype, source, None)


def _reference(cfg: BaseConfig, folder: Path, out: Path, source_kind: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = resolve.read_config(folder)
    resolve.check_tokenizer(folder)
    params = resolve.check_weights(folder, cfg.allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    template = _chat_format(cfg, tokenizer.chat_template, str(folder))
    source_dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if cfg.dtype in ("auto", source_dtype):
        # The artifact's one file names the referenced files, so its hash changes when they do.
        (out / "source.json").write_text(json.dumps(fingerprint_folder(folder), indent=1) + "\n", encoding="utf-8")
        return _info(config, params, template, source_dtype, source_kind, str(folder))
    with status(f"loading {folder.name} to convert to {cfg.dtype}"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
                                                     use_safetensors=not cfg.allow_pickle)
    return _write(cfg, model, tokenizer, out, source_kind)


def _info(config: dict, params: int | None, template: str, dtype: str, source: str, model_path: str | None) -> dict:
    return {
        "source": source,
        "model_path": model_path,
        "template": template,
        "dtype": dtype,
        "params": params,
        "architecture": (config.get("architectures") or ["LlamaForCausalLM"])[0],
        "vocab_size": config.get("vocab_size"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "context_length": config.get("max_position_embeddings"),
    }
