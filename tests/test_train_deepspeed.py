"""DeepSpeed: the built-in and JSON configs are generated and validated without a GPU, bad ones are
refused before any process starts, and ZeRO-2 over 2 CPU processes (gloo, through the deepspeed
launcher) trains the tiny Llama 3 into an adapter shaped like a one-process run's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from edgezh.errors import UserError  # noqa: E402
from edgezh.recipe import DPOConfig, SFTConfig  # noqa: E402
from edgezh.train.deepspeed import build_config  # noqa: E402
from edgezh.train.job import run_job  # noqa: E402
from edgezh.train.launch import LAUNCH_FOLDER, dry_run_command, launch_command, prepare, run_launched  # noqa: E402
from test_train import FAST, build_data, make_job  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tiny_llama3: Path) -> Path:
    return build_data(tiny_llama3)


# ---------------------------------------------------------------- configs, no process


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_builtin_configs_validate_on_cpu(name: str, stage: int) -> None:
    cfg = SFTConfig(deepspeed=name, num_processes=2, batch_size=2, grad_accum=3)
    config = build_config(name, cfg)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills the autos itself
    assert "optimizer" not in config  # the Trainer's torch AdamW: no DeepSpeed op to compile


def test_offload_validates_for_a_gpu_and_is_refused_on_cpu() -> None:
    cfg = SFTConfig(deepspeed="zero2_offload", num_processes=2)
    config = build_config("zero2_offload", cfg, cuda=True, gpu_bf16=True)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UserError, match="needs a CUDA GPU.*offload_optimizer"):
        build_config("zero2_offload", cfg, cuda=False, gpu_bf16=False)


def test_json_config_file_validates_and_keeps_its_values(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "bf16": {"enabled": "auto"},
                                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
                                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                                                                             "warmup_max_lr": "auto",
                                                                             "warmup_num_steps": "auto"}},
                                "zero_optimization": {"stage": 1}}))
    cfg = DPOConfig(deepspeed=str(path), num_processes=4, batch_size=2, grad_accum=2)
    config = build_config(str(path), cfg, where="dpo.deepspeed")
    assert config["zero_optimization"] == {"stage": 1} and config["optimizer"]["params"]["lr"] == "auto"


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"zero_optimization": {"stage": 7}}), "DeepSpeed rejects the config"),
    (json.dumps({"zero_optimization": {"stage": 2, "no_such_option": 1}}), "DeepSpeed rejects the config.*no_such_option"),
    (json.dumps({"train_batch_size": 5, "train_micro_batch_size_per_gpu": "auto"}), "disagrees with the recipe.*train_batch_size"),
    (json.dumps({"fp16": {"enabled": True}}), "disagrees with the recipe.*fp16"),
    (json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}}), "needs a CUDA GPU.*NVMe"),
    (json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "some_auto": "auto"}), "does not fill: some_auto"),
])
def test_bad_json_configs_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    cfg = SFTConfig(deepspeed=str(path), num_processes=2)
    with pytest.raises(UserError, match=message) as info:
        build_config(str(path), cfg, where="sft.deepspeed")
    assert str(info.value).startswith("sft.deepspeed:")
    if "JSON" in message:
        assert str(path) in str(info.value)


def test_missing_json_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(UserError, match="cannot read the DeepSpeed config .*nowhere.json"):
        build_config(str(missing), SFTConfig(deepspeed=str(missing)))


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        build_config("zero2", SFTConfig(deepspeed="zero2", precision="fp16"), cuda=False, gpu_bf16=False)


def test_launch_command_and_dry_run(tmp_path: Path) -> None:
    single = SFTConfig()
    assert dry_run_command(single) is None
    cfg = SFTConfig(deepspeed="zero2", num_processes=2)
    command = launch_command("j.json", "r.json", cfg, master_port=1234)
    assert command[command.index("--master_port") + 1] == "1234" and "--hostfile" not in command
    assert command[command.index("--num_gpus") + 1] == "2"
    assert command[-5:] == ["--no_local_rank", "--module", "edgezh.train.job", "j.json", "r.json"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = SFTConfig(deepspeed="zero3", num_processes=8, num_nodes=2, hostfile=str(hosts))
    shown = dry_run_command(multi)
    assert shown.startswith("deepspeed --num_gpus 8 --num_nodes 2 --hostfile ") and str(hosts) in shown
    assert shown.endswith("--module edgezh.train.job JOB.json RESULT.json")


def test_invalid_config_is_refused_before_any_process(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    job = make_job("sft", tmp_path, tiny_llama3, data_dir, max_steps=2, deepspeed=str(path), num_processes=2, **FAST)
    started = time.perf_counter()
    with pytest.raises(UserError, match="DeepSpeed rejects the config"):
        prepare(job, job.section(), "sft")
    assert time.perf_counter() - started < 20
    assert not (Path(job.scratch) / LAUNCH_FOLDER).exists()  # no job file written, nothing launched


# ---------------------------------------------------------------- 2 CPU processes


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_zero2_two_cpu_processes_matches_one_process_adapter(tiny_llama3: Path, data_dir: Path, tmp_path: Path) -> None:
    settings = dict(max_steps=3, save_steps=100, **{**FAST, "batch_size": 2})
    launched = make_job("sft", tmp_path / "ds", tiny_llama3, data_dir, deepspeed="zero2", num_processes=2, **settings)
    cfg = launched.section()
    assert prepare(launched, cfg, "sft") and launched.deepspeed["zero_optimization"]["stage"] == 2
    facts = run_launched(launched, cfg)
    assert facts["steps"] == 3 and facts["processes"] == 2 and facts["output"] == "adapter", facts
    assert facts["final_loss"] is not None
    single = make_job("sft", tmp_path / "one", tiny_llama3, data_dir, **settings)
    run_job(single)
    shapes = _adapter_shapes(Path(launched.out) / "adapter")
    assert shapes and shapes == _adapter_shapes(Path(single.out) / "adapter")
    assert (Path(launched.out) / "trainer_log.jsonl").is_file()


def test_pipeline_refuses_a_bad_deepspeed_config_before_launching(tiny_llama3: Path, tmp_path: Path) -> None:
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe
    from test_train import stages_with_data, write_recipe

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "no_such_option": True}}))
    training = f"sft: {{deepspeed: {bad}, num_processes: 2, max_steps: 1}}\n"
    builds = tmp_path / "builds"
    recipe = load_recipe(write_recipe(tmp_path / "src", tiny_llama3, training), [f"output.root={builds}"])
    started = time.perf_counter()
    with pytest.raises(UserError, match="sft.deepspeed: DeepSpeed rejects the config.*no_such_option"):
        run_plan(make_plan(recipe, until="sft", stages=stages_with_data()))
    assert time.perf_counter() - started < 60
    assert not list(builds.rglob(LAUNCH_FOLDER)) and not list(builds.rglob("job.json"))
