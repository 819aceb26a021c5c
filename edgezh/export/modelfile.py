"""Ollama Modelfiles that work the first time: template, stops and system prompt from the registry.

Everything format-specific (the Go TEMPLATE, every stop token — the end tokens and the header guards
Ollama's own models stop on — and the default Chinese system prompt) comes from `edgezh.templates`; this
module only lays it out.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgezh import templates
from edgezh.errors import UserError
from edgezh.recipe import ModelfileConfig

LLAMA_NOTICES = {
    "llama3": "Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © Meta Platforms, Inc. "
              "All Rights Reserved. Built with Meta Llama 3. License: https://llama.meta.com/llama3/license/",
    "llama3.1": "Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright © Meta Platforms, Inc. "
                "All Rights Reserved. Built with Llama. License: https://llama.meta.com/llama3_1/license/",
}


def _quoted(keyword: str, text: str) -> str:
    if '"""' in text:
        raise UserError(f"modelfile: the {keyword} text contains \"\"\", which a Modelfile cannot quote")
    return f'{keyword} """{text}"""'


def _license(cfg: ModelfileConfig, template: str) -> str | None:
    if cfg.license == "none":
        return None
    if cfg.license == "auto":
        return LLAMA_NOTICES.get(template)
    path = Path(cfg.license)
    if not path.is_file():
        raise UserError(f"modelfile.license: {path}: no such file")
    return path.read_text(encoding="utf-8")


# What holds for Ollama's ADAPTER (its server/create.go and llm/ code): one adapter per model, a GGUF whose
# general.type is "adapter" (or a safetensors adapter folder Ollama converts); it is applied when the model loads
# (llama.cpp's --lora), so FROM may be quantized but must be the weights the adapter was trained on. Ollama's
# source through v0.33 does this; newer releases refuse every adapter ("LoRA adapters are no longer supported").
ADAPTER_NOTES = (
    "ADAPTER: Ollama applies the LoRA adapter to FROM when it loads the model, so FROM must hold the weights",
    "the adapter was trained on (quantized is fine). Ollama up to 0.33 accepts ADAPTER; newer releases refuse",
    "it (\"LoRA adapters are no longer supported\"): then ship the merged model's Modelfile, or run",
    "llama.cpp: llama-server -m <base>.gguf --lora <adapter>.gguf",
)


def render(gguf_name: str, template: str, cfg: ModelfileConfig, *, title: str, adapter: str | None = None) -> str:
    """The Modelfile text for a GGUF file lying beside it (FROM ./file), or for an Ollama model name when
    `gguf_name` is not a .gguf file (FROM llama3.1:8b); `adapter`: a LoRA adapter GGUF beside it (ADAPTER)."""
    fmt = templates.get(template)
    source = f"./{gguf_name}" if gguf_name.endswith(".gguf") else gguf_name
    lines = [f"# {title}"] + ([f"# {note}" for note in ADAPTER_NOTES] if adapter else []) + [f"FROM {source}"]
    lines += [f"ADAPTER ./{adapter}"] if adapter else []
    lines += ["", _quoted("TEMPLATE", fmt.ollama), ""]
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in fmt.stop_tokens]
    lines += [f"PARAMETER num_ctx {cfg.num_ctx}", f"PARAMETER temperature {cfg.temperature}",
              f"PARAMETER top_p {cfg.top_p}", f"PARAMETER top_k {cfg.top_k}",
              f"PARAMETER repeat_penalty {cfg.repeat_penalty}", ""]
    lines.append(_quoted("SYSTEM", cfg.system if cfg.system is not None else fmt.default_system))
    notice = _license(cfg, template)
    if notice:
        lines.append(_quoted("LICENSE", notice))
    lines += [_quoted(f"MESSAGE {message.role}", message.content) for message in cfg.messages]
    return "\n".join(lines) + "\n"


def commands(folder: Path, model_name: str, kind: str) -> list[str]:
    """The two lines a person runs to use a written Modelfile."""
    return [f"ollama create {model_name} -f {folder / f'Modelfile.{kind}'}", f"ollama run {model_name}"]
