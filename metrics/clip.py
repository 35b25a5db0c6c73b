"""CLIP scores of the text-to-image literature, from a local CLIP model folder (nothing is downloaded).

CLIP-T (text alignment): per image `100 * max(cos(image, prompt), 0)`, as in CLIPScore (Hessel et al. 2021)
and the personalization and editing papers. CLIP-I (image alignment): per generated image the mean cosine
with every reference image (DreamBooth's average pairwise similarity), or with its own reference when
paired. Preprocessing is the CLIP processor's (utils/frozen_encoder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from metrics.base import PerImageMean
from utils.errors import ConfigError
from utils.frozen_encoder import CLIP_MEAN, CLIP_STD, FrozenEncoder, first_line, load_weights, model_dir

CLIP_HINT = "give a local CLIP model directory (e.g. a copy of openai/clip-vit-large-patch14)"


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


class CLIPEncoder(FrozenEncoder):
    """A frozen CLIP model and tokenizer: L2-normalised float32 image and text embeddings."""

    def __init__(self, path: str | Path | None, key: str = "metrics.clip.path"):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder = model_dir(path, key, CLIP_HINT)
        self.model = load_weights(CLIPModel.from_pretrained, folder, key, "CLIP model", CLIP_HINT, model_types=("clip",))
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{key}={folder} has no loadable CLIP tokenizer ({first_line(e)}); {CLIP_HINT}") from None
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.set_preprocessing(folder, self.model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)

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
