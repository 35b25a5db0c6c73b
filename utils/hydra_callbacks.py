"""Hydra callbacks of the entry points."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from utils.errors import UserError
from utils.task import USER_ERROR_EXIT, refuse_to_overwrite


class RefuseTakenRunDir(Callback):
    """Refuse a run whose folder already holds an earlier run's results before Hydra writes anything there
    (its .hydra/ records and log would otherwise be rewritten first). The entry point's config names what
    marks a folder as taken (`run_dir_taken_by`); a training run resuming from a checkpoint may go on."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            refuse_to_overwrite(Path(config.hydra.run.dir), resuming=config.get("ckpt_path") is not None,
                                artifacts=tuple(config.run_dir_taken_by))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None
