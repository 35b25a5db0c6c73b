"""PSNR, SSIM and NS-LPIPS: torchmetrics' functional values, known inputs, the edited region ignored."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from metrics.image_quality import NSLPIPS, PSNR, SSIM, outside_region
from tests.test_lpips import weights_file


def pairs(n: int = 4, size: int = 48, noise: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(0, 1)
    return a, b


def test_psnr_and_ssim_are_torchmetrics_per_image_means():
    a, b = pairs()
    psnr, ssim = PSNR(), SSIM()
    for metric in (psnr, ssim):  # two updates: the mean runs over every image, not over batches
        metric.update(a[:1], b[:1])
        metric.update(a[1:], b[1:])
    per_image_psnr = torch.stack([peak_signal_noise_ratio(a[i:i + 1], b[i:i + 1], data_range=1.0) for i in range(4)])
    per_image_ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    assert psnr.compute().item() == pytest.approx(per_image_psnr.mean().item(), abs=1e-5)
    assert ssim.compute().item() == pytest.approx(per_image_ssim.mean().item(), abs=1e-5)
    # a per-image mean differs from the PSNR of the pooled error when the images' errors differ
    b2 = b.clone()
    b2[0] = a[0] + 0.3 * (b[0] - a[0])
    psnr2 = PSNR()
    psnr2.update(a, b2)
    pooled = peak_signal_noise_ratio(a, b2, data_range=1.0).item()
    assert abs(psnr2.compute().item() - pooled) > 0.1


def test_identical_images_give_inf_psnr_and_unit_ssim():
    a, _ = pairs()
    psnr, ssim = PSNR(), SSIM()
    psnr.update(a, a)
    ssim.update(a, a)
    assert math.isinf(psnr.compute().item())
    assert ssim.compute().item() == pytest.approx(1.0, abs=1e-6)


def test_more_damage_scores_worse():
    a, _ = pairs()
    scores = []
    for noise in (0.02, 0.1, 0.3):
        _, b = pairs(noise=noise)
        psnr, ssim = PSNR(), SSIM()
        psnr.update(a, b)
        ssim.update(a, b)
        scores.append((psnr.compute().item(), ssim.compute().item()))
    assert scores[0][0] > scores[1][0] > scores[2][0]
    assert scores[0][1] > scores[1][1] > scores[2][1]
    shifted = torch.roll(a, 5, dims=-1)
    psnr = PSNR()
    psnr.update(a, shifted)
    assert psnr.compute().item() < scores[0][0]


def test_mismatched_shapes_are_refused():
    a, b = pairs()
    with pytest.raises(ValueError, match="one shape"):
        PSNR().update(a, b[:2])


def scene(background, square=(0.9, 0.2, 0.1), size: int = 64) -> torch.Tensor:
    x = torch.ones(1, 3, size, size) * torch.tensor(background).view(1, 3, 1, 1)
    x[:, :, 8:24, 8:24] = torch.tensor(square).view(1, 3, 1, 1)  # the edited object, top left
    x[:, :, 40:56, 36:60] = torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1)  # an object the edit must keep
    return x


def test_ns_lpips_ignores_the_edited_region_and_sees_the_rest(tmp_path):
    weights = weights_file(tmp_path, "alex")
    mask = torch.zeros(1, 1, 16, 16)  # a 16 x 16 attention-resolution mask of the edited square
    mask[:, :, 1:7, 1:7] = 1
    source = scene((0.5, 0.5, 0.5))
    recoloured = scene((0.5, 0.5, 0.5), square=(0.1, 0.9, 0.2))
    damaged = recoloured.clone()
    damaged[:, :, 40:56, 36:60] = torch.tensor([0.8, 0.8, 0.1]).view(1, 3, 1, 1)

    def ns_lpips(edited):
        metric = NSLPIPS(weights=weights)
        metric.update(edited, source, mask)
        return metric.compute().item()

    assert ns_lpips(recoloured) == pytest.approx(0.0, abs=1e-6)  # only the edited region changed
    assert ns_lpips(damaged) > 0.01  # the edit also changed another object
    plain = NSLPIPS(weights=weights)  # without a mask (nothing edited) it is LPIPS at 256
    plain.update(recoloured, source, torch.zeros(1, 16, 16))
    assert plain.compute().item() > 0.01


def test_outside_region_resizes_and_blacks_out():
    images = torch.ones(2, 3, 32, 32)
    masks = torch.zeros(2, 8, 8)
    masks[1] = 1
    out = outside_region(images, masks, size=64)
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out[0], torch.ones(3, 64, 64)) and out[1].abs().max() == 0
    with pytest.raises(ValueError, match="masks"):
        outside_region(images, torch.zeros(3, 8, 8), size=64)
