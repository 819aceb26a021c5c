"""GPTQ 4-bit checkpoints with GPTQModel (auto-gptq is archived and cannot import with transformers 5).

Calibration text is the recipe's own training data rendered through its chat template, so the
quantizer sees the Chinese conversations the model will actually serve. Runs on CPU (slowly;
`GPTQMODEL_CPU_WORKERS` defaults to the core count) and on CUDA when present.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path

from edgezh import templates
from edgezh.errors import UserError
from edgezh.export.native import ensure_writable
from edgezh.jsonl import numbered_records


def calibration_texts(conversations: list[list[dict]], template: str, samples: int, seed: int = 0) -> list[str]:
    """`samples` conversations, chosen with a fixed seed, rendered as the model sees them."""
    if not conversations:
        raise UserError("gptq: no calibration conversations (the data stage produced none)")
    chosen = random.Random(seed).sample(conversations, min(samples, len(conversations)))
    return [templates.render(template, messages) for messages in chosen]


CALIBRATION_POOL = 20000  # conversations read for calibration: train.jsonl is already shuffled across sources


def read_conversations(path: Path, limit: int | None = CALIBRATION_POOL) -> list[list[dict]]:
    """The first ``limit`` conversations of a JSONL file of {"messages": [...]} records (the data stage's
    train.jsonl, shuffled by the data stage, so its head is a sample of every source; a 300k-conversation
    file is never read whole)."""
    rows = []
    for number, record in numbered_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise UserError(f"{path}:{number}: not a {{\"messages\": [...]}} record")
        rows.append(record["messages"])
        if limit is not None and len(rows) >= limit:
            break
    return rows


def linear_input_widths(config: dict) -> dict[str, int]:
    """Input width of each kind of linear layer GPTQ quantizes in a Llama-style decoder (lm_head stays)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"q/k/v/gate/up_proj (hidden_size)": hidden, "o_proj (heads × head_dim)": heads * head_dim,
            "down_proj (intermediate_size)": int(config["intermediate_size"])}


def check_group_size(config: dict, group_size: int) -> None:
    """GPTQ groups split each weight row; the CPU and CUDA kernels need every row width to be a multiple
    of the group size (a 576-wide row in groups of 128 quantizes, then fails at the first forward)."""
    if group_size == -1:
        return
    widths = linear_input_widths(config)
    bad = {name: width for name, width in widths.items() if width % group_size}
    if bad:
        fits = [g for g in (256, 128, 64, 32, 16) if all(w % g == 0 for w in widths.values())]
        listed = ", ".join(f"{name} = {width}" for name, width in bad.items())
        hint = f"use {fits[0]}" if fits else "use -1 (one group per row)"
        raise UserError(f"export.gptq.group_size: {group_size} does not divide the rows of {listed}; {hint}")


def quantize_gptq(model_dir: Path, out: Path, texts: list[str], *, bits: int = 4, group_size: int = 128,
                  desc_act: bool = False) -> dict:
    """Quantize `model_dir` into `out` with GPTQModel; returns what was written."""
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError:
        raise UserError("the gptq stage needs GPTQModel: pip install 'edgezh[gptq]' -c constraints.txt") from None
    import torch

    check_group_size(json.loads((model_dir / "config.json").read_text(encoding="utf-8")), group_size)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    ensure_writable(out, int(weights * (bits + 1) / 16), "the GPTQ checkpoint")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    torch.manual_seed(0)
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    model_dir, out = model_dir.resolve(), out.resolve()
    # GPTQModel writes per-layer logs into ./logs of the current directory: keep them out of the user's.
    with tempfile.TemporaryDirectory(prefix="edgezh-gptq-") as scratch, contextlib.chdir(scratch):
        model = GPTQModel.load(str(model_dir), config, device="cuda" if torch.cuda.is_available() else "cpu")
        model.quantize(texts, batch_size=1)
        model.save(str(out))
    return {"bits": bits, "group_size": group_size, "desc_act": desc_act, "calibration_samples": len(texts),
            "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
