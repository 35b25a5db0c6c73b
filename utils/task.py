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


def refuse_to_overwrite(output_dir: str | Path, resuming: bool, artifacts=("checkpoints",),
                        can_resume: bool = False) -> None:
    """Stop if the output folder already holds a previous run's results (unless resuming into it; `can_resume`:
    the entry point resumes from checkpoints)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":  # DDP workers share rank 0's folder
        return
    out = Path(output_dir)
    taken = [a for a in artifacts if (out / a).exists()]
    if taken and not resuming:
        resume = " or resume with ckpt_path=<its checkpoint>" if can_resume and taken[0] == "checkpoints" else ""
        raise ArtifactError(f"{out} already holds a run ({taken[0]}); choose a new hydra.run.dir{resume}")


def config_error_line(error: BaseException) -> str:
    """One line for an error of Hydra's or OmegaConf's: an unknown config option (with the available ones), an
    override of a key that does not exist, a missing mandatory value."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Config search path", "provider=",
                                                                     "full_key:", "object_type"))]
    text = " ".join(lines)
    if "Available options in" in text:
        head, options = text.split("Available options in", 1)
        group, _, names = options.partition(":")
        text = f"{head.strip()}; available options in{group}: {', '.join(names.split())}"
    cause = error.__cause__
    if cause is not None and str(cause).splitlines():
        text += f" ({str(cause).splitlines()[0]})"
    if "Missing mandatory value" in text:
        text += "; set it on the command line (key=value)"
    return text


def hydra_entry(main: Callable[[], object]) -> None:
    """Run an entry point's @hydra.main function so that Hydra's and OmegaConf's own errors (an unknown
    method or model, a misspelt key, a missing value) end like the project's: one `error:` line, exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # hand the errors to us instead of Hydra's multi-line report
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {config_error_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
