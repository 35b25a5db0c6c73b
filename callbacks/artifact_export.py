"""Writes the module's artifacts (embeddings, adapter weights, ...) when training ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from callbacks.non_finite import ensure_finite
from utils.loggers import log_wandb_artifact

log = logging.getLogger(__name__)


class ArtifactExport(L.Callback):
    """Call `export_artifacts(dirpath)` on rank 0 at the end of training (and every N steps if asked,
    into dirpath/step_NNNNNN/), so a run's result is usable without its checkpoint."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, name: str = "artifacts"):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.name = name  # the wandb Artifact's name (the method's), when wandb logs the run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and trainer.is_global_zero:
            ensure_finite(trainer)
            pl_module.export_artifacts(self.dirpath / f"step_{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:  # a smoke run writes nothing, like checkpoints
            ensure_finite(trainer)
            paths = pl_module.export_artifacts(self.dirpath)
            log.info("artifacts: %s", ", ".join(str(p) for p in paths))
            log_wandb_artifact(trainer, paths, name=self.name, kind="model", root=self.dirpath)
