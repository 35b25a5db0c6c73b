"""Seconds per training step and peak GPU memory: logged, and written to timing.json at the end (with every
timed step's seconds, `step_s`, from batch `first_timed_batch` on: steps slowed every N batches show there).

On a GPU the steps are timed by CUDA events recorded at the end of every batch and read once the GPU has
passed them, so timing never makes the host wait for the GPU (a per-step synchronisation would stop the
host from queueing the next step while the GPU works, and slow the very steps it measures). The time
between two events is the step's period as the GPU sees it, waits for the host included.
"""

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
        self.first_timed: int | None = None  # the batch index of times[0]
        self._marks: list[tuple[int, object]] = []  # (batch index, CUDA event or perf_counter time), oldest first

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((batch_idx, event))
        else:
            self._marks.append((batch_idx, time.perf_counter()))
        if self._collect(wait=False):
            # a CPU tensor: Lightning would copy a float to the module's device, a copy that waits for the GPU
            pl_module.log("perf/step_s", torch.tensor(self.times[-1]), batch_size=1)

    def _collect(self, wait: bool) -> bool:
        """Turn consecutive marks the GPU has reached into step times (all of them when `wait`)."""
        found = False
        while len(self._marks) >= 2:
            (_, start), (index, end) = self._marks[0], self._marks[1]
            if isinstance(end, float):
                seconds = end - start
            elif wait or end.query():
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                break
            self._marks.pop(0)
            if index >= self.warmup:
                if self.first_timed is None:
                    self.first_timed = index
                self.times.append(seconds)
                found = True
        return found

    def summary(self, pl_module) -> dict:
        self._collect(wait=True)
        device = pl_module.device
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "precision": str(pl_module.trainer.precision), "timed_steps": len(self.times)}
        if self.times:
            out.update(mean_step_s=statistics.fmean(self.times), median_step_s=statistics.median(self.times),
                       steps_per_s=1 / statistics.median(self.times), first_timed_batch=self.first_timed,
                       step_s=[round(t, 6) for t in self.times])
        if device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        return out

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            write_json(self.dirpath / "timing.json", self.summary(pl_module))
