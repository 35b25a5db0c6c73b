"""Frozen pretrained encoders read from local folders (nothing is downloaded): the loading checks and the
preprocessing shared by StyleDiffusion's CLIP image encoder and the CLIP and DINO metric backbones.

Preprocessing is the model's own processor's, done in torch on [0, 1] tensors: the shortest side resized
with bicubic interpolation, a centre crop, then the model's mean and std (its preprocessor_config.json wins
where it gives them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def model_dir(path: str | Path | None, key: str, hint: str) -> Path:
    """The model folder a config key names, or a ConfigError that says which key to set."""
    if path is None:
        raise ConfigError(f"{key} is not set; {hint}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}={folder} does not exist; {hint}")
    return folder


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def load_weights(load: Callable[..., Any], folder: Path, key: str, what: str, hint: str,
                 model_types: Sequence[str] | None = None, **kwargs: Any) -> nn.Module:
    """`load(folder)` refusing a folder of another model type, a corrupt weights file or one that lacks
    weights: transformers would build the model anyway, fill the gaps with random weights and only warn,
    making every output meaningless."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(folder).model_type
        if model_types is not None and found not in model_types:
            raise ConfigError(f"{key}={folder} holds a {found!r} model, not a {what}; {hint}")
        model, info = load(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ConfigError(f"{key}={folder} is not a loadable {what} ({first_line(e)}); {hint}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"{key}={folder} lacks {len(missing)} of the {what}'s weights (e.g. "
                          f"{', '.join(missing[:3])}); {hint}")
    return model


def _side(value: Any) -> int | None:
    """One side length from a processor's `size` / `crop_size` (an int, or a dict of either layout)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return int(min(value["height"], value["width"]))
    return None


def read_preprocessing(folder: Path, side: int, mean: Sequence[float], std: Sequence[float]
                       ) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """Resize side, crop side, mean and std: the folder's preprocessor_config.json where it gives them,
    so a model is fed as its own processor would feed it; else the model's input size and the defaults."""
    file = folder / "preprocessor_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    crop = _side(config.get("crop_size")) or side
    resize = max(_side(config.get("size")) or side, crop)
    return (resize, crop, tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std)))


def resize_center_crop(images: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """[B,3,H,W] in [0, 1]: shortest side to `resize` (bicubic, antialiased, clamped like the uint8 images
    processors see), then a centre `crop` x `crop` square."""
    h, w = images.shape[-2:]
    size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return images[..., top:top + crop, left:left + crop]


class FrozenEncoder(nn.Module):
    """A frozen model, always in eval mode, fed as its own processor would feed it. A subclass loads
    `self.model`, then calls `set_preprocessing`."""

    model: nn.Module

    def set_preprocessing(self, folder: Path, side: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.resize, self.crop, mean, std = read_preprocessing(folder, side, mean, std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always eval: a frozen encoder, whatever mode its parent is put in."""
        return super().train(False)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0, 1] -> the model's normalised input, in the model's dtype and device."""
        x = resize_center_crop(images.to(self.mean.device, torch.float32), self.resize, self.crop)
        return ((x - self.mean) / self.std).to(self.model.dtype)
