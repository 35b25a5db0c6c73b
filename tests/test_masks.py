"""DenseCRF mask refinement (CutLER's settings and rule) on synthetic images."""

from __future__ import annotations

import torch

from diffusion import masks
from diffusion.masks import CRFSettings, mask_iou, refine_mask


def disc_image(size: int = 64, radius: int = 18) -> tuple[torch.Tensor, torch.Tensor]:
    """A red disc on a gray background: the image [3, H, W] in [0, 1] and the disc's mask [H, W]."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((x - size / 2 + 0.5) ** 2 + (y - size / 2 + 0.5) ** 2) <= radius ** 2
    image = torch.full((3, size, size), 0.5)
    image[:, disc] = torch.tensor([0.85, 0.15, 0.15])[:, None]
    return image, disc


def test_a_coarse_noisy_mask_snaps_to_the_object_edge():
    """A 16x16 map like a cross-attention map (blurred, shifted, noisy) becomes the disc's outline."""
    image, disc = disc_image()
    coarse = torch.nn.functional.avg_pool2d(disc[None, None].float(), 4)[0, 0]  # 16x16
    coarse = torch.roll(coarse, shifts=(1, -1), dims=(0, 1))  # off by 4 px, as attention often is
    coarse = (coarse + 0.25 * torch.randn(coarse.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    before = mask_iou(masks.upsample(coarse, (64, 64)) > 0.5, disc)
    refined, kept = refine_mask(image, coarse)
    after = mask_iou(refined, disc)
    assert kept and refined.shape == (64, 64) and refined.dtype == torch.bool
    assert before < 0.85 and after > 0.95 and after > before + 0.1, (before, after)


def test_holes_are_filled():
    image, disc = disc_image()
    image[:, 30:34, 30:34] = 0.5  # a gray hole inside the disc, the background's colour
    refined, kept = refine_mask(image, disc.float())
    assert kept and refined[30:34, 30:34].all()


def test_a_crf_result_far_from_its_input_is_dropped(monkeypatch):
    """CutLER's rule: IoU(CRF result, input mask) < 0.5 keeps the input mask instead."""
    image, disc = disc_image()
    far = torch.zeros(64, 64, dtype=torch.bool)
    far[:10, :10] = True
    monkeypatch.setattr(masks, "densecrf", lambda *args, **kwargs: far)
    mask, kept = refine_mask(image, disc.float())
    assert not kept and torch.equal(mask, disc)
    near = disc.clone()
    near[:, :26] = False  # IoU with the disc about 0.6: kept
    monkeypatch.setattr(masks, "densecrf", lambda *args, **kwargs: near)
    mask, kept = refine_mask(image, disc.float())
    assert kept and torch.equal(mask, near)
    mask, kept = refine_mask(image, disc.float(), CRFSettings(min_iou=0.9))
    assert not kept and torch.equal(mask, disc)
