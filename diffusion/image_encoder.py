"""The frozen image encoder E of StyleDiffusion (paper 003, Sec. 3.3.1): CLIP image tokens.

`ImageEncoder(path)` loads a transformers `CLIPVisionModel` from a local folder (a vision-only
folder, or a full CLIP folder such as a copy of openai/clip-vit-base-patch16) and returns every token
of the last hidden state after the vision tower's final (post) layer norm, without the projection:
[B, 1 + (image_size / patch_size)^2, hidden] = [B, 197, 768] for ViT-B/16 at 224 px (methods.md,
"StyleDiffusion (paper 003)"). transformers applies the post layer norm only to the pooled class
token; here it is applied to all tokens.

Input images are in [-1, 1] (the range of the data modules' `pixel_values` and of
`Backbone.encode_images`). The CLIP processor's preprocessing is done in torch: map to [0, 1],
shortest side resized (bicubic), centre crop, CLIP mean / std (utils/frozen_encoder.py; the
folder's preprocessor_config.json wins where it gives sizes or statistics).

`build_random_encoder(path, size=...)` saves a random-initialised CLIP vision model (ViT-B/16 by
default, "tiny" for tests) so the shapes world and the tests have an encoder without downloads.
`ImageEncoderSettings` is the config's `image_encoder` section (path, build), read by train.py's module and
edit.py's StyleDiffusionEdit alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import ConfigError
from utils.settings import Settings, check_choice
from utils.frozen_encoder import CLIP_MEAN, CLIP_STD, FrozenEncoder, load_weights, model_dir

ENCODER_HINT = ("give a local CLIP vision model folder (e.g. a copy of openai/clip-vit-base-patch16), or build a "
                "random one with diffusion.image_encoder.build_random_encoder")
ENCODER_KEY = "module.image_encoder.path"

# Architectures build_random_encoder knows: ViT-B/16 at 224 px (the paper's E) and a toy one for tests.
ENCODER_SIZES = {
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16, projection_dim=512),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=32),
}


class ImageEncoder(FrozenEncoder):
    """Frozen CLIP vision tokens after the post layer norm: images [B, 3, H, W] in [-1, 1] ->
    [B, num_tokens, hidden] float32."""

    def __init__(self, path: str | Path | None, key: str = ENCODER_KEY):
        super().__init__()
        from transformers import CLIPVisionModel

        folder = model_dir(path, key, ENCODER_HINT)
        self.model = load_weights(CLIPVisionModel.from_pretrained, folder, key, "CLIP vision model", ENCODER_HINT,
                                  model_types=("clip", "clip_vision_model"))
        self.set_preprocessing(folder, self.model.config.image_size, CLIP_MEAN, CLIP_STD)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        """Class token plus one per patch of the crop (197 for ViT-B/16 at 224)."""
        return (self.crop // self.model.config.patch_size) ** 2 + 1

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> CLIP's normalised input."""
        return super().pixel_values((images.float() / 2 + 0.5).clamp(0, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.pixel_values(images))
        tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests the tower, 5 does not
        return tower.post_layernorm(out.last_hidden_state).float()


def build_random_encoder(path: str | Path, size: str = "base", seed: int = 0) -> Path:
    """Save a random-initialised CLIP vision model of architecture `size` (base = ViT-B/16 at 224 px,
    tiny) and its image processor config at `path`; returns the folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if size not in ENCODER_SIZES:
        raise ConfigError(f"image encoder size {size!r} is unknown; use one of {sorted(ENCODER_SIZES)}")
    folder = Path(path)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**ENCODER_SIZES[size])
    CLIPVisionModel(config).save_pretrained(folder)
    side = config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)
    return folder


def ensure_encoder(path: str | Path | None, build: str | None = None, key: str = ENCODER_KEY) -> ImageEncoder:
    """The encoder at `path`, first building a random one of architecture `build` there if it is missing."""
    if build and path is not None and not Path(path).expanduser().exists():
        build_random_encoder(Path(path).expanduser(), build)
    return ImageEncoder(path, key)


@dataclass(frozen=True)
class ImageEncoderSettings(Settings):
    """module.image_encoder: E's folder `path`, and `build` (base | tiny: a random encoder of that architecture
    built at path on first use; None: path must hold a CLIP vision model)."""

    key = "module.image_encoder"
    path: str | None
    build: str | None

    def __post_init__(self):
        if self.build is not None:
            check_choice(f"{self.key}.build", self.build, tuple(ENCODER_SIZES))
        if not self.path:
            raise ConfigError(f"{self.key}.path is not set; give a local CLIP vision model folder")

    def check_folder(self) -> None:
        """Without `build`, the folder must be there (checked before any model loads)."""
        if not self.build and not Path(str(self.path)).expanduser().exists():
            raise ConfigError(f"{self.key}.path={self.path} does not exist; give a local CLIP vision model folder "
                              f"or {self.key}.build=base|tiny to build a random one there")

    def load(self) -> ImageEncoder:
        """The encoder (built first when `build` is set and the folder is missing)."""
        return ensure_encoder(self.path, self.build, f"{self.key}.path")
