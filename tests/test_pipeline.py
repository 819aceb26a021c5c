"""The stage runner on real stages: caching, partial reruns, forced reruns, atomic writes, SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_RECIPE, run_cli
from edgezh.artifacts import MANIFEST, sha256_file
from edgezh.pipeline import PlanError, build_lock, make_plan, run_plan
from edgezh.recipe_load import load_recipe
from pipeline_stages import TEST_STAGES


def _recipe(tmp: Path, *overrides: str):
    return load_recipe(TINY_RECIPE, [f"output.root={tmp}", "description=你好，世界", *overrides])


def _build(tmp: Path, *overrides: str, **flags):
    plan = make_plan(_recipe(tmp, *overrides), stages=TEST_STAGES, **flags)
    events = []
    run_plan(plan, on_step=lambda step, phase: events.append((step.name, phase)))
    return plan, events


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    plan, events = _build(root)
    return root, plan, events


def test_first_build_runs_every_stage(built) -> None:
    _root, plan, events = built
    assert events == [("base", "start"), ("base", "done"), ("count", "start"), ("count", "done")]
    count = json.loads((plan.step("count").folder / "count.json").read_text(encoding="utf-8"))
    assert count["ids"] == [57668, 53901, 3922, 102616]  # 你好，世界 in Meta's Llama 3 tokenizer


def test_manifest_records_config_inputs_versions_time_memory_and_hashes(built) -> None:
    _root, plan, _ = built
    base, count = plan.step("base"), plan.step("count")
    manifest = json.loads((count.folder / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["stage"] == "count" and manifest["config"] == {"text": "你好，世界"}
    assert manifest["inputs"]["base"]["hash"] == base.artifact.hash
    assert {"torch", "transformers", "edgezh"} <= set(manifest["packages"])
    assert manifest["wall_s"] > 0 and manifest["peak_rss_mb"] > 50
    for rel, digest in manifest["files"].items():
        assert sha256_file(count.folder / rel) == digest
    base_manifest = json.loads((base.folder / MANIFEST).read_text(encoding="utf-8"))
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(base_manifest["files"])
    assert base_manifest["info"]["template"] == "llama3" and base_manifest["info"]["vocab_size"] == 128256
    build_manifest = json.loads((plan.root / "manifest.json").read_text(encoding="utf-8"))
    assert build_manifest["stages"]["count"]["hash"] == count.artifact.hash


def test_rerun_is_a_noop(built) -> None:
    root, plan, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in plan.root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    again, events = _build(root)
    assert [s.status for s in again.steps] == ["cached", "cached"]
    assert events == [("base", "cached"), ("count", "cached")]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_changing_a_downstream_field_reruns_only_downstream(tmp_path: Path) -> None:
    _build(tmp_path)
    plan, events = _build(tmp_path, "description=再见")
    assert events == [("base", "cached"), ("count", "start"), ("count", "done")]
    assert json.loads((plan.step("count").folder / "count.json").read_text(encoding="utf-8"))["text"] == "再见"


def test_changing_the_base_reruns_everything_downstream(tmp_path: Path) -> None:
    first, _ = _build(tmp_path)
    old_hash = first.step("base").artifact.hash
    plan, events = _build(tmp_path, "base.init.seed=1")
    assert events == [("base", "start"), ("base", "done"), ("count", "start"), ("count", "done")]
    assert plan.step("base").artifact.hash != old_hash


def test_forced_stage_with_identical_outputs_keeps_downstream_cached(tmp_path: Path) -> None:
    first, _ = _build(tmp_path)
    plan, events = _build(tmp_path, force=("base",))
    assert events == [("base", "start"), ("base", "done"), ("count", "cached")]
    assert plan.step("base").artifact.hash == first.step("base").artifact.hash  # deterministic


def test_from_reruns_that_stage_and_later(tmp_path: Path) -> None:
    _build(tmp_path)
    _plan, events = _build(tmp_path, start="count")
    assert events == [("base", "cached"), ("count", "start"), ("count", "done")]


def test_from_needs_earlier_stages_built(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="run the build without --from first"):
        make_plan(_recipe(tmp_path), stages=TEST_STAGES, start="count")


def test_until_stops_early(tmp_path: Path) -> None:
    plan, events = _build(tmp_path, until="base")
    assert events == [("base", "start"), ("base", "done")]
    assert plan.step("count").status == "skipped" and not plan.step("count").folder.exists()


def test_damaged_artifact_is_rebuilt(tmp_path: Path) -> None:
    plan, _ = _build(tmp_path)
    (plan.step("count").folder / "count.json").write_text("{}", encoding="utf-8")  # size changes
    _plan, events = _build(tmp_path)
    assert events[-2:] == [("count", "start"), ("count", "done")]


def test_leftover_tmp_folder_is_not_trusted(tmp_path: Path) -> None:
    plan = make_plan(_recipe(tmp_path), stages=TEST_STAGES)
    tmp = plan.step("base").folder.with_name("01-base.tmp")
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"half")
    _plan, events = _build(tmp_path)
    assert events[0] == ("base", "start") and not tmp.exists()


def test_second_concurrent_build_is_refused(tmp_path: Path) -> None:
    plan = make_plan(_recipe(tmp_path), stages=TEST_STAGES)
    with build_lock(plan.root):
        with pytest.raises(PlanError, match="another edgezh build is running"):
            with build_lock(plan.root):
                pass


def _manifests(root: Path) -> dict[str, tuple]:
    result = {}
    for path in sorted(root.glob("*/*/manifest.json")):
        m = json.loads(path.read_text(encoding="utf-8"))
        result[m["stage"]] = (m["hash"], m["key"], m["files"])
    return result


def test_sigkill_mid_stage_then_rerun_equals_uninterrupted_build(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "edgezh.cli", "build", str(TINY_RECIPE), "--until", "base"]
    proc = subprocess.Popen([*cmd, f"output.root={killed}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_folder = killed / "tiny-llama3" / "01-base.tmp"
    deadline = time.time() + 120
    while not tmp_folder.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert tmp_folder.exists(), "the stage never started"
    time.sleep(0.5)  # well inside the stage: tokenizer conversion and init take seconds
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "tiny-llama3" / "01-base" / MANIFEST).exists()
    resumed = run_cli("build", str(TINY_RECIPE), "--until", "base", f"output.root={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    fresh = run_cli("build", str(TINY_RECIPE), "--until", "base", f"output.root={clean}", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert _manifests(killed) == _manifests(clean) != {}
    assert not tmp_folder.exists()


def test_cli_rerun_reports_cached_and_dry_run_shows_plan(tmp_path: Path) -> None:
    args = ("build", str(TINY_RECIPE), f"output.root={tmp_path}")
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "01-base" in first.stdout and "manifest.json" in first.stdout
    assert (tmp_path / "tiny-llama3" / "build.log").read_text(encoding="utf-8").count("stage base: done") == 1
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0 and "cached" in second.stderr
    dry = run_cli(*args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and re.search(r"│ base\s+│ 01-base\s+│ cached", dry.stdout), dry.stdout
    changed = run_cli(*args, "base.init.seed=7", "--dry-run", cwd=tmp_path)
    assert re.search(r"│ base\s+│ 01-base\s+│ will run", changed.stdout), changed.stdout
    assert "~0.067 B parameters" in changed.stdout  # 2 layers × 256 with a 128 256-token vocabulary, untied


def test_enabled_stage_this_version_lacks_fails_clearly(tmp_path: Path) -> None:
    """A stage in the table without a module (how a stage looks before it is built) is refused, not skipped."""
    from dataclasses import replace

    from pipeline_stages import COUNT

    missing = replace(COUNT, module=None)
    with pytest.raises(PlanError) as info:
        make_plan(_recipe(tmp_path), stages=(TEST_STAGES[0], missing))
    assert "does not have yet: count (`description`)" in str(info.value)
    assert "run with --until base" in str(info.value)
    plan = make_plan(_recipe(tmp_path), stages=(TEST_STAGES[0], missing), until="base")
    assert [s.status for s in plan.steps] == ["run", "skipped"]
