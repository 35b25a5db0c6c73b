"""Hydra callbacks of the entry points."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from utils.checks import check_writable
from utils.errors import UserError
from utils.task import USER_ERROR_EXIT, refuse_to_overwrite


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
