"""Experiment loggers."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_can_go_online() -> bool:
    """True with an API key in the environment or ~/.netrc (offline runs can be synced later)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(project: str, save_dir: str, mode: str = "auto", **kwargs):
    """WandbLogger, offline unless wandb can log in (mode: auto | online | offline)."""
    from lightning.pytorch.loggers import WandbLogger

    offline = mode == "offline" or (mode == "auto" and not wandb_can_go_online())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        log.info("wandb runs offline under %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`",
                 save_dir, save_dir)
    return WandbLogger(project=project, save_dir=save_dir, offline=offline, **kwargs)
