"""CLIP scores of the text-to-image literature, from a local CLIP model folder (nothing is downloaded).

CLIP-T (text alignment): per image `100 * max(cos(image, prompt), 0)`, as in CLIPScore (Hessel et al. 2021)
and the personalization and editing papers. CLIP-I (image alignment): per generated image the mean cosine
with every reference image (DreamBooth's average pairwise similarity), or with its own reference when
paired. Preprocessing is the CLIP processor's, done in torch on [0, 1] tensors: the shortest side resized
with bicubic interpolation, a centre crop, then the model's mean and std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metrics.base import PerImageMean
from utils.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HINT = "give a local CLIP model directory (e.g. a copy of openai/clip-vit-large-patch14)"


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
                 model_type: str | None = None, **kwargs: Any) -> nn.Module:
    """`load(folder)` refusing a folder of another model type or one that lacks weights: transformers would
    build the model anyway, fill the gaps with random weights and only warn, making every score meaningless."""
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(folder).model_type
        if model_type is not None and found != model_type:
            raise ConfigError(f"{key}={folder} holds a {found!r} model, not a {what}; {hint}")
        model, info = load(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
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


def pooled(output: Any) -> torch.Tensor:
    """The projected embedding from `get_*_features`: a tensor in transformers 4, an output object
    carrying it as `pooler_output` in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def cosines(a: torch.Tensor, b: torch.Tensor, paired: bool) -> torch.Tensor:
    """[B] cosines of unit embeddings [B,D] with [B,D] (paired) or mean cosines with [R,D], in float32 even
    under autocast (which would run the matmul in half precision)."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        return (a * b).sum(-1) if paired else (a @ b.T).mean(-1)


def check_paired(images: torch.Tensor, references: torch.Tensor) -> None:
    if len(images) != len(references):
        raise ValueError(f"paired scores need one reference per image; got images {tuple(images.shape)} "
                         f"and references {tuple(references.shape)}")


class CLIPEncoder(nn.Module):
    """A frozen CLIP model and tokenizer: L2-normalised float32 image and text embeddings."""

    def __init__(self, path: str | Path | None, key: str = "metrics.clip.path"):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder = model_dir(path, key, CLIP_HINT)
        self.model = load_weights(CLIPModel.from_pretrained, folder, key, "CLIP model", CLIP_HINT, model_type="clip")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{key}={folder} has no loadable CLIP tokenizer ({first_line(e)}); {CLIP_HINT}") from None
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.resize, self.crop, mean, std = read_preprocessing(
            folder, self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> CLIPEncoder:
        """Always eval: a frozen scorer, whatever mode its parent is put in."""
        return super().train(False)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0, 1] -> the model's normalised input, in the model's dtype and device."""
        x = resize_center_crop(images.to(self.mean.device, torch.float32), self.resize, self.crop)
        return ((x - self.mean) / self.std).to(self.model.dtype)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        features = pooled(self.model.get_image_features(pixel_values=self.pixel_values(images)))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.mean.device)
        features = pooled(self.model.get_text_features(input_ids=tokens.input_ids,
                                                       attention_mask=tokens.attention_mask))
        return F.normalize(features.float(), dim=-1)


class CLIPTextScore(PerImageMean):
    """CLIP-T: mean over images of `100 * max(cos(image, prompt), 0)`."""

    higher_is_better = True

    def __init__(self, path: str | Path | None = None, key: str = "metrics.clip.path", **kwargs):
        super().__init__(**kwargs)
        self.encoder = CLIPEncoder(path, key)

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B] per-image scores."""
        if len(images) != len(prompts):
            raise ValueError(f"one prompt per image is needed; got {len(images)} images and {len(prompts)} prompts")
        cos = cosines(self.encoder.embed_images(images), self.encoder.embed_texts(prompts), paired=True)
        return 100 * cos.clamp(min=0)

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        self.add(self.scores(images, prompts))


class CLIPImageSimilarity(PerImageMean):
    """CLIP-I: per generated image the mean cosine with every reference image ([R,3,H,W], any R), or with
    its own reference when `paired` (references [B,3,H,W])."""

    higher_is_better = True

    def __init__(self, path: str | Path | None = None, key: str = "metrics.clip.path", paired: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.encoder = CLIPEncoder(path, key)
        self.paired = paired

    def scores(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """[B] per-image scores."""
        if self.paired:
            check_paired(images, references)
        return cosines(self.encoder.embed_images(images), self.encoder.embed_images(references), self.paired)

    def update(self, images: torch.Tensor, references: torch.Tensor) -> None:
        self.add(self.scores(images, references))
