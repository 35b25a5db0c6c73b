"""Images <-> latents through a backbone's frozen VAE, shared by the UNet and rectified-flow backbones."""

from __future__ import annotations

import torch

from diffusion.dtypes import weight_dtype


class VAELatents:
    """A backbone's `vae` side (mixed into Backbone and FlowBackbone): latents are (z - shift) * scale, z a sample
    of the posterior; the shift is 0 for Stable Diffusion's VAE and the config's shift_factor for SD3 / FLUX."""

    vae: torch.nn.Module

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents (a sample of the posterior)."""
        return self.posterior_latents(*self.image_posterior(pixels), generator)

    @torch.no_grad()
    def image_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and standard deviation of pixels in [-1, 1]."""
        dist = self.vae.encode(pixels.to(weight_dtype(self.vae))).latent_dist
        return dist.mean, dist.std

    def posterior_latents(self, mean: torch.Tensor, std: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents sampled from a posterior, drawn as diffusers' DiagonalGaussianDistribution.sample draws
        (mean + std * noise)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise - self.vae_shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]."""
        latents = latents.to(weight_dtype(self.vae)) / self.vae.config.scaling_factor + self.vae_shift
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
