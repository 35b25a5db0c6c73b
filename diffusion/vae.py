"""The frozen VAE's posterior, shared by the UNet and rectified-flow backbones."""

from __future__ import annotations

import torch

from diffusion.dtypes import weight_dtype


@torch.no_grad()
def vae_posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and standard deviation of pixels in [-1, 1]."""
    dist = vae.encode(pixels.to(weight_dtype(vae))).latent_dist
    return dist.mean, dist.std


def draw_from_posterior(mean: torch.Tensor, std: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample, drawn as diffusers' DiagonalGaussianDistribution.sample draws it (mean + std * noise)."""
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
