"""The progress bar, showing chosen logged metrics read only when it refreshes.

Lightning turns every metric logged with `prog_bar=True` into a Python number after every batch, whether the
bar refreshes or not; for a metric on the GPU that read makes the host wait until the GPU has finished the
step, so the host cannot queue the next step meanwhile. The methods log without `prog_bar`, and this bar reads
the metrics it shows from the trainer's logged values every `refresh_rate` batches.
"""

from __future__ import annotations

from typing import Sequence

from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10, metrics: Sequence[str] = ("train/loss",), **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics = tuple(metrics)

    def get_metrics(self, trainer, pl_module) -> dict:
        shown = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        shown.update({name: float(logged[name]) for name in self.metrics if name in logged})
        return shown
