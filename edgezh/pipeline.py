"""Plan a build (which stages, in which order, cached or not) and run it.

The cache key of a stage hashes its recipe section, the hashes of the artifacts it reads, the
identity of outside files it reads, and its code version. A finished folder whose manifest has
that key is reused; anything else is rebuilt atomically.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from edgezh import __version__
from edgezh.errors import UserError
from edgezh.artifacts import Artifact, PeakRSS, canonical_hash, commit, fresh_tmp, package_versions, read_manifest, swap_in
from edgezh.recipe import Recipe
from edgezh.stages import STAGES, StageSpec, folder_name

log = logging.getLogger("edgezh.pipeline")


class PlanError(UserError):
    """The recipe asks for something this build cannot do (exit 2, nothing written)."""


@dataclass
class Step:
    spec: StageSpec
    folder: Path
    config: Any
    needs: list[str]
    status: str = "pending"  # cached | run | forced | blocked | unavailable | skipped (outside --from/--until)
    key: str | None = None
    artifact: Artifact | None = None
    manifest: dict | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Plan:
    recipe: Recipe
    root: Path  # builds/<name>
    steps: list[Step] = field(default_factory=list)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)


def _config_data(config: Any) -> Any:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    if isinstance(config, dict):
        return {k: _config_data(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [_config_data(v) for v in config]
    return config


def _module(spec: StageSpec):
    return importlib.import_module(spec.module)


def stage_key(spec: StageSpec, config: Any, input_hashes: dict[str, str]) -> str:
    module = _module(spec)
    fingerprint = module.fingerprint(config) if hasattr(module, "fingerprint") else {}
    return canonical_hash({
        "stage": spec.name,
        "version": module.VERSION,
        "config": _config_data(config),
        "inputs": input_hashes,
        "fingerprint": fingerprint,
    })


def _use_cache(step: Step, input_hashes: dict[str, str]) -> bool:
    """Set the step's key from its inputs; when its folder holds a complete manifest with that key, take
    the artifact from it (True)."""
    step.key = stage_key(step.spec, step.config, input_hashes)
    manifest = read_manifest(step.folder)
    if manifest is None or manifest.get("key") != step.key:
        return False
    step.manifest, step.artifact = manifest, Artifact.load(step.folder)
    return True


def make_plan(recipe: Recipe, *, until: str | None = None, start: str | None = None,
              force: tuple[str, ...] = (), stages: tuple[StageSpec, ...] = STAGES) -> Plan:
    """Choose the stages to run and mark each cached / to run, without running anything."""
    names = [s.name for s in stages]
    for flag, value in (("--until", until), ("--from", start), *(("--force", f) for f in force)):
        if value is not None and value not in names:
            raise PlanError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    root = Path(recipe.output.root) / recipe.name
    plan = Plan(recipe, root)
    enabled = [s for s in stages if s.enabled(recipe)]
    enabled_names = {s.name for s in enabled}
    last = names.index(until) if until else len(names) - 1
    first = names.index(start) if start else 0
    if until and until not in enabled_names:
        raise PlanError(f"--until {until}: the recipe does not enable stage '{until}' "
                        f"(enabled: {', '.join(s.name for s in enabled)})")
    if start and start not in enabled_names:
        raise PlanError(f"--from {start}: the recipe does not enable stage '{start}'")
    if first > last:
        raise PlanError(f"--from {start} comes after --until {until}")
    for s in enabled:
        index = names.index(s.name)
        step = Step(s, root / folder_name(s.name, stages), s.config(recipe), [n for n in s.needs(recipe) if n in enabled_names])
        if index > last:
            step.status = "skipped"
        elif not s.available:
            step.status = "unavailable"
        plan.steps.append(step)

    missing = [s for s in plan.steps if s.status == "unavailable"]
    if missing:
        listed = ", ".join(f"{s.name} (`{s.spec.section}`)" for s in missing)
        lines = [f"the recipe enables stage(s) this version of edgezh does not have yet: {listed}"]
        have = [s.name for s in plan.steps[:plan.steps.index(missing[0])]]
        lines.append(f"run with --until {have[-1]}, or remove those sections" if have else "remove those sections")
        raise PlanError("\n".join(lines))

    by_name = {s.name: s for s in plan.steps}
    for step in plan.steps:
        if step.status == "skipped":
            continue
        index = names.index(step.name)
        upstream = [by_name[n] for n in step.needs]
        if any(u.artifact is None for u in upstream):
            step.status = "blocked" if index < first else "run"  # an input is not built yet
            continue
        cached = _use_cache(step, {u.name: u.artifact.hash for u in upstream})
        if index >= first and (start is not None or step.name in force):
            step.status = "forced"
        elif cached:
            step.status = "cached"
        else:
            step.status = "blocked" if index < first else "run"
    blocked = [s.name for s in plan.steps if s.status == "blocked"]
    if blocked:
        raise PlanError(f"--from {start}: earlier stage(s) {', '.join(blocked)} are not built with this recipe; "
                        "run the build without --from first")
    return plan


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlanError(f"{root}: another edgezh build is running on this folder") from None
        yield


def run_step(plan: Plan, step: Step) -> Artifact:
    """Run one stage into `<folder>.tmp` and commit it; returns the new artifact."""
    by_name = {s.name: s for s in plan.steps}
    inputs = {n: by_name[n].artifact for n in step.needs}
    step.key = stage_key(step.spec, step.config, {n: a.hash for n, a in inputs.items()})
    tmp = fresh_tmp(step.folder)
    log.info("stage %s: start → %s", step.name, step.folder)
    started = time.time()
    with PeakRSS() as rss:
        info = _module(step.spec).run(step.config, inputs, tmp)
    manifest = {
        "stage": step.name,
        "key": step.key,
        "config": _config_data(step.config),
        "inputs": {n: {"hash": a.hash, "path": str(a.path)} for n, a in inputs.items()},
        "packages": package_versions(),
        "wall_s": round(time.time() - started, 3),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "info": info or {},
    }
    artifact = commit(tmp, step.folder, manifest)
    step.artifact, step.manifest = artifact, read_manifest(step.folder)
    log.info("stage %s: done in %.1fs, peak RSS %.0f MB, hash %s", step.name, manifest["wall_s"],
             manifest["peak_rss_mb"], artifact.hash[:12])
    return artifact


def write_build_manifest(plan: Plan) -> Path:
    done = [s for s in plan.steps if s.artifact is not None]
    data = {
        "name": plan.recipe.name,
        "edgezh": __version__,
        "recipe": plan.recipe.model_dump(mode="json"),
        "stages": {s.name: {"folder": s.folder.name, "key": s.key, "hash": s.artifact.hash,
                            "wall_s": (s.manifest or {}).get("wall_s"),
                            "peak_rss_mb": (s.manifest or {}).get("peak_rss_mb")} for s in done},
    }
    path = plan.root / "manifest.json"
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(part, path)
    return path


def publish_exports(plan: Plan) -> Path | None:
    """Gather the files that stages list in `info["exports"]` (GGUFs, Modelfiles) side by side in
    `<root>/export/` as hard links (copies across file systems), so `FROM ./x.gguf` resolves."""
    files = [(s.artifact.path / name) for s in plan.steps if s.artifact for name in s.artifact.info.get("exports", [])]
    if not files:
        return None
    final = plan.root / "export"
    tmp = fresh_tmp(final)
    for path in files:
        try:
            os.link(path, tmp / path.name)
        except OSError:
            shutil.copy2(path, tmp / path.name)
    swap_in(tmp, final)
    return final


def run_plan(plan: Plan, on_step=None) -> None:
    """Run the plan in order. A step's key is recomputed once its inputs exist, so a stage
    downstream of a rebuilt one stays cached when the rebuilt outputs hash the same.
    `on_step(step, phase)` reports "cached", "start" and "done"."""
    by_name = {s.name: s for s in plan.steps}
    for step in plan.steps:
        if step.status == "skipped":
            continue
        if step.status != "forced":
            if _use_cache(step, {n: by_name[n].artifact.hash for n in step.needs}):
                step.status = "cached"
                log.info("stage %s: cached (%s)", step.name, step.folder)
                if on_step:
                    on_step(step, "cached")
                continue
        if on_step:
            on_step(step, "start")
        run_step(plan, step)
        if on_step:
            on_step(step, "done")
    publish_exports(plan)
    write_build_manifest(plan)
