"""Object masks from coarse maps (cross-attention): DenseCRF refinement with CutLER's settings, and IoU.

`densecrf` turns a soft or binary [h, w] map into a mask at the image's resolution that follows the
image's edges: the unary term is the softmax of the logits [1 - m, m] upsampled to the image, the
pairwise terms a Gaussian (smoothness) and a bilateral (colour) kernel; holes are then filled.
`refine_mask` applies CutLER's rule: a CRF result whose IoU with its input mask is below 0.5 is
dropped (the input mask is kept instead), since the CRF then followed something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.morphology import fill_holes


@dataclass(frozen=True)
class CRFSettings:
    """CutLER (Wang et al., 2023) MaskCut's DenseCRF settings."""

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    min_iou: float = 0.5  # a CRF result this far from its input is dropped


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two binary masks of one shape (two empty masks: 1)."""
    a, b = a.bool(), b.bool()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map [..., h, w] scaled to [0, 1] between its own minimum and maximum (EM's masks threshold this)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (maps - low) / (high - low).clamp(min=1e-12)


def upsample(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[h, w] -> [H, W], bilinear."""
    return F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def densecrf(image: torch.Tensor, mask: torch.Tensor, settings: CRFSettings = CRFSettings()) -> torch.Tensor:
    """image [3, H, W] in [0, 1], mask [h, w] in [0, 1] -> bool mask [H, W] following the image's edges."""
    import pydensecrf.densecrf as dcrf

    _, height, width = image.shape
    m = upsample(mask.detach().cpu(), (height, width))
    probs = torch.softmax(torch.stack([1 - m, m]), dim=0)  # the logits [1 - m, m], as MaskCut feeds them
    unary = np.ascontiguousarray(-torch.log(probs.clamp(min=1e-8)).reshape(2, -1).numpy().astype(np.float32))
    rgb = np.ascontiguousarray((image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb, rgbim=rgb,
                             compat=settings.bilateral_compat)
    q = np.array(crf.inference(settings.iterations)).reshape(2, height, width)
    labels = torch.from_numpy(q.argmax(0).astype(np.float32))
    return fill_holes(labels) > 0.5


def refine_mask(image: torch.Tensor, mask: torch.Tensor, settings: CRFSettings = CRFSettings()
                ) -> tuple[torch.Tensor, bool]:
    """The CRF-refined mask [H, W] and True, or the input mask (upsampled, at 0.5) and False when the CRF
    result's IoU with it is below `settings.min_iou` (CutLER's rule)."""
    _, height, width = image.shape
    initial = upsample(mask.detach().cpu(), (height, width)) > 0.5
    refined = densecrf(image, mask, settings)
    if mask_iou(refined, initial) < settings.min_iou:
        return initial, False
    return refined, True
