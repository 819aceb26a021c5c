"""The `edgezh` command as a person meets it: help, listings, explain, doctor."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT, run_cli
from edgezh.stages import STAGES


def test_help_lists_the_verbs() -> None:
    result = run_cli("--help", cwd=ROOT)
    assert result.returncode == 0
    for verb in ("build", "ls", "explain", "doctor"):
        assert verb in result.stdout


def test_build_help_documents_flags() -> None:
    result = run_cli("build", "--help", cwd=ROOT)
    for flag in ("--dry-run", "--until", "--from", "--force", "--allow-pickle", "key.path=value"):
        assert flag in result.stdout


def test_unknown_flag_is_a_usage_error() -> None:
    result = run_cli("build", "recipes/quickstart.yaml", "--untill", "base", cwd=ROOT)
    assert result.returncode == 2 and "unrecognized arguments: --untill" in result.stderr


def test_ls_stages_in_order_with_availability() -> None:
    result = run_cli("ls", "stages", cwd=ROOT)
    assert result.returncode == 0
    positions = [result.stdout.index(f" {s.name} ") for s in STAGES]
    assert positions == sorted(positions)
    base_line = next(line for line in result.stdout.splitlines() if " base " in line)
    assert "yes" in base_line


def test_ls_templates_shows_stop_tokens() -> None:
    out = run_cli("ls", "templates", cwd=ROOT).stdout
    assert "<|eom_id|>" in out and "<|im_end|>" in out and "llama3.1" in out


def test_ls_recipes_parses_each(tmp_path: Path) -> None:
    out = run_cli("ls", "recipes", cwd=tmp_path).stdout
    assert "quickstart" in out and "tiny-llama3" in out and "invalid" not in out


def test_explain_prints_types_defaults_docs() -> None:
    out = run_cli("explain", "sft.lora", cwd=ROOT).stdout
    assert "rank" in out and "alpha" in out and "all-linear" in out and "Adapter rank" in out


def test_doctor_reports_versions_engine_and_missing_pieces() -> None:
    result = run_cli("doctor", cwd=ROOT)
    assert result.returncode == 0
    out = " ".join(result.stdout.split())
    for check in ("torch", "transformers", "llama.cpp", "CUDA", "bitsandbytes", "DeepSpeed", "RAM", "disk"):
        assert check in out
    assert "AVX" in out or "NEON" in out  # llama.cpp's own system info
    from importlib import metadata

    from edgezh.commands.doctor import OPTIONAL

    for dist, (enables, how) in OPTIONAL.items():
        try:
            expected = metadata.version(dist)  # installed: its version is shown
        except metadata.PackageNotFoundError:
            expected = f"disables {enables} — {how}"  # missing: what it disables and how to get it
        assert expected in out, dist
