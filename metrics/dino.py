"""DINO-based scores, from a local ViT folder (DINO `ViTModel` or `Dinov2Model`; nothing is downloaded).

DINO similarity (DreamBooth's DINO score): the cosine of CLS embeddings, per generated image averaged over
the reference set or against its own reference. With masks the background is blacked out first, which is
Break-a-Scene's identity metric. Structure distance (Splice, Tumanyan et al. 2022; PIE-Bench's
Structure-dist): the mean squared difference between the token self-similarity matrices of the last
layer's keys of two images.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metrics.base import PerImageMean
from metrics.clip import check_paired, cosines
from utils.errors import ConfigError
from utils.frozen_encoder import FrozenEncoder, load_weights, model_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_HINT = "give a local DINO ViT directory (e.g. a copy of facebook/dino-vits16)"


def last_key_projection(model: nn.Module) -> nn.Linear | None:
    """The key Linear of the last encoder layer, across layouts: `layers[-1].attention.k_proj` (ViT in
    transformers 5), `encoder.layer[-1].attention.k_proj` (Dinov2) or `...attention.attention.key` (4.x)."""
    encoder = getattr(model, "encoder", None)
    for blocks in (getattr(model, "layers", None), getattr(encoder, "layer", None), getattr(encoder, "layers", None)):
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            keys = [m for name, m in blocks[-1].named_modules()
                    if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("k_proj", "key")]
            if len(keys) == 1:
                return keys[0]
    return None


def as_masks(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] or [B,H,W] masks (1 = object) as [B,1,H,W] at the images' size (nearest resize)."""
    masks = masks.unsqueeze(1) if masks.dim() == 3 else masks
    if masks.dim() != 4 or masks.shape[0] != images.shape[0] or masks.shape[1] != 1:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    masks = masks.to(images.device, images.dtype)
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks, size=images.shape[-2:], mode="nearest")
    return masks


class ViTEncoder(FrozenEncoder):
    """A frozen DINO ViT: float32 CLS embeddings and the last layer's keys."""

    def __init__(self, path: str | Path | None, key: str = "metrics.dino.path"):
        super().__init__()
        from transformers import AutoModel

        folder = model_dir(path, key, DINO_HINT)
        try:
            self.model = load_weights(AutoModel.from_pretrained, folder, key, "ViT", DINO_HINT, add_pooling_layer=False)
        except TypeError:  # Dinov2Model has no pooling layer to leave out
            self.model = load_weights(AutoModel.from_pretrained, folder, key, "ViT", DINO_HINT)
        self.keys = last_key_projection(self.model)
        if self.keys is None:
            raise ConfigError(f"{key}={folder} holds a {type(self.model).__name__}, which has no ViT encoder "
                              f"layers with a key projection; {DINO_HINT}")
        side = self.model.config.image_size
        self.set_preprocessing(folder, side, IMAGENET_MEAN, IMAGENET_STD)
        # ViT's position embeddings only fit other input sizes when asked to interpolate (DINOv2 always does)
        self.forward_kwargs = ({"interpolate_pos_encoding": True} if self.crop != side and "interpolate_pos_encoding"
                               in inspect.signature(self.model.forward).parameters else {})

    @torch.no_grad()
    def cls(self, images: torch.Tensor) -> torch.Tensor:
        """[B,D]: the CLS token after the final layernorm."""
        out = self.model(pixel_values=self.pixel_values(images), **self.forward_kwargs)
        return out.last_hidden_state[:, 0].float()

    @torch.no_grad()
    def last_layer_keys(self, images: torch.Tensor) -> torch.Tensor:
        """[B,N,D]: the last layer's key projections of every token (CLS included), heads concatenated."""
        captured: list[torch.Tensor] = []
        handle = self.keys.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.model(pixel_values=self.pixel_values(images), **self.forward_kwargs)
        finally:
            handle.remove()
        return captured[-1].float()


class DINOSimilarity(PerImageMean):
    """Cosine of DINO CLS embeddings: per generated image the mean over the reference set ([R,3,H,W], any R),
    or against its own reference when `paired`. Masks (1 = object) black out the background first."""

    higher_is_better = True

    def __init__(self, path: str | Path | None = None, key: str = "metrics.dino.path", paired: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.encoder = ViTEncoder(path, key)
        self.paired = paired

    def embed(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        if masks is not None:
            images = images * as_masks(masks, images)
        return F.normalize(self.encoder.cls(images), dim=-1)

    def scores(self, images: torch.Tensor, references: torch.Tensor, masks: torch.Tensor | None = None,
               reference_masks: torch.Tensor | None = None) -> torch.Tensor:
        """[B] per-image scores."""
        if self.paired:
            check_paired(images, references)
        return cosines(self.embed(images, masks), self.embed(references, reference_masks), self.paired)

    def update(self, images: torch.Tensor, references: torch.Tensor, masks: torch.Tensor | None = None,
               reference_masks: torch.Tensor | None = None) -> None:
        self.add(self.scores(images, references, masks, reference_masks))


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """[B,N,D] keys -> [B,N,N] cosine similarities between tokens, in float32 even under autocast."""
    with torch.autocast(keys.device.type, enabled=False):
        keys = F.normalize(keys.float(), dim=-1)
        return keys @ keys.transpose(1, 2)


class StructureDistance(PerImageMean):
    """Structure-dist: per image pair, the MSE between the self-similarity matrices of the last layer's keys.
    The papers (Splice, PIE-Bench) use DINO ViT-B/8 (`facebook/dino-vitb8`)."""

    higher_is_better = False

    def __init__(self, path: str | Path | None = None, key: str = "metrics.dino.path", **kwargs):
        super().__init__(**kwargs)
        self.encoder = ViTEncoder(path, key)

    def scores(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """[B] per-pair distances."""
        if images.shape != references.shape:
            raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
        a = self_similarity(self.encoder.last_layer_keys(images))
        b = self_similarity(self.encoder.last_layer_keys(references))
        return (a - b).square().mean((1, 2))

    def update(self, images: torch.Tensor, references: torch.Tensor) -> None:
        self.add(self.scores(images, references))
