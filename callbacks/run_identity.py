"""Stamp every checkpoint with what wrote it, so that a resume can refuse another run's checkpoint."""

from __future__ import annotations

import lightning as L

from utils.checks import CHECKPOINT_KEY


class RunIdentity(L.Callback):
    """Writes {"method", "model"} into each checkpoint (train.py compares it with the resuming run's)."""

    def __init__(self, method: str, model: str):
        self.identity = {"method": method, "model": model}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = dict(self.identity)
