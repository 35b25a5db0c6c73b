"""Seconds per training step and peak GPU memory: logged, and written to timing.json at the end."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
import torch

from utils.io import write_json


class StepTimer(L.Callback):
    """Times steps after `warmup` steps (compilation, allocator growth and cuDNN tuning stay out)."""

    def __init__(self, dirpath: str, warmup: int = 5):
        self.dirpath = Path(dirpath)
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module.device)
        if self._last is not None and batch_idx >= self.warmup:
            self.times.append(now - self._last)
            pl_module.log("perf/step_s", self.times[-1], batch_size=1)
        self._last = now

    def summary(self, pl_module) -> dict:
        device = pl_module.device
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "precision": str(pl_module.trainer.precision), "timed_steps": len(self.times)}
        if self.times:
            out.update(mean_step_s=statistics.fmean(self.times), median_step_s=statistics.median(self.times),
                       steps_per_s=1 / statistics.median(self.times))
        if device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        return out

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_json(self.dirpath / "timing.json", self.summary(pl_module))
