"""Saving images and grids (atomically, as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.io import atomic_path


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    im = to_pil(image) if torch.is_tensor(image) else image
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)


def make_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[N, 3, H, W] -> [3, rows*H, cols*W] (row-major; missing cells stay black)."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = images.new_zeros(c, rows * h, cols * w)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return grid
