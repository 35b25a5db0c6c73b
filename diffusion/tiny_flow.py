"""Tiny random rectified-flow pipelines (SD3 and FLUX.1 layouts) for tests.

Each has the real architecture classes at toy sizes, so the stock diffusers pipelines load and run
them: `kind="sd3"` is a StableDiffusion3Pipeline (MMDiT transformer, CLIP-L and CLIP-G stand-ins
with projections, a T5 encoder), `kind="flux"` a FluxPipeline (a FLUX.1-dev-like transformer with a
guidance embedding, a pooled CLIP encoder, a T5 encoder). Both share a VAE with one downsampling
(64 px images, 32x32 latents) and the real models' scheduler settings. The tokenizers are built
from diffusion.tiny.TINY_WORDS, nothing is downloaded, and everything is seeded, so the same folder
comes out byte for byte on every run.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from pathlib import Path

import torch

from diffusion.clip_tokenizer import write_clip_tokenizer
from diffusion.tiny import TINY_WORDS, save_pipeline_atomically

FLOW_KINDS = ("sd3", "flux")
T5_MAX_LENGTH = 512  # the real T5 tokenizers' model_max_length; the pipelines ask for 256 (SD3) or 512 (FLUX)
# The real VAEs' latent normalisation (stabilityai/stable-diffusion-3-medium-diffusers and
# black-forest-labs/FLUX.1-dev, vae/config.json): z = (encoded - shift_factor) * scaling_factor.
VAE_NORMALISATION = {"sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
                     "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}
# FLUX.1-dev's scheduler/scheduler_config.json: sigmas shifted by mu, linear in the image's token count.
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, shift=3.0)
LATENT_CHANNELS = 4


def build_tiny_flow_pipeline(out_dir: str | Path, kind: str, seed: int = 0) -> Path:
    """Build and save a tiny diffusers pipeline of layout `kind` (sd3 or flux) into `out_dir`."""
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown tiny flow model kind {kind!r}; use one of {FLOW_KINDS}")
    torch.manual_seed(seed)
    tmp = Path(tempfile.mkdtemp())
    try:
        pipe = _tiny_sd3(tmp) if kind == "sd3" else _tiny_flux(tmp)
        return save_pipeline_atomically(pipe, Path(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_sd3(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip_tokenizer = small_clip_tokenizer(tmp)
    # CLIP-L and CLIP-G differ in width (768 / 1280 in SD3); their concatenation (80) is narrower than T5 (96),
    # so the pipeline's zero padding of the CLIP states is exercised.
    clip_l = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, width=32))
    clip_g = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, width=48))
    t5_tokenizer = small_t5_tokenizer()
    t5 = _t5_encoder(t5_tokenizer, width=96)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS,
                                        out_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                                        pooled_projection_dim=32 + 48, pos_embed_max_size=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's static shift (Esser et al. 2024, sec. 5.3.2)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=_vae("sd3"),
                                    text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g,
                                    tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def _tiny_flux(tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_tokenizer = small_clip_tokenizer(tmp)
    clip = CLIPTextModel(_clip_config(clip_tokenizer, width=32))
    t5_tokenizer = small_t5_tokenizer()
    t5 = _t5_encoder(t5_tokenizer, width=64)
    # Latents are packed in 2x2 patches, hence 4x the VAE's channels; rope axes sum to the head width.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    return FluxPipeline(scheduler=scheduler, vae=_vae("flux"), text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def small_clip_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(TINY_WORDS, tmp / "clip_tokenizer"))


def _clip_config(tokenizer, width: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=width,
                          intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
                          max_position_embeddings=77, hidden_act="gelu", projection_dim=width)


def small_t5_tokenizer():
    """A T5 (Unigram, sentencepiece-style) tokenizer: T5's special tokens first (<pad>=0, </s>=1, <unk>=2), each
    listed word as one piece, and single letters so that any other lower-case word still encodes."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in dict.fromkeys(TINY_WORDS)]
    pieces += [(letter, -10.0) for letter in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's gated-GELU feed-forward, as the t5-v1_1-xxl encoder SD3 and FLUX use.
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def _vae(kind: str):
    from diffusers import AutoencoderKL

    # The SD3 / FLUX VAEs have no quant convs; the normalisation is the real model's.
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                         **VAE_NORMALISATION[kind])

