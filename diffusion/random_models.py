"""Full-size Stable Diffusion architectures with random weights, for GPU benchmarks.

They cost the same compute and memory as the real checkpoints (SD1.5: 860M-parameter UNet and
CLIP ViT-L/14 text encoder; SDXL: 2.6B-parameter UNet, CLIP-L and OpenCLIP bigG), and need no
download. The tokenizer is a small CLIP-format one (see clip_tokenizer.py); the token table keeps
CLIP's 49408 rows so embedding sizes match.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffusion.clip_tokenizer import write_clip_tokenizer
from diffusion.schedules import SD_DDIM
from diffusion.tiny import TINY_WORDS

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
UNETS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


def build_random_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Save a random-weight pipeline of architecture `arch` (sd15 or sdxl) to `out_dir` (atomically)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


    if arch not in UNETS:
        raise ValueError(f"unknown architecture {arch!r}; use one of {sorted(UNETS)}")
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".random-"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(TINY_WORDS, staging / "_tok"))
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=49408, max_position_embeddings=77)
        init = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        with init:  # random init of 2.6B parameters is minutes on a CPU, seconds on a GPU
            unet = UNet2DConditionModel(**UNETS[arch]).to(dtype)
            vae = AutoencoderKL(**VAE, sample_size=UNETS[arch]["sample_size"] * 8,
                                scaling_factor=0.13025 if arch == "sdxl" else 0.18215).to(dtype)
            text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **CLIP_L)).to(dtype)
            text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**ids, **CLIP_BIGG)).to(dtype)
                              if arch == "sdxl" else None)
        scheduler = DDIMScheduler(**SD_DDIM)
        if arch == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.save_pretrained(staging)
        shutil.rmtree(staging / "_tok")
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
