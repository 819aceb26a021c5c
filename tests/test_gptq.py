"""GPTQ with GPTQModel on CPU: calibrated on Chinese conversations, reloads in transformers, generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgezh.artifacts import Artifact


@pytest.fixture(scope="module")
def calibration(hsk_sentences) -> list[list[dict]]:
    """Chinese conversations in the data stage's train.jsonl shape."""
    return [[{"role": "user", "content": f"请把这句话翻译成英文：{s['chinese']}"},
             {"role": "assistant", "content": s["translation"]["en"]}] for s in hsk_sentences[:400:10]]


@pytest.fixture(scope="module")
def gptq_model(tiny_llama3: Path, calibration, tmp_path_factory) -> tuple[Path, dict]:
    """The gptq stage run on real artifacts: the tiny base and a data folder with train.jsonl."""
    from edgezh.export import gptq_stage
    from edgezh.recipe import GPTQConfig

    root = tmp_path_factory.mktemp("gptq")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in calibration), encoding="utf-8")
    base = Artifact("base", root / "base", {}, {"template": "llama3", "model_path": str(tiny_llama3)})
    out = root / "out"
    out.mkdir()
    info = gptq_stage.run(GPTQConfig(samples=16), {"base": base, "data": Artifact("data", data, {})}, out)
    return out, info


def test_calibration_texts_are_rendered_chinese_conversations(calibration) -> None:
    from edgezh.export.gptq import calibration_texts

    texts = calibration_texts(calibration, "llama3", 8)
    assert len(texts) == 8 and texts == calibration_texts(calibration, "llama3", 8)  # seeded
    assert all(t.startswith("<|begin_of_text|><|start_header_id|>user") and "翻译" in t for t in texts)


def test_gptq_checkpoint_is_4bit_group_128(gptq_model) -> None:
    out, info = gptq_model
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    q = config["quantization_config"]
    assert (q["bits"], q["group_size"]) == (4, 128) and info["calibration_samples"] == 16
    assert info["device"] == "cpu"


def test_gptq_reloads_in_transformers_and_tracks_the_original(gptq_model, tiny_llama3: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = gptq_model
    tok = AutoTokenizer.from_pretrained(out)
    quant = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    full = AutoModelForCausalLM.from_pretrained(tiny_llama3)
    ids = tok("<|begin_of_text|>你好，今天我们学习中文。", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = quant(ids).logits.float(), full(ids).logits
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    generated = quant.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 6


def test_unreadable_calibration_file_names_the_line(tmp_path: Path) -> None:
    from edgezh.errors import UserError
    from edgezh.export.gptq import read_conversations

    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": []}\n{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"train.jsonl:2: not a"):
        read_conversations(path)


def test_group_size_that_does_not_divide_the_rows_is_refused_before_quantizing(smollm2: Path, tiny_llama3: Path,
                                                                               tmp_path: Path) -> None:
    from edgezh.errors import UserError
    from edgezh.export.gptq import check_group_size, quantize_gptq

    config = json.loads((smollm2 / "config.json").read_text(encoding="utf-8"))
    with pytest.raises(UserError, match=r"export\.gptq\.group_size: 128 does not divide .*hidden_size\) = 576.*; use 64$"):
        check_group_size(config, 128)
    check_group_size(config, 64)
    check_group_size(config, -1)
    check_group_size(json.loads((tiny_llama3 / "config.json").read_text(encoding="utf-8")), 128)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="group_size: 128"):
        quantize_gptq(smollm2, out, ["你好"], group_size=128)
    assert not any(out.iterdir())
