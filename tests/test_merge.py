"""Streaming LoRA merge against peft itself: adapters made with peft on the tiny Llama 3, merged
shard by shard, compared with peft's merge_and_unload and with the peft model's logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgezh.errors import UserError
from edgezh.export.lora import LoraAdapter
from edgezh.export.merge import merge

IDS = torch.tensor([[128000, 57668, 53901, 3922, 9906, 1917, 0, 42]])


def load_base(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def small_llama(hidden: int = 128, layers: int = 2, seed: int = 0):
    """A random Llama with a small vocabulary: an adapter made on it belongs to another base."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_adapter(model, lora_config, folder: Path, seed: int) -> Path:
    """Wrap `model` with peft, randomise every trainable adapter tensor (peft starts lora_B — and
    embedding lora_A — at zero, which would make the merge a no-op), save with save_pretrained."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:  # lora_A/B, lora_embedding_A/B, modules_to_save copies
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
    return folder


def variant_configs():
    from peft import LoraConfig

    return {
        "all_linear": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "lm_head": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]),
        "rslora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 12},
                             alpha_pattern={"q_proj": 4}),
        "embedding": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
    }


# tensors each variant must change (layers 0 and 1)
LINEAR = [f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")]
CHANGED = {
    "all_linear": set(LINEAR),
    "lm_head": set(LINEAR) | {"lm_head.weight"},
    "rslora": {n for n in LINEAR if any(m in n for m in ("q_proj", "v_proj", "down_proj"))},
    "embedding": {n for n in LINEAR if "o_proj" in n} | {"model.embed_tokens.weight"},
}


@pytest.fixture(scope="module")
def adapters(tiny_llama3: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(load_base(tiny_llama3), config, root / name, seed=i)
            for i, (name, config) in enumerate(variant_configs().items())}


@pytest.fixture(scope="module")
def base_logits(tiny_llama3: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_base(tiny_llama3)(IDS).logits


@pytest.fixture(scope="module")
def merged_lm_head(tiny_llama3: Path, adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "lm_head"
    merge(tiny_llama3, adapters["lm_head"], out)
    return out


# ---------------------------------------------------------------- equality with peft


@pytest.mark.parametrize("variant", list(CHANGED))
def test_merge_equals_peft_merge_and_unload(variant, tiny_llama3, adapters, base_logits, tmp_path) -> None:
    from peft import PeftModel

    out = tmp_path / "merged"
    facts = merge(tiny_llama3, adapters[variant], out)

    peft_model = PeftModel.from_pretrained(load_base(tiny_llama3), adapters[variant]).eval()
    with torch.no_grad():
        peft_logits = peft_model(IDS).logits
    expected = peft_model.merge_and_unload().state_dict()
    got = load_file(out / "model.safetensors")
    base = load_file(tiny_llama3 / "model.safetensors")
    assert set(got) == set(expected) == set(base)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32
        assert (tensor - expected[name]).abs().max().item() <= 1e-6, name
    changed = {name for name in got if not torch.equal(got[name], base[name])}
    assert changed == CHANGED[variant]
    assert facts["tensors_changed"] == len(CHANGED[variant])
    assert facts["modules_to_save"] == (["lm_head.weight"] if variant == "lm_head" else [])
    assert (facts["shards"], facts["dtype"], facts["qlora_note"]) == (1, "float32", None)
    assert not (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out / "manifest.json").exists()  # the base artifact's manifest is not the merged model's

    with torch.no_grad():
        merged_logits = load_base(out)(IDS).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max().item() > 1e-2  # the adapter really changed the model


def test_rank_and_alpha_patterns_give_per_module_scales(adapters) -> None:
    adapter = LoraAdapter.load(adapters["rslora"])
    scales = {lora.module: lora.scale for lora in adapter._loras.values()}
    assert scales["model.layers.0.self_attn.q_proj"] == pytest.approx(4 / 8 ** 0.5)     # alpha_pattern, r
    assert scales["model.layers.0.self_attn.v_proj"] == pytest.approx(16 / 2 ** 0.5)    # rank_pattern
    assert scales["model.layers.1.mlp.down_proj"] == pytest.approx(16 / 12 ** 0.5)      # full-path rank_pattern
    assert scales["model.layers.0.mlp.down_proj"] == pytest.approx(16 / 8 ** 0.5)
    assert adapter.targets() == CHANGED["rslora"]


def test_fan_in_fan_out_delta_is_transposed(tmp_path) -> None:
    """Conv1D-style weights (in, out), as peft's fan_in_fan_out stores them (GPT-2 layout)."""
    from peft import LoraConfig

    LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, generator=generator), torch.randn(10, 2, generator=generator)
    save_file({"base_model.model.h.0.c_attn.lora_A.weight": a, "base_model.model.h.0.c_attn.lora_B.weight": b},
              tmp_path / "adapter_model.safetensors")
    weight = torch.randn(6, 10, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    merged = LoraAdapter.load(tmp_path).merged("h.0.c_attn.weight", weight)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, weight.float() + (b @ a).T * 3)
    untouched = torch.ones(3, dtype=torch.bfloat16)
    assert torch.equal(LoraAdapter.load(tmp_path).merged("h.0.ln_1.weight", untouched), untouched.float())


# ---------------------------------------------------------------- shards and dtypes


def test_multi_shard_base_merges_into_several_shards(tiny_llama3, adapters, merged_lm_head, tmp_path) -> None:
    sharded = tmp_path / "sharded"
    load_base(tiny_llama3).save_pretrained(sharded, max_shard_size="20MB")
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    out = tmp_path / "merged"
    facts = merge(sharded, adapters["lm_head"], out, shard_size_mb=40)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert facts["shards"] == len(files) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    single = load_file(merged_lm_head / "model.safetensors")
    assert set(index["weight_map"]) == set(single)
    total = 0
    for file in files:
        part = load_file(file)
        assert all(index["weight_map"][name] == file.name for name in part)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert len(part) == 1 or size <= 40 * 2**20, file.name  # a shard exceeds the limit only for one big tensor
        total += size
        for name, tensor in part.items():
            assert torch.equal(tensor, single[name]), name
    assert index["metadata"]["total_size"] == total
    assert facts["tensors_changed"] == len(CHANGED["lm_head"])
    merged_model = load_base(out)  # transformers reads the index
    assert torch.equal(merged_model.lm_head.weight, single["lm_head.weight"])


def test_dtype_conversion_casts_the_fp32_merge(tiny_llama3, adapters, merged_lm_head, tmp_path) -> None:
    out = tmp_path / "bf16"
    facts = merge(tiny_llama3, adapters["lm_head"], out, dtype="bfloat16")
    assert facts["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    single = load_file(merged_lm_head / "model.safetensors")
    for name, tensor in load_file(out / "model.safetensors").items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, single[name].to(torch.bfloat16)), name


def test_qlora_note_from_training_manifest(tiny_llama3, adapters, tmp_path) -> None:
    stage = tmp_path / "03-sft"
    shutil.copytree(adapters["rslora"], stage / "adapter")
    (stage / "manifest.json").write_text(json.dumps({"stage": "sft", "config": {"method": "qlora"}}))
    note = merge(tiny_llama3, stage / "adapter", tmp_path / "out")["qlora_note"]
    assert "4-bit" in note and "16-bit" in note and str(tiny_llama3) in note
    assert merge(tiny_llama3, adapters["rslora"], tmp_path / "out2", trained_4bit=True)["qlora_note"] == note


def test_context_overrides_of_the_training_reach_the_merged_config(tiny_llama3, adapters, tmp_path) -> None:
    """A LoRA trained with a longer context (sft.rope_theta / max_position_embeddings) is exported with it."""
    from transformers import AutoConfig

    from edgezh.artifacts import Artifact
    from edgezh.export import merge_stage
    from edgezh.models.context import context_changes
    from edgezh.recipe import MergeConfig

    stage = tmp_path / "03-sft"
    shutil.copytree(adapters["rslora"], stage / "adapter")
    base = Artifact("base", tmp_path / "01-base", {}, {"model_path": str(tiny_llama3)})
    training = Artifact("sft", stage, {}, {"method": "lora", "config_overrides": {"rope_theta": 1e6, "max_position_embeddings": 16384}})
    out = tmp_path / "out"
    out.mkdir()
    info = merge_stage.run(MergeConfig(), {"base": base, "sft": training}, out)
    assert info["config_overrides"] == {"rope_theta": 1e6, "max_position_embeddings": 16384}
    before, after = AutoConfig.from_pretrained(tiny_llama3), AutoConfig.from_pretrained(out)
    assert before.rope_parameters["rope_theta"] != 1e6
    assert after.rope_parameters["rope_theta"] == 1e6 and after.max_position_embeddings == 16384
    same = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("rope_parameters", "max_position_embeddings", "_name_or_path")}
    assert same(after) == same(before) and after.rope_parameters == {**before.rope_parameters, "rope_theta": 1e6}
    plain = merge(tiny_llama3, adapters["rslora"], tmp_path / "plain")  # no overrides: the base's config
    unchanged = AutoConfig.from_pretrained(tmp_path / "plain")
    assert same(unchanged) == same(before) and unchanged.rope_parameters == before.rope_parameters
    assert unchanged.max_position_embeddings == before.max_position_embeddings and plain["config_overrides"] == {}
    # a config that still keeps rope_theta at the top level keeps it there
    assert context_changes({"rope_theta": 5e5}, {"rope_theta": 1e6}) == {"rope_theta": 1e6}
    assert context_changes({}, {"max_position_embeddings": 4096}) == {"max_position_embeddings": 4096}


# ---------------------------------------------------------------- bad input


def test_adapter_for_another_base_names_the_tensor(tiny_llama3, tmp_path) -> None:
    from peft import LoraConfig

    adapter = save_adapter(small_llama(hidden=128), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", seed=1)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\[128, 128\].*\[256, 256\]"):
        merge(tiny_llama3, adapter, out)
    assert not out.exists()


def test_adapter_targeting_missing_modules(tiny_llama3, tmp_path) -> None:
    from peft import LoraConfig

    # same widths as the tiny base but four layers: layers 2 and 3 do not exist in the base
    model = small_llama(hidden=256, layers=4)
    adapter = save_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", seed=2)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"2 tensor\(s\) the base model does not have \(model\.layers\.2\.self_attn"
                                        r"\.q_proj\.weight, model\.layers\.3\.self_attn\.q_proj\.weight\).*another model"):
        merge(tiny_llama3, adapter, out)
    assert not out.exists()


def test_missing_adapter_weights(tiny_llama3, adapters, tmp_path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(adapters["rslora"] / "adapter_config.json", folder)
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        merge(tiny_llama3, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_adapters_say_what(tiny_llama3, adapters, tmp_path) -> None:
    from peft import LoraConfig

    dora = save_adapter(small_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "dora", 3)
    with pytest.raises(UserError, match=r"unsupported adapter option.*DoRA \(use_dora: true\)"):
        merge(tiny_llama3, dora, tmp_path / "out")
    ia3 = tmp_path / "ia3"
    shutil.copytree(adapters["rslora"], ia3)
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(UserError, match="peft_type is 'IA3'; only LoRA"):
        LoraAdapter.load(ia3)
    pissa = tmp_path / "pissa"
    shutil.copytree(adapters["rslora"], pissa)
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa", "lora_bias": True}))
    with pytest.raises(UserError, match=r"a bias on lora_B.*init_lora_weights: pissa changed the base weights"):
        LoraAdapter.load(pissa)
    assert not (tmp_path / "out").exists()


def test_truncated_base_shard(tiny_llama3, adapters, tmp_path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(tiny_llama3 / "config.json", base)
    with open(tiny_llama3 / "model.safetensors", "rb") as src, open(base / "model.safetensors", "wb") as dst:
        dst.write(src.read(8 * 2**20))
    with pytest.raises(UserError, match=r"model\.safetensors: truncated"):
        merge(base, adapters["rslora"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tiny_llama3, adapters, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write the merged model"):
        merge(tiny_llama3, adapters["rslora"], blocker / "out")


# ---------------------------------------------------------------- memory


MEASURE = textwrap.dedent("""
    import resource, sys
    import torch, safetensors.torch, edgezh.progress, edgezh.export.merge as m
    if sys.argv[1] == "merge":
        m.merge(sys.argv[2], sys.argv[3], sys.argv[4], shard_size_mb=int(sys.argv[5]))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and malloc_trim are Linux's")
def test_merge_never_holds_the_whole_model(tmp_path) -> None:
    """Peak RSS of a merge stays near one shard, on a model several times larger.

    The merge runs in a fresh subprocess that prints its own peak RSS (getrusage(RUSAGE_SELF).ru_maxrss,
    read at the end, so it covers the whole merge); a second subprocess imports exactly the same modules
    and does nothing else. Their difference is what the merge itself needed. Using each child's own
    RUSAGE_SELF instead of the parent's RUSAGE_CHILDREN keeps other subprocesses of the test session out
    of the number. Expected: one output shard being filled (20 MB, or one larger tensor such as the
    65 MB embedding) + the adapter + fp32 temporaries of one tensor — nowhere near the ~480 MB model.
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=48, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=64000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")  # uniform_ below is ~5x faster than transformers' own init
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=generator)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base, max_shard_size="100MB")
    save_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter, seed=4)
    del model

    shards = [p.stat().st_size for p in base.glob("*.safetensors")]
    adapter_size = (adapter / "adapter_model.safetensors").stat().st_size
    assert len(shards) >= 5 and sum(shards) > 4 * max(shards)

    def peak_kib(*args: str) -> int:
        done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return int(done.stdout.split()[-1])

    baseline = peak_kib("imports")
    merged = peak_kib("merge", str(base), str(adapter), str(tmp_path / "out"), "20")
    growth = (merged - baseline) * 1024
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > len(shards)  # the merge really ran
    assert growth < 1.5 * (max(shards) + adapter_size), \
        f"merge grew RSS by {growth >> 20} MiB; largest shard {max(shards) >> 20} MiB, adapter {adapter_size >> 20} MiB, model {sum(shards) >> 20} MiB"


def test_lm_head_adapter_on_tied_embeddings_is_refused(tmp_path) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in load_file(tmp_path / "base" / "model.safetensors")
    adapter = save_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                           tmp_path / "adapter", seed=5)
    with pytest.raises(UserError, match="ties lm_head to embed_tokens"):
        merge(tmp_path / "base", adapter, tmp_path / "out")


def test_cli_merge_twice_says_already_merged(tiny_llama3, adapters, tmp_path, capsys) -> None:
    from edgezh.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_llama3), str(adapters["all_linear"]), "-o", str(out)]) == 0
    assert "merged" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(tiny_llama3), str(adapters["all_linear"]), "-o", str(out)]) == 0
    assert "already merged" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["merge", str(tiny_llama3), str(adapters["all_linear"]), "-o", str(out), "--dtype", "bfloat16"]) == 0
    assert "already merged" not in capsys.readouterr().out  # a different request merges again


def test_adapter_applied_during_conversion_equals_converting_the_merge(tiny_llama3, adapters, merged_lm_head, tmp_path) -> None:
    """`edgezh convert --adapter` (merge fused into conversion) writes the same GGUF as merge-then-convert."""
    from edgezh.cli import main

    merged = tmp_path / "merged"
    assert main(["merge", str(tiny_llama3), str(adapters["lm_head"]), "-o", str(merged)]) == 0
    assert main(["convert", str(merged), "-o", str(tmp_path / "two-step.gguf"), "--template", "llama3"]) == 0
    assert main(["convert", str(tiny_llama3), "-o", str(tmp_path / "fused.gguf"), "--template", "llama3",
                 "--adapter", str(adapters["lm_head"])]) == 0
    assert main(["convert", str(tiny_llama3), "-o", str(tmp_path / "plain.gguf"), "--template", "llama3"]) == 0

    def tensors(name: str) -> dict[str, bytes]:
        from gguf import GGUFReader

        return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(tmp_path / name).tensors}

    fused = tensors("fused.gguf")
    assert fused == tensors("two-step.gguf")  # byte for byte, every tensor
    plain = tensors("plain.gguf")
    assert fused["output.weight"] != plain["output.weight"] and fused["blk.0.attn_q.weight"] != plain["blk.0.attn_q.weight"]
