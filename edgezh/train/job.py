"""A training job: everything one training run (pretrain, SFT, DPO) needs, as plain JSON, and `run_job` to run it here.

The stage builds a TrainJob and calls `run_job(job)` in its own process. The same JSON can be handed
to several processes started by a launcher (`python -m edgezh.train.job job.json`): each process
runs `run_job`; the Trainer coordinates them and only the main process writes outputs. Nothing a
worker needs lives outside the job (no globals, no recipe). Importing this module is cheap.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("pretrain", "sft", "dpo")


@dataclass
class TrainJob:
    """One training run, JSON-serialisable."""

    kind: str
    """`pretrain`, `sft` or `dpo`."""
    config: dict[str, Any]
    """The recipe section (PretrainConfig / SFTConfig / DPOConfig) as `model_dump(mode="json")`."""
    model_dir: str
    """The Hugging Face folder of the model to start from (the base, the pretrain stage's `model/`, or SFT's `model/`
    after a full SFT)."""
    data_dir: str
    """The data artifact folder (train.parquet / eval.parquet, text_train.parquet / text_eval.parquet,
    pairs_train.jsonl / pairs_eval.jsonl)."""
    template: str
    """Chat format name in the template registry."""
    pad_token_id: int
    """The data stage's pad id (distinct from every stop token)."""
    max_length: int
    """Longest sequence in tokens (the section's `max_length`, else the data's)."""
    out: str
    """The stage's output folder (a `.tmp` folder while the stage runs)."""
    scratch: str
    """Checkpoints and caches that survive a killed run (`edgezh.artifacts.scratch_dir`)."""
    start_adapter: str | None = None
    """A LoRA adapter folder to continue (DPO after SFT: the SFT artifact's `adapter/`)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides applied when loading the model (`rope_theta`, `max_position_embeddings`)."""
    deepspeed: dict | None = None
    """A DeepSpeed config passed to TrainingArguments(deepspeed=...), or None."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TrainJob.kind must be one of {KINDS}, not {self.kind!r}")

    def section(self):
        """The recipe section, typed again (PretrainConfig / SFTConfig / DPOConfig). The dump holds every field,
        defaults included; the sub-settings a method does not use are dropped so the section validates as given."""
        from edgezh.recipe import DPOConfig, PretrainConfig, SFTConfig

        data = dict(self.config)
        if data.get("method") == "full":
            data.pop("lora", None)
        if data.get("method") != "qlora":
            data.pop("qlora", None)
        return {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}[self.kind].model_validate(data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainJob":
        return cls(**json.loads(text))

    def save(self, path: Path) -> Path:
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> "TrainJob":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def run_job(job: TrainJob) -> dict:
    """Run the job in this process; returns the facts for the manifest's `info`. Settings this machine
    cannot honour are refused before any model library is imported."""
    from edgezh.train.precision import job_precision

    cfg = job.section()  # typed once here; the trainer gets it as it is
    precision = job_precision(job, cfg)
    if job.kind == "pretrain":
        from edgezh.train import pretrain

        return pretrain.train(job, precision, cfg)
    if job.kind == "sft":
        from edgezh.train import sft

        return sft.train(job, precision, cfg)
    from edgezh.train import dpo

    return dpo.train(job, precision, cfg)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgezh.train.job JOB.json [RESULT.json]`: run a job; the main process writes the result."""
    from edgezh.errors import UserError

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m edgezh.train.job JOB.json [RESULT.json]", file=sys.stderr)
        return 2
    try:
        job = TrainJob.load(Path(args[0]))
        facts = run_job(job)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(args) == 2 and _is_main_process():
        Path(args[1]).write_text(json.dumps(facts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
