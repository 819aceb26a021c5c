"""The export half as a user runs it: base → gguf → quantize → modelfile, and the standalone verbs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import TINY_RECIPE, run_cli
from edgezh import templates
from edgezh.cli import main
from edgezh.stages import folder_name


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """The tiny-llama3 recipe built in full (f16 GGUF, q4_k_m and q8_0, Modelfiles)."""
    root = tmp_path_factory.mktemp("export")
    result = run_cli("build", str(TINY_RECIPE), f"output.root={root}", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "tiny-llama3"


def test_export_folder_has_every_gguf_beside_its_modelfile(tiny_build: Path) -> None:
    export = tiny_build / "export"
    names = sorted(p.name for p in export.iterdir())
    assert names == ["Modelfile.f16", "Modelfile.q4_k_m", "Modelfile.q8_0",
                     "tiny-llama3-f16.gguf", "tiny-llama3-q4_k_m.gguf", "tiny-llama3-q8_0.gguf"]
    for kind in ("f16", "q4_k_m", "q8_0"):
        text = (export / f"Modelfile.{kind}").read_text(encoding="utf-8")
        assert re.search(rf"^FROM \./tiny-llama3-{kind}\.gguf$", text, re.M)
        # hard links: the export view costs no disk
        assert (export / f"tiny-llama3-{kind}.gguf").stat().st_nlink >= 2


def test_modelfile_comes_from_the_registry(tiny_build: Path) -> None:
    fmt = templates.get("llama3")
    text = (tiny_build / "export" / "Modelfile.q4_k_m").read_text(encoding="utf-8")
    assert f'TEMPLATE """{fmt.ollama}"""' in text
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    assert stops == list(fmt.stop_tokens) and "<|eot_id|>" in stops
    assert f'SYSTEM """{fmt.default_system}"""' in text
    assert "PARAMETER num_ctx 2048" in text  # from the recipe
    assert "Meta Llama 3 Community License" in text


def test_quantize_records_types_sizes_and_no_fallback_for_256_multiples(tiny_build: Path) -> None:
    manifest = json.loads((tiny_build / folder_name("quantize") / "manifest.json").read_text(encoding="utf-8"))
    quants = manifest["info"]["quants"]
    assert set(quants) == {"q4_k_m", "q8_0"}
    assert "Q4_K" in quants["q4_k_m"]["tensor_types"] and quants["q4_k_m"]["fallback"] == []
    assert set(quants["q8_0"]["tensor_types"]) <= {"Q8_0", "F32"}
    f16 = (tiny_build / folder_name("gguf") / "tiny-llama3-f16.gguf").stat().st_size
    assert quants["q4_k_m"]["bytes"] < quants["q8_0"]["bytes"] < f16
    # llama.cpp's q4_k_m mix keeps output.weight in Q6_K; in this tiny model the two 128256×256
    # embedding matrices are 98% of the weights, so the file averages between 4.5 and 6.56 bits.
    assert 4.5 < quants["q4_k_m"]["bits_per_weight"] < 6.56 and quants["q8_0"]["bits_per_weight"] == 8.5


def test_quantized_gguf_runs_in_llama_cpp(tiny_build: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(str(tiny_build / "export" / "tiny-llama3-q4_k_m.gguf"), n_ctx=128, verbose=False, n_threads=2)
    ids = llm.tokenize("你好".encode(), add_bos=True, special=True)
    assert ids[0] == 128000 and ids.count(128000) == 1
    out = llm.create_completion("你好", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_rerun_is_cached_and_prints_ollama_commands(tiny_build: Path) -> None:
    result = run_cli("build", str(TINY_RECIPE), f"output.root={tiny_build.parent}", cwd=tiny_build.parent)
    assert result.returncode == 0
    assert result.stderr.count("cached") >= 4 and "built in" not in result.stderr
    assert f"ollama create tiny-llama3:q4_k_m -f {tiny_build / 'export' / 'Modelfile.q4_k_m'}" in result.stdout
    assert "ollama run tiny-llama3:q4_k_m" in result.stdout


def test_cli_quantize_and_modelfile(tiny_build: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "m-f16.gguf"
    os.link(tiny_build / "export" / "tiny-llama3-f16.gguf", source)
    assert main(["quantize", str(source), "q5_k_m"]) == 0
    assert "bits/weight" in capsys.readouterr().out
    assert (tmp_path / "m-q5_k_m.gguf").is_file()
    assert main(["modelfile", str(tmp_path / "m-q5_k_m.gguf")]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create m:q5_k_m -f {tmp_path / 'Modelfile.q5_k_m'}" in printed
    assert "FROM ./m-q5_k_m.gguf" in (tmp_path / "Modelfile.q5_k_m").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["bad-type", "not-gguf", "missing", "read-only"])
def test_cli_quantize_bad_input_exits_2_and_leaves_nothing(case: str, tiny_build: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "m-f16.gguf"
    os.link(tiny_build / "export" / "tiny-llama3-f16.gguf", source)
    qtype, out_dir = "q4_k_m", tmp_path / "out"
    if case == "bad-type":
        qtype = "q4_k_x"
    elif case == "not-gguf":
        source = tmp_path / "x.gguf"
        source.write_bytes(b"not a gguf file at all")
    elif case == "missing":
        source = tmp_path / "none.gguf"
    else:
        out_dir.mkdir()
        out_dir.chmod(0o500)
        if os.access(out_dir, os.W_OK):  # root ignores permissions: use a path under a file instead
            out_dir = tmp_path / "m-f16.gguf" / "sub"
    code = main(["quantize", str(source), qtype, "-o", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    expected = {"bad-type": "q4_k_x", "not-gguf": "not a GGUF file", "missing": "no such GGUF file", "read-only": str(out_dir)}[case]
    assert expected in err
    assert not list(tmp_path.glob("**/*q4_k*"))


def test_disk_space_is_checked_before_writing(tmp_path: Path) -> None:
    import shutil

    from edgezh.errors import UserError
    from edgezh.export.native import ensure_writable

    free = shutil.disk_usage(tmp_path).free
    ensure_writable(tmp_path, free // 2, "a small file")  # fits
    with pytest.raises(UserError, match=r"GiB free, a huge file needs about"):
        ensure_writable(tmp_path, free * 2, "a huge file")


def test_cli_convert_bad_folder_exits_2_and_writes_nothing(tiny_llama3: Path, tmp_path: Path, capsys) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama3, model)
    (model / "tokenizer.json").unlink()
    assert main(["convert", str(model), "-o", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "Traceback" not in err
    assert not list(tmp_path.glob("m.gguf*"))


def test_cli_merge_adapter_for_another_base_exits_2(tiny_llama3: Path, tmp_path: Path, capsys) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(0)
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tiny_llama3), str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "q_proj" in err and "shape" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
