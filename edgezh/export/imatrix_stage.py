"""Stage `imatrix`: the importance matrix the quantizer weighs its rounding by, from calibration text.

Calibration text (`export.gguf.imatrix.text`): `train` is the recipe's training conversations
rendered through the registry template — what users will send; `peoples-daily`, `hsk` (Chinese),
`hsk-en` (the HSK sentences' English translations) and text files are plain text. The token budget
is shared equally between the texts named, each tokenized as one stream and cut into chunks of
`chunk_size` tokens that start with the BOS, as llama-imatrix does. The sums are collected from the
merged 16-bit model with transformers (`edgezh.export.imatrix.collect`) and written as llama.cpp's
imatrix GGUF, so `llama-quantize --imatrix` reads the same file.

A user's own file (`export.gguf.imatrix.file`, from llama-imatrix) is checked and copied instead.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from edgezh import layout, templates
from edgezh.artifacts import Artifact
from edgezh.errors import UserError
from edgezh.export import imatrix
from edgezh.progress import bar
from edgezh.recipe import ImatrixConfig

VERSION = "1"
CORPORA = ("train", "peoples-daily", "hsk", "hsk-en")


def fingerprint(cfg: ImatrixConfig) -> dict:
    """The outside files the matrix comes from (a user's imatrix file, calibration text files)."""
    files = [cfg.file] if cfg.file else [t for t in (cfg.text or []) if t not in CORPORA]
    return {"files": [layout.fingerprint_folder(Path(f)) for f in files if Path(f).exists()]}


def calibration_text(name: str, inputs: dict[str, Artifact], template: str, max_chars: int) -> str:
    """One calibration text by its recipe name."""
    from edgezh.data import corpora
    from edgezh.eval import corpora as eval_corpora

    if name == "train":
        from edgezh.export.gptq import calibration_texts, read_conversations

        if "data" not in inputs:
            raise UserError("export.gguf.imatrix.text: `train` needs the recipe's data stage")
        conversations = read_conversations(inputs["data"].file("train.jsonl"))
        rendered, size = [], 0
        for text in calibration_texts(conversations, template, len(conversations)):  # all, shuffled (seed 0)
            rendered.append(text)
            size += len(text)
            if size >= max_chars:
                break
        return "".join(rendered)
    if name == "hsk-en":
        sentences = [s.get("translation", {}).get("en") or "" for s in corpora.hsk_sentences()]
        random.Random(0).shuffle(sentences)
        return "\n".join(s for s in sentences if s)[:max_chars]
    found, notes = eval_corpora.load([name], inputs.get("data"), max_chars)
    if not found:
        raise UserError(f"export.gguf.imatrix.text: {name}: {'; '.join(notes) or 'no text'}")
    return found[0].text


def calibration_chunks(names: list[str], inputs: dict[str, Artifact], folder: Path, template: str,
                       tokens: int, chunk_size: int) -> tuple[list[list[int]], dict[str, int]]:
    """Token chunks of every text (an equal share of the budget each) and the tokens each gave."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = templates.get(template).bos_token  # the chat format's BOS rule: Llama 3 starts with one, chatml has none
    bos_id = tokenizer.convert_tokens_to_ids(bos) if bos is not None else None
    share = max(chunk_size, tokens // len(names))
    chunks: list[list[int]] = []
    used: dict[str, int] = {}
    for name in names:
        text = calibration_text(name, inputs, template, max_chars=share * 8)  # ≥ 1 char per token, with margin
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        mine = imatrix.token_chunks(ids, chunk_size, bos_id=bos_id, max_tokens=share)
        if not mine:
            raise UserError(f"export.gguf.imatrix.text: {name} gives {len(ids)} tokens, fewer than one chunk of {chunk_size}")
        chunks += mine
        used[name] = sum(len(c) for c in mine)
    return chunks, used


def run(cfg: ImatrixConfig, inputs: dict[str, Artifact], out: Path) -> dict:
    name = layout.build_name(out)
    if cfg.file is not None:
        source = Path(cfg.file)
        data = imatrix.read(source)  # a UserError naming the file when it is not an imatrix
        if not data.legacy:
            file = layout.imatrix_name(name)
            shutil.copyfile(source, out / file)
        else:
            file = f"{name}.imatrix.dat"
            shutil.copyfile(source, out / file)
        return {"file": file, "source": str(source), "datasets": data.datasets, "chunk_count": data.chunk_count,
                "chunk_size": data.chunk_size, "entries": len(data)}
    folder = layout.weights_dir(inputs)
    template = layout.template_of(inputs)
    names = cfg.texts("data" in inputs)
    chunks, used = calibration_chunks(names, inputs, folder, template, cfg.tokens, cfg.chunk_size)
    # whole model: a bar over chunks; layer by layer (a model too big for memory): a bar over layers
    shown = bar(f"imatrix: {len(chunks)} chunks of {cfg.chunk_size} tokens ({', '.join(names)})", None)
    try:
        data = imatrix.collect(folder, chunks, datasets=names,
                               progress=lambda done, _tokens: shown.update(completed=done, total=len(chunks)),
                               layer_progress=lambda done, layers: shown.update(completed=done, total=layers, info="layers"))
    finally:
        shown.close()
    file = layout.imatrix_name(name)
    imatrix.write_gguf(out / file, data)
    return {"file": file, "datasets": names, "tokens": used, "chunk_count": data.chunk_count,
            "chunk_size": data.chunk_size, "entries": len(data)}
