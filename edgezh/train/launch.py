"""Multi-process training through the deepspeed launcher.

A section with `deepspeed`, `num_processes > 1`, `num_nodes > 1` or a `hostfile` trains in processes
started by `deepspeed --num_gpus N [--num_nodes M --hostfile FILE]`, each running
`python -m edgezh.train.job JOB.json RESULT.json` (where there is no GPU, DeepSpeed starts N CPU
processes that talk over gloo). The job JSON goes to the stage's scratch folder; rank 0 writes the
result JSON, read back here. Everything is validated (`edgezh.train.deepspeed.build_config`) before
the job file is written or any process starts.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from edgezh.errors import UserError

LAUNCH_FOLDER = "launch"
TAIL_LINES = 40


def needs_launch(cfg) -> bool:
    """Whether the section trains in launched processes rather than in this one."""
    return cfg.deepspeed is not None or cfg.num_processes > 1 or cfg.num_nodes > 1 or cfg.hostfile is not None


def prepare(job, cfg, section: str) -> bool:
    """Fill `job.deepspeed` with the validated config; True when the job must be launched."""
    if not needs_launch(cfg):
        return False
    from edgezh.train.deepspeed import require

    require(f"{section}.deepspeed" if cfg.deepspeed is not None else f"{section}.num_processes")
    if cfg.deepspeed is not None:
        from edgezh.train.deepspeed import build_config

        job.deepspeed = build_config(cfg.deepspeed, cfg, where=f"{section}.deepspeed")
    if cfg.hostfile is not None and not Path(os.path.expanduser(cfg.hostfile)).is_file():
        raise UserError(f"{section}.hostfile: no such file: {cfg.hostfile}")
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launcher() -> list[str]:
    """The deepspeed launcher of this Python (its `deepspeed` script, run with this interpreter)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def launch_command(job_path, result_path, cfg, *, master_port: int | None = None,
                   launcher: list[str] | None = None) -> list[str]:
    """The command that runs the job on every rank: `deepspeed --num_gpus N [--num_nodes M --hostfile F]
    --master_port P --no_local_rank --module edgezh.train.job JOB.json RESULT.json`."""
    command = list(launcher or _launcher())
    command += ["--num_gpus", str(cfg.num_processes)]
    if cfg.num_nodes > 1 or cfg.hostfile is not None:
        command += ["--num_nodes", str(cfg.num_nodes)]
        if cfg.hostfile is not None:
            command += ["--hostfile", os.path.expanduser(cfg.hostfile)]
    command += ["--master_port", str(master_port if master_port is not None else free_port())]
    command += ["--no_local_rank", "--module", "edgezh.train.job", str(job_path), str(result_path)]
    return command


def dry_run_command(cfg) -> str | None:
    """What `--dry-run` shows for a training section: the launch command (with JOB.json / RESULT.json
    placeholders for the files written into the stage's scratch folder), or None when it trains in
    the builder's own process."""
    if not needs_launch(cfg):
        return None
    return shlex.join(launch_command("JOB.json", "RESULT.json", cfg, master_port=29500, launcher=["deepspeed"]))


def _env() -> dict[str, str]:
    from edgezh.paths import cache_dir

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[2])  # edgezh importable in every rank, installed or not
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_launched(job, cfg, *, section: str | None = None, stream=None) -> dict:
    """Write the job into its scratch folder, run it on every rank through the deepspeed launcher
    (output streamed to the console), and return the facts rank 0 wrote. A failed launch is a UserError
    carrying the end of the log."""
    section = section or job.kind
    stream = stream if stream is not None else sys.stdout
    folder = Path(job.scratch) / LAUNCH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    job_path, result_path = folder / "job.json", folder / "result.json"
    result_path.unlink(missing_ok=True)
    job.save(job_path)
    command = launch_command(job_path, result_path, cfg)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    print(f"[{section}] launching: {shlex.join(command)}", file=stream, flush=True)
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
                                   text=True, encoding="utf-8", errors="replace", bufsize=1)
    except OSError as exc:
        raise UserError(f"{section}: cannot start the deepspeed launcher: {exc}") from None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            stream.write(line)
            stream.flush()
            tail.append(line.rstrip("\n"))
        code = process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code != 0:
        raise UserError(f"{section}: the launched training failed (exit code {code}); the end of its log:\n"
                        + "\n".join(tail))
    if not result_path.is_file():
        raise UserError(f"{section}: the launched training ended without writing {result_path}; the end of its log:\n"
                        + "\n".join(tail))
    return json.loads(result_path.read_text(encoding="utf-8"))
