"""The task wrapper of the entry points: clear one-line errors, loggers always closed."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from utils.errors import ArtifactError, find_user_error

log = logging.getLogger(__name__)
USER_ERROR_EXIT = 2


def close_loggers() -> None:
    """Finish a wandb run if one is open, so the next multirun job starts its own."""
    if "wandb" in sys.modules:
        import wandb
        if wandb.run is not None:
            wandb.finish()


def task(fn: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """Run an entry point's body; a UserError anywhere below becomes one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as e:
            err = find_user_error(e)
            if err is None:
                raise
            log.error("%s", err)
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None
        finally:
            close_loggers()

    return wrapped


def refuse_to_overwrite(output_dir: str | Path, resuming: bool, artifacts=("checkpoints",)) -> None:
    """Stop if the output folder already holds a previous run's results (unless resuming into it)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP workers share rank 0's folder
        return
    out = Path(output_dir)
    taken = [a for a in artifacts if (out / a).exists()]
    if taken and not resuming:
        resume = " or resume with ckpt_path=<its checkpoint>" if taken[0] == "checkpoints" else ""
        raise ArtifactError(f"{out} already holds a run ({taken[0]}); choose a new hydra.run.dir{resume}")
