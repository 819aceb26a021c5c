"""The `edgezh` command as a person meets it: help, listings, explain, doctor."""

from __future__ import annotations

import re

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
    rows = re.findall(r"│ (\d\d) │ (\S+)", result.stdout)
    assert rows == [(f"{i:02d}", s.name) for i, s in enumerate(STAGES, start=1)]
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


# ---------------------------------------------------------------- one error path, quiet builds

def test_second_build_on_a_building_folder_exits_2_with_one_line(tmp_path: Path) -> None:
    import fcntl

    from conftest import TINY_RECIPE

    folder = tmp_path / "tiny-llama3"
    folder.mkdir()
    with open(folder / ".lock", "w") as held:  # another build holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli("build", str(TINY_RECIPE), f"output.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "another edgezh build is running" in errors[0], result.stderr
    assert not (folder / "01-base").exists() and not (folder / "build.log").exists()


def test_user_errors_print_one_error_line_per_line(capsys) -> None:
    from edgezh.cli import print_error
    from edgezh.pipeline import PlanError

    print_error(PlanError("first [b]thing[/b]\nsecond thing"))
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: first [b]thing[/b]", "error: second thing"]


def test_chat_arguments_live_in_commands_and_load_no_runtime(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = ("import sys, edgezh.cli; edgezh.cli._parser(); "
             "print(sorted(m for m in sys.modules if m.startswith(('edgezh.runtime', 'edgezh.tui', 'textual'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    for command in ("chat", "serve"):
        helped = subprocess.run([sys.executable, "-m", "edgezh.runtime", command, "--help"], capture_output=True,
                                text=True, cwd=tmp_path, timeout=120)
        assert helped.returncode == 0 and "--gpu-layers" in helped.stdout, helped.stderr
    missing = subprocess.run([sys.executable, "-m", "edgezh.runtime", "chat", str(tmp_path / "nope.gguf")],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_build_output_sends_library_output_to_the_log(tmp_path: Path, capsys) -> None:
    import logging
    import sys
    import warnings

    from edgezh import progress, quiet

    library = logging.getLogger("edgezh-test-library")
    own = logging.StreamHandler(sys.stderr)  # a library's console handler, attached before the build
    library.addHandler(own)
    library.propagate = False
    log = tmp_path / "build.log"
    try:
        with quiet.build_output(log):
            print("printed by a library")
            sys.stderr.write("a bar\r50%\r100%\n")
            library.warning("a library warning")
            logging.getLogger("peft-like").warning("a propagating warning")
            warnings.warn("a FutureWarning", FutureWarning)
            logging.getLogger("edgezh.test").info("edgezh's own record")
            progress.console.print("edgezh's own line")
    finally:
        library.removeHandler(own)
    seen = capsys.readouterr()
    assert "edgezh's own line" in seen.err
    for text in ("printed by a library", "100%", "a library warning", "a propagating warning", "FutureWarning",
                 "edgezh's own record"):
        assert text not in seen.err + seen.out
        assert text in log.read_text(encoding="utf-8"), text
    assert "50%" not in log.read_text(encoding="utf-8")  # a bar keeps its last state
    assert own.stream is sys.stderr  # handed back
    with quiet.build_output(log, verbose=True):
        print("shown live with -v")
    assert "shown live with -v" in capsys.readouterr().err
    assert log.read_text(encoding="utf-8").count("shown live with -v") == 1


def test_build_console_shows_edgezh_lines_only_and_the_log_keeps_the_rest(tmp_path: Path) -> None:
    from conftest import TINY_RECIPE

    result = run_cli("build", str(TINY_RECIPE), f"output.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    log = tmp_path / "tiny-llama3" / "build.log"
    for noise in ("WARNING", "Warning", "Loading weights", "[real_accelerator", "llama_model_loader", "Traceback",
                  "it/s]"):
        assert noise not in console, noise
    assert str(log) in result.stderr  # the console says where the rest is
    assert len(result.stderr.splitlines()) <= 8, result.stderr  # a line at the start, one per stage
    text = log.read_text(encoding="utf-8")
    assert "stage quantize: done" in text and "llama_model_quantize" in text
    verbose = run_cli("-v", "build", str(TINY_RECIPE), f"output.root={tmp_path}", "--until", "base",
                      "--force", "base", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "stage base: start" in verbose.stderr and "stage base: start" not in result.stderr


def test_a_launched_processs_progress_lines_become_the_stages_bar(tmp_path: Path, capsys) -> None:
    import json
    import sys

    from edgezh import progress, quiet

    log = tmp_path / "build.log"
    with quiet.build_output(log):
        progress.begin_stage("03-sft: training")
        try:  # what the deepspeed launcher relays from rank 0 (edgezh.train.session.TrainingBar there)
            for payload in ({"id": "sft training", "total": 4, "completed": 0, "unit": "step", "info": ""},
                            {"id": "sft training", "completed": 2, "info": "loss 1.500"}):
                sys.stdout.write(progress.MARKER + json.dumps(payload) + "\n")
            bar = progress._stage.remote["sft training"]
            task = bar._progress._tasks[bar._task]
            assert (task.total, task.completed, task.fields["info"]) == (4, 2, "loss 1.500")
            sys.stdout.write(progress.MARKER + json.dumps({"id": "sft training", "done": True}) + "\n")
            assert progress._stage.remote == {}
        finally:
            progress.end_stage()
    text = log.read_text(encoding="utf-8")
    assert progress.MARKER not in text and "sft training: 2/4 step" in text
    assert "edgezh-progress" not in capsys.readouterr().err
