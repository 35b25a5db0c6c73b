"""What a denoiser is conditioned on, shared by the UNet and rectified-flow backbones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Conditioning:
    """What the denoiser is conditioned on: text hidden states, + pooled text (SDXL, SD3, FLUX) and size ids (SDXL)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def map(self, fn) -> "Conditioning":
        return Conditioning(*(None if x is None else fn(x) for x in (self.hidden_states, self.pooled, self.time_ids)))

    def expand(self, batch: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning to `batch` rows."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {batch}")
        return self.map(lambda x: x.expand(batch, *x.shape[1:]))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0]
        return Conditioning(
            torch.cat([c.hidden_states for c in items]),
            None if first.pooled is None else torch.cat([c.pooled for c in items]),
            None if first.time_ids is None else torch.cat([c.time_ids for c in items]),
        )
