"""Pixel-level fidelity: PSNR and SSIM (per-image means) and NS-LPIPS (LPIPS outside the edited region).

PSNR and SSIM are torchmetrics' functional forms taken per image and averaged over every image
updated, which is how inversion papers report reconstruction (StyleDiffusion Table 3). NS-LPIPS is
StyleDiffusion's measure of what an edit leaves alone: both images at 256 x 256, the edited word's
cross-attention region blacked out, then LPIPS (AlexNet).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from metrics.base import PerImageMean
from metrics.lpips import LPIPS


def _check_pair(images: torch.Tensor, references: torch.Tensor) -> None:
    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} must both be "
                         f"[B, C, H, W] of one shape")


class _PixelFidelity(PerImageMean):
    """A per-image score of images against references of the same shape, in [0, data_range]."""

    higher_is_better = True

    def __init__(self, data_range: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.data_range = data_range

    def per_image(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, images: torch.Tensor, references: torch.Tensor) -> None:
        _check_pair(images, references)
        self.add(self.per_image(images.float(), references.float()))


class PSNR(_PixelFidelity):
    """Mean per-image PSNR in dB; an exact reconstruction scores inf (and so does the mean)."""

    def per_image(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return peak_signal_noise_ratio(images, references, data_range=self.data_range, reduction="none",
                                       dim=(1, 2, 3))


class SSIM(_PixelFidelity):
    """Mean per-image SSIM (Gaussian window 11, sigma 1.5: the standard settings)."""

    def per_image(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return structural_similarity_index_measure(images, references, data_range=self.data_range, reduction="none")


def outside_region(images: torch.Tensor, masks: torch.Tensor, size: int) -> torch.Tensor:
    """Images resized to size x size with the masked region (mask 1 = edited) set to black. Soft masks
    (attention maps scaled to [0, 1]) keep their weights."""
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[0] != images.shape[0] or masks.shape[1] != 1:
        raise ValueError(f"masks {tuple(masks.shape)} must be [B, 1, h, w] or [B, h, w] for images "
                         f"{tuple(images.shape)}")
    images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    keep = 1 - F.interpolate(masks.float(), size=(size, size), mode="bilinear", align_corners=False)
    return images * keep.clamp(0, 1)


class NSLPIPS(LPIPS):
    """LPIPS on the non-edited region (StyleDiffusion): `update(edited, source, edit_masks)`, the masks being
    the edited word's cross-attention region at any resolution (1 = edited)."""

    def __init__(self, net: str = "alex", weights: str | Path | None = None, size: int = 256,
                 key: str = "metrics.ns_lpips.weights", **kwargs):
        super().__init__(net=net, weights=weights, normalize=True, key=key, **kwargs)
        self.size = size  # StyleDiffusion measures at 256 x 256

    def update(self, images: torch.Tensor, references: torch.Tensor, masks: torch.Tensor) -> None:
        _check_pair(images, references)
        super().update(outside_region(images, masks, self.size), outside_region(references, masks, self.size))
