"""What several metrics share."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerImageMean(Metric):
    """The mean of a per-image score over every image updated. The states are a sum and a count, so under
    DDP each rank scores its own images and `compute` gives the mean over the whole set."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def add(self, scores: torch.Tensor) -> None:
        """Accumulate [B] per-image scores."""
        self.score_sum += scores.detach().double().sum().to(self.score_sum.device)
        self.count += float(scores.numel())

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count).float()
