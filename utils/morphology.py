"""Binary and grey-level morphology on [..., H, W] tensors (3x3 neighbourhoods), in plain torch:
dilation, erosion, reconstruction and hole filling, for the shapes probes and the attention masks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def max3(x: torch.Tensor, outside: float) -> torch.Tensor:
    """3x3 maximum filter as two 1-D passes (several times faster than max_pool2d on the CPU)."""
    p = F.pad(x, (1, 1, 1, 1), value=outside)
    rows = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def dilate(x: torch.Tensor) -> torch.Tensor:
    return max3(x, float("-inf"))


def erode(x: torch.Tensor) -> torch.Tensor:
    """3x3 erosion of a non-negative map; outside the image counts as 0, so shapes cut by the border keep an edge."""
    return -max3(-x, 0.0)


def until_stable(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Iterate a monotone propagation step to its fixed point."""
    while True:
        new = step(x)
        if torch.equal(new, x):
            return x
        x = new


def reconstruct(marker: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grey-level reconstruction by dilation: `marker` flooded upwards, never above `mask`."""
    return until_stable(lambda x: torch.minimum(dilate(x), mask), torch.minimum(marker, mask))


def fill_holes(foreground: torch.Tensor) -> torch.Tensor:
    """Whatever the background cannot reach from the image border belongs to an object (emblems, dots)."""
    background = 1 - foreground
    edge = torch.zeros_like(background)
    edge[..., [0, -1], :] = 1
    edge[..., :, [0, -1]] = 1
    return 1 - reconstruct(edge * background, background)
