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


def wandb_runs(trainer) -> list:
    """The wandb runs among a trainer's loggers (none when wandb is not used)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_wandb_table(trainer, key: str, rows: list[dict]) -> None:
    """One wandb.Table of dict rows (one row per swept value), columns in first-seen order."""
    runs = wandb_runs(trainer)
    if not runs or not rows:
        return
    import wandb

    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = [[row.get(c) for c in columns] for row in rows]
    for i in range(len(columns)):  # wandb refuses a column of numbers and strings (a sweep's values and "all")
        if any(isinstance(r[i], str) for r in data) and any(isinstance(r[i], (int, float)) for r in data):
            for r in data:
                r[i] = None if r[i] is None else str(r[i])
    table = wandb.Table(columns=columns, data=data)
    for run in runs:
        run.log({key: table}, step=trainer.global_step)


def log_wandb_artifact(trainer, paths: list[Path], name: str, kind: str, root: Path | None = None) -> None:
    """The exported files (folders included) as one wandb Artifact of type `kind`, each named by its path under
    `root` (an inversion run's images each have a mapping_networks.safetensors); offline runs keep it for
    `wandb sync`."""
    runs = wandb_runs(trainer)
    if not runs or not paths:
        return
    import wandb

    def entry(path: Path) -> str:
        return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name

    for run in runs:
        artifact = wandb.Artifact(name=f"{name}-{run.id}", type=kind)
        for path in map(Path, paths):
            if path.is_dir():
                artifact.add_dir(str(path), name=entry(path))
            elif path.is_file():
                artifact.add_file(str(path), name=entry(path))
        run.log_artifact(artifact)
