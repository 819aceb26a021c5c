"""Artifacts: a folder of outputs plus manifest.json, written atomically.

A stage writes into `<NN-stage>.tmp/`; only a finished stage is renamed to `<NN-stage>/`, so a
killed build leaves nothing that a rerun could trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("edgezh", "torch", "transformers", "tokenizers", "safetensors", "gguf",
                    "llama_cpp_python", "peft", "trl", "datasets", "deepspeed", "gptqmodel")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Artifact:
    """A finished stage's folder and what its manifest says."""

    stage: str
    path: Path
    files: dict[str, str]  # relative path → sha256
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (template, dtype, counts…)

    @property
    def hash(self) -> str:
        return canonical_hash({"stage": self.stage, "files": self.files})

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def load(cls, folder: Path) -> "Artifact":
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return cls(manifest["stage"], folder, manifest["files"], manifest.get("info", {}))


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a finished artifact folder, or None if absent, unreadable or incomplete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for rel, _digest in manifest.get("files", {}).items():
        if not (folder / rel).is_file():
            return None
    if any((folder / rel).stat().st_size != size for rel, size in manifest.get("sizes", {}).items()):
        return None
    return manifest


def hash_outputs(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    files, sizes = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = sha256_file(path)
        sizes[rel] = path.stat().st_size
    return files, sizes


class PeakRSS:
    """Samples the resident memory of this process and its children while a stage runs: the RSS alone, or,
    once there are children (forked workers share their parent's pages), the sum of every process's PSS,
    which counts a shared page once."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._children = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        proc = psutil.Process()
        children = proc.children(recursive=True)
        self._children = bool(children)
        if not children:
            return proc.memory_info().rss
        total = 0
        for each in (proc, *children):
            try:
                total += _pss(each)
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            # reading a process's PSS walks its page tables (10–100 ms): sample every 2 s while there are children
            self._stop.wait(self.interval if not self._children else max(self.interval, 2.0))

    def __enter__(self) -> "PeakRSS":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _pss(proc: psutil.Process) -> int:
    """Proportional set size: Linux's smaps_rollup (one line to read), else the RSS."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def fresh_tmp(final: Path) -> Path:
    """An empty `<final>.tmp` folder (leftovers of a killed run are removed)."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def scratch_dir(out: Path, cfg: Any, inputs: dict[str, "Artifact"]) -> Path:
    """A folder that survives a killed stage (checkpoints to resume from), beside the stage's `.tmp`
    output folder and named by a hash of the stage's config and inputs, so only a rerun of the same
    work resumes from it. The runner deletes the stage's scratch folders once the stage is committed."""
    config = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else cfg
    key = canonical_hash({"config": config, "inputs": {name: a.hash for name, a in sorted(inputs.items())}})
    folder = out.with_name(out.name.removesuffix(".tmp") + ".scratch") / key[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def swap_in(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final`: the old one moves aside first and is removed
    after, so `final` is at every moment either the old folder or the new one."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def commit(tmp: Path, final: Path, manifest: dict) -> Artifact:
    """Hash the outputs in `tmp`, write the manifest, and move `tmp` to `final` atomically."""
    files, sizes = hash_outputs(tmp)
    manifest = {**manifest, "files": files, "sizes": sizes}
    manifest["hash"] = Artifact(manifest["stage"], final, files).hash
    manifest_tmp = tmp / (MANIFEST + ".part")
    manifest_tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(manifest_tmp, tmp / MANIFEST)
    swap_in(tmp, final)
    scratch = final.with_name(final.name + ".scratch")
    if scratch.exists():
        shutil.rmtree(scratch)
    return Artifact(manifest["stage"], final, files, manifest.get("info", {}))


def now() -> float:
    return time.time()
