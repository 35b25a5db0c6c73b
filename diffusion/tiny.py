"""The tiny random Stable Diffusion model used by tests (and as a stand-in backbone).

It has the real architecture classes at toy sizes: a CLIP text encoder (32-d), a two-level UNet
with cross-attention at 32x32 and 16x16 latents, and a VAE with one downsampling (64 px images).
`kind="sdxl"` builds the SDXL layout (two text encoders, pooled text and size conditioning) and
`kind="sd2"` the SD2 layout (linear proj_in/proj_out, v-prediction).
Everything is seeded, so the same folder comes out byte for byte on every machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffusion.clip_tokenizer import write_clip_tokenizer
from diffusion.schedules import SD_DDIM

TINY_WORDS = (
    "a an the photo picture painting rendering drawing of in on with and style object concept "
    "red green blue yellow orange purple pink white black gray brown cat dog toy car tree house "
    "circle square star triangle small large big tiny left right background sky beach forest "
    "city snow art sketch cartoon old young smiling happy sad van gogh monet"
).split()


def build_tiny_pipeline(out_dir: str | Path, kind: str = "sd", seed: int = 0) -> Path:
    """Build and save a tiny diffusers pipeline of layout `kind` (sd, sd2 or sdxl) into `out_dir`."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


    if kind not in ("sd", "sd2", "sdxl"):
        raise ValueError(f"unknown tiny model kind {kind!r}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    tmp = Path(tempfile.mkdtemp())
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(TINY_WORDS, tmp / "tok"))
        text_cfg = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=32,
                        intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                        max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        unet_cfg = dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4),
        )
        if kind == "sd2":
            unet_cfg.update(use_linear_projection=True)
        if kind == "sdxl":
            unet_cfg.update(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                            transformer_layers_per_block=(1, 2))
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=64)
        scheduler = DDIMScheduler(**SD_DDIM, prediction_type="v_prediction" if kind == "sd2" else "epsilon")
        if kind == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                             scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        return save_pipeline_atomically(pipe, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pipeline_atomically(pipe, out: Path) -> Path:
    """Save into a staging folder next to `out`, then rename it into place: a concurrent builder either
    wins or finds the folder complete."""
    staging = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".tiny-"))
    pipe.save_pretrained(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, out)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not out.exists():
            raise
    return out

