"""The losses the mask- and attention-aware methods train with, beside the plain denoising MSE.

- eq. (3) / (4) of the EM paper (Break-a-Scene's masked diffusion loss and cross-attention loss),
  trained by EMMaskModule on each scene's concept masks;
- TokenCompose's token loss (Wang et al. 2024, eq. 2), which the shapes-world pretraining adds so that
  each caption word attends to the region it names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def downsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A binary [H, W] mask -> [size, size] in {0, 1}: a cell is in when at least half of it is."""
    return (F.adaptive_avg_pool2d(mask[None, None].float(), size)[0, 0] >= 0.5).float()


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """eq. (3): ||eps * M - eps_theta * M||^2 with M the union of the prompt's concept masks [B, 1, h, w],
    averaged over all latent elements (Break-a-Scene: not divided by the mask's area)."""
    return F.mse_loss(pred.float() * mask, target.float() * mask)


def cross_attention_loss(maps: torch.Tensor, masks: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """eq. (4): ||C_attn(z_t, y_i) - M_i||^2 for each concept token i; maps and masks [B, n, h, w].
    paper: the maps as they are, averaged over tokens; break_a_scene (its code): each map divided by
    its maximum, the per-token errors summed."""
    if form == "break_a_scene":
        maps = maps / maps.flatten(2).amax(-1).clamp(min=1e-8)[..., None, None]
        return F.mse_loss(maps.float(), masks.float(), reduction="none").mean((0, 2, 3)).sum()
    return F.mse_loss(maps.float(), masks.float())


def region_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, 2, H, W] object coverage -> [B, 3, h*w]: the two objects' and the background's share of each cell."""
    background = 1 - masks.sum(1, keepdim=True).clamp(max=1)
    regions = F.adaptive_avg_pool2d(torch.cat([masks, background], 1).float(), hw)
    return regions.flatten(2)


def token_attention_loss(maps: torch.Tensor, regions: torch.Tensor,
                         roles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCompose's token loss for one layer, and the mean share inside (for the logs).

    maps [B, h*w, K] cross-attention (heads averaged), regions [B, R, h*w], roles [B, K] (the region each
    token names, -1 for none); only tokens with a role count."""
    maps = maps.float()
    inside = torch.einsum("bpk,brp->bkr", maps, regions)
    share = inside.gather(-1, roles.clamp(min=0)[..., None])[..., 0] / maps.sum(1).clamp_min(1e-8)
    # means over the tokens with a role by weights, not by boolean indexing (which waits for the GPU to count);
    # none with a role: both 0
    valid = (roles >= 0).float()
    count = valid.sum().clamp_min(1)
    return ((1 - share) ** 2 * valid).sum() / count, (share.detach() * valid).sum() / count


def token_pixel_loss(maps: torch.Tensor, regions: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """TokenCompose's pixel loss (eq. 3) at one resolution: the binary cross-entropy between each word's
    attention probability per cell and its region (a cell is in when the region touches it, as their code
    binarises). The token loss only asks for the attention mass to lie inside; this one asks the word to hold
    the attention of every cell of its region, so maps cover their objects instead of peaking in a few cells.

    maps [B, h*w, K] cross-attention (heads and the resolution's layers averaged), regions [B, R, h*w],
    roles [B, K] (the region each token names, -1 for none)."""
    valid = (roles >= 0).float()[..., None]  # weights, not a boolean index (as token_attention_loss); none: 0
    target = regions.gather(1, roles.clamp(min=0)[..., None].expand(-1, -1, regions.shape[-1])) > 0  # [B, K, h*w]
    probs = maps.float().transpose(1, 2)  # [B, K, h*w]
    with torch.autocast(probs.device.type, enabled=False):  # CUDA autocast refuses binary_cross_entropy
        bce = F.binary_cross_entropy(probs.clamp(0, 1), target.float(), reduction="none")
    return (bce * valid).sum() / (valid.sum() * bce.shape[-1]).clamp_min(1)
