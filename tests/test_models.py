"""Base model resolution on real files: Meta's tokenizer, random init, local folders, GGUF import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgezh import templates
from edgezh.cli import main


def test_llama3_tokenizer_matches_meta(hsk_sentences, peoples_daily) -> None:
    from llama_models.llama3.tokenizer import Tokenizer

    from edgezh.models.tokenizers import llama3_tokenizer

    tok = llama3_tokenizer()
    assert len(tok) == 128256
    assert tok("你好，世界！Hello", add_special_tokens=False)["input_ids"] == [57668, 53901, 3922, 102616, 6447, 9906]
    assert tok("你好", )["input_ids"][0] != tok.bos_token_id  # BOS comes from the template, never the tokenizer
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>"]) == [128000, 128009, 128008, 128006]
    meta = Tokenizer.get_instance()
    texts = [s["chinese"] for s in hsk_sentences[::50]] + [s["translation"]["en"] for s in hsk_sentences[::97]]
    texts += peoples_daily.splitlines()[:40] + ["def f(x):\n    return x  # 代码", "emoji 😀🎉 and   runs\t\tof  space", "<|eot_id|> literal"]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == meta.encode(text, bos=False, eos=False, allowed_special="all"), text


def test_tiny_llama3_is_a_real_llama(tiny_llama3: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_llama3 / "config.json").read_text(encoding="utf-8"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 2, 128256)
    tok = AutoTokenizer.from_pretrained(tiny_llama3)
    assert tok.chat_template == templates.get("llama3").inference
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3)
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert (ids[0] == tok.bos_token_id).sum() == 1 and ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 128256) and torch.isfinite(logits).all()


def _recipe(tmp: Path, base: str) -> Path:
    path = tmp / "r.yaml"
    path.write_text(f"name: r\nbase: {base}\n", encoding="utf-8")
    return path


def test_local_folder_is_referenced_and_detected(tmp_path: Path, tiny_llama3: Path, monkeypatch) -> None:
    from edgezh.artifacts import Artifact
    from edgezh.layout import model_dir

    monkeypatch.chdir(tmp_path)
    assert main(["build", str(_recipe(tmp_path, f"{{path: {tiny_llama3}}}"))]) == 0
    artifact = Artifact.load(tmp_path / "builds" / "r" / "01-base")
    assert set(artifact.files) == {"source.json"}  # referenced, not copied
    assert model_dir(artifact) == tiny_llama3
    assert artifact.info["template"] == "llama3" and artifact.info["params"] > 60_000_000


def test_dtype_change_writes_a_converted_copy(tmp_path: Path, tiny_llama3: Path, monkeypatch) -> None:
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    assert main(["build", str(_recipe(tmp_path, f"{{path: {tiny_llama3}, dtype: bfloat16}}"))]) == 0
    with safe_open(tmp_path / "builds" / "r" / "01-base" / "model.safetensors", "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_slice(name).get_dtype()) == "BF16"


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "truncated or padded safetensors file"),
    ("header", "corrupt safetensors header"),
    ("pickle", "pickle files (pytorch_model.bin)"),
    ("arch", "is not supported; edgezh handles Llama-family"),
    ("no-tokenizer", "no tokenizer files"),
    ("no-config", "no config.json"),
    ("no-template", "cannot tell the chat format"),
])
def test_damaged_local_model_exits_2(damage: str, expected: str, tmp_path: Path, tiny_llama3: Path, capsys, monkeypatch) -> None:
    model = _copy_model(tiny_llama3, tmp_path / "model")
    weights = model / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    elif damage == "header":
        data = bytearray(weights.read_bytes()[:4096])
        data[8:20] = b"not json at "
        weights.write_bytes(bytes(data))
    elif damage == "pickle":
        weights.rename(model / "pytorch_model.bin")
    elif damage == "arch":
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        config["architectures"] = ["GPT2LMHeadModel"]
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink()
    elif damage == "no-config":
        (model / "config.json").unlink()
    elif damage == "no-template":
        (model / "chat_template.jinja").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(_recipe(tmp_path, f"{{path: {model}}}"))]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and "Traceback" not in err
    assert not list((tmp_path / "builds" / "r").glob("01-base*"))  # no partial artifact


def test_pickle_allowed_only_when_asked(tmp_path: Path, tiny_llama3: Path, monkeypatch) -> None:
    import torch
    from safetensors.torch import load_file

    model = _copy_model(tiny_llama3, tmp_path / "model")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, f"{{path: {model}}}")
    assert main(["build", str(recipe)]) == 2
    assert main(["build", str(recipe), "--allow-pickle"]) == 0


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["build", str(_recipe(tmp_path, "{hub: meta-llama/Meta-Llama-3-8B-Instruct}"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "meta-llama/Meta-Llama-3-8B-Instruct is not in the hub cache" in err and "HF_HUB_OFFLINE" in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]


def test_not_a_gguf_file(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 not gguf")
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(_recipe(tmp_path, "{path: model.gguf}"))]) == 2
    assert "neither a model folder nor a GGUF file" in capsys.readouterr().err


def test_smollm2_imported_from_gguf_agrees_with_llama_cpp(smollm2: Path, smollm2_gguf: Path) -> None:
    """The dequantized import predicts what llama.cpp predicts from the original Q4_1 file."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text(encoding="utf-8"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template == templates.get("chatml").inference
    text = "The capital of France is Paris. 北京是中国的首都。 def add(a, b): return a + b  # 12345 + 2026"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = Llama(str(smollm2_gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    agree = (cpp.argmax(-1) == hf.argmax(-1)).mean()
    assert agree >= 0.9, agree
    assert np.corrcoef(cpp.ravel(), hf.ravel())[0, 1] > 0.99
