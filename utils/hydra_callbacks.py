"""Hydra callbacks of the entry points."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from utils.checks import check_writable
from utils.errors import UserError
from utils.task import USER_ERROR_EXIT, refuse_to_overwrite

ROOT = Path(__file__).resolve().parents[1]


class CheckRunDir(Callback):
    """Check a run's folder before Hydra writes anything there: it must take files, and must not hold an
    earlier run's results (whose .hydra/ records and log Hydra would otherwise rewrite first). The entry
    point's config names what marks a folder as taken (`run_dir_taken_by`); a training run resuming from a
    checkpoint may go on."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        out = Path(config.hydra.run.dir)
        try:
            refuse_to_overwrite(out, resuming=config.get("ckpt_path") is not None,
                                artifacts=tuple(config.run_dir_taken_by), can_resume="ckpt_path" in config)
            check_writable(out, "hydra.run.dir")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None


class EvaluateSweep(Callback):
    """After a training multirun, score its jobs' artifacts with evaluate.py in <sweep dir>/<name>/: all of
    them in one evaluation (`together`: sliders composed, strengths one per job) or one evaluation each, side by
    side in <sweep dir>/<name>/table.csv (`each`). `overrides` are evaluate.py's (model, metrics, prompts, sweep).
    An experiment whose result needs several trained artifacts at once (slider composition, transfer to another
    backbone) is then one command."""

    def __init__(self, overrides: list[str] | None = None, artifacts: str = "together", name: str = "evaluation"):
        if artifacts not in ("together", "each"):
            raise UserError(f"hydra.callbacks.evaluate_sweep.artifacts={artifacts!r}; use together or each")
        self.overrides, self.artifacts, self.name = list(overrides or ()), artifacts, name

    def command(self, sweep_dir: Path, jobs: list[Path]) -> list[str]:
        quoted = ",".join(f"'{job}'" for job in jobs)
        out = sweep_dir / self.name
        if self.artifacts == "together":
            args = [f"artifact=[{quoted}]", f"hydra.run.dir={out}"]
        else:
            args = ["-m", f"artifact={quoted}", f"hydra.sweep.dir={out}"]
        return [sys.executable, str(ROOT / "evaluate.py"), *args, *self.overrides]

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import subprocess

        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not jobs:
            print(f"error: {sweep_dir} holds no job folders to evaluate", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT)
        print(f"evaluating {len(jobs)} jobs' artifacts ({self.artifacts}) into {sweep_dir / self.name}", flush=True)
        code = subprocess.run(self.command(sweep_dir, jobs), cwd=ROOT).returncode  # relative paths: the project's
        if code:
            raise SystemExit(code)
