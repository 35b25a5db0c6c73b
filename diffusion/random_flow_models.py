"""Full-size rectified-flow architectures with random weights, for GPU benchmarks.

`arch="sd3"` is Stable Diffusion 3 medium (2.0B-parameter MMDiT, CLIP-L and OpenCLIP bigG with
projections, the T5 v1.1 XXL encoder), `arch="flux"` FLUX.1-dev (11.9B-parameter transformer with a
guidance embedding, CLIP-L, T5 v1.1 XXL); both with the 16-channel VAE. They cost the compute and
memory of the real checkpoints and need no download. The tokenizers are the small offline ones of
diffusion/tiny_flow.py; the token tables keep the real vocabularies (CLIP 49408, T5 32128) so
embedding sizes match. `sizes` overrides any component's config, which shrinks the same code path to
toy sizes for tests.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from diffusion.tiny import save_pipeline_atomically
from diffusion.tiny_flow import FLUX_SCHEDULER, VAE_NORMALISATION, small_clip_tokenizer, small_t5_tokenizer

# openai/clip-vit-large-patch14 text model: SD3's text_encoder and FLUX.1's text_encoder (config.json).
CLIP_L = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
              num_attention_heads=12, num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text model: SD3's text_encoder_2 (as in SDXL).
CLIP_BIGG = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                 num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
# google/t5-v1_1-xxl encoder: SD3's text_encoder_3 and FLUX.1's text_encoder_2 (config.json); bucket settings
# are T5's defaults.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
# The 16-channel VAE of both (vae/config.json): SD1.5's layout with 16 latent channels and no quant convs.
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
              use_post_quant_conv=False)
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
# black-forest-labs/FLUX.1-dev, transformer/config.json: 2x2-packed latents (4 x 16 channels), rope axes summing to
# the head width.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))

# Each architecture's components by their pipeline names.
ARCHITECTURES = {
    "sd3": dict(transformer=SD3_MEDIUM, text_encoder=CLIP_L, text_encoder_2=CLIP_BIGG, text_encoder_3=T5_XXL,
                vae=VAE_16),
    "flux": dict(transformer=FLUX_DEV, text_encoder=CLIP_L, text_encoder_2=T5_XXL, vae=VAE_16),
}
SD3_SCHEDULER = dict(shift=3.0)  # stable-diffusion-3-medium-diffusers, scheduler/scheduler_config.json


def architecture_configs(arch: str, sizes: dict[str, dict] | None = None) -> dict[str, dict]:
    """The component configs of `arch`, each updated with `sizes[component]`, checked to fit together."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; use one of {sorted(ARCHITECTURES)}")
    unknown = set(sizes or {}) - set(ARCHITECTURES[arch])
    if unknown:
        raise ValueError(f"sizes names {sorted(unknown)}, not components of {arch}: {sorted(ARCHITECTURES[arch])}")
    configs = {name: {**config, **(sizes or {}).get(name, {})} for name, config in ARCHITECTURES[arch].items()}
    _check_widths_agree(arch, configs)
    return configs


def _check_widths_agree(arch: str, configs: dict[str, dict]) -> None:
    """The transformer's input widths must be what the text encoders and the VAE give it."""
    transformer = configs["transformer"]
    for key, value in _widths_from_other_components(arch, configs).items():
        if transformer[key] != value:
            raise ValueError(f"{arch} transformer {key}={transformer[key]} does not fit its other components ({value})")
    if arch == "sd3":
        clip_width = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
        t5_width = configs["text_encoder_3"]["d_model"]
        if clip_width > t5_width:  # SD3 zero-pads both CLIPs' states, side by side, to T5's width
            raise ValueError(f"sd3 CLIP widths ({clip_width}) exceed T5's d_model ({t5_width})")


def _widths_from_other_components(arch: str, configs: dict[str, dict]) -> dict[str, int]:
    latent_channels, clip_l = configs["vae"]["latent_channels"], configs["text_encoder"]
    if arch == "sd3":
        return dict(joint_attention_dim=configs["text_encoder_3"]["d_model"], in_channels=latent_channels,
                    out_channels=latent_channels,
                    pooled_projection_dim=clip_l["projection_dim"] + configs["text_encoder_2"]["projection_dim"])
    return dict(joint_attention_dim=configs["text_encoder_2"]["d_model"],
                in_channels=4 * latent_channels,  # latents packed in 2x2 patches
                pooled_projection_dim=clip_l["hidden_size"],  # CLIP-L's pooled final state, no projection
                attention_head_dim=sum(configs["transformer"]["axes_dims_rope"]))  # rope spans the whole head


def random_flow_components(arch: str, tokenizer_dir: str | Path, sizes: dict[str, dict] | None = None,
                           dtype: torch.dtype = torch.bfloat16) -> dict:
    """The pipeline's components with random weights, on the current default device; the CLIP tokenizer is
    written under `tokenizer_dir`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    configs = architecture_configs(arch, sizes)
    clip_tokenizer, t5_tokenizer = small_clip_tokenizer(Path(tokenizer_dir)), small_t5_tokenizer()
    transformer_class = SD3Transformer2DModel if arch == "sd3" else FluxTransformer2DModel
    # Each part is cast as soon as it is built, so at most one is ever held in float32.
    parts = dict(transformer=transformer_class(**configs["transformer"]).to(dtype),
                 vae=AutoencoderKL(**configs["vae"], **VAE_NORMALISATION[arch]).to(dtype), tokenizer=clip_tokenizer)
    if arch == "sd3":  # the pooled outputs are both CLIPs' projections
        clip_l = CLIPTextModelWithProjection(_clip_config(configs["text_encoder"], clip_tokenizer)).to(dtype)
        clip_g = CLIPTextModelWithProjection(_clip_config(configs["text_encoder_2"], clip_tokenizer)).to(dtype)
        t5 = _t5_encoder(configs["text_encoder_3"], t5_tokenizer).to(dtype)
        return dict(parts, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer, text_encoder_3=t5,
                    tokenizer_3=t5_tokenizer)
    clip_l = CLIPTextModel(_clip_config(configs["text_encoder"], clip_tokenizer)).to(dtype)  # FLUX: no projection
    t5 = _t5_encoder(configs["text_encoder_2"], t5_tokenizer).to(dtype)
    return dict(parts, text_encoder=clip_l, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def random_flow_pipeline(arch: str, tokenizer_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                         sizes: dict[str, dict] | None = None):
    """A StableDiffusion3Pipeline / FluxPipeline of architecture `arch` with random weights, in memory on the GPU
    when there is one (random init of 12B parameters is minutes on a CPU, seconds on a GPU); the CLIP tokenizer is
    written under `tokenizer_dir`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    architecture_configs(arch, sizes)  # fail before any work
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        components = random_flow_components(arch, tokenizer_dir, sizes, dtype)
    if arch == "sd3":
        return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), **components)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), **components)


def build_random_flow_pipeline(out_dir: str | Path, arch: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                               sizes: dict[str, dict] | None = None) -> Path:
    """Save a random-weight pipeline of architecture `arch` (sd3 or flux) to `out_dir` (atomically); `sizes`
    overrides component configs by pipeline name (e.g. {"transformer": {"num_layers": 2}})."""
    architecture_configs(arch, sizes)  # fail before any work
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)  # the staging folder goes next to it, on the same file system
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="random-flow-tokenizer-"))
    try:
        return save_pipeline_atomically(random_flow_pipeline(arch, tokenizer_dir, seed, dtype, sizes), out)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _clip_config(config: dict, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _t5_encoder(config: dict, tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))
