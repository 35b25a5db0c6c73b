"""Random-weight full-size SD3-medium and FLUX.1-dev architectures: the full sizes are counted on the meta device
(nothing is allocated); the build itself runs at toy sizes through the same code path and is loaded and sampled."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusion.builds import BUILDS
from diffusion.random_flow_models import architecture_configs, build_random_flow_pipeline, random_flow_components
from tests.helpers import compose_cfg

# Parameter counts of the real checkpoints' weights (SD3-medium: an inspection of
# stabilityai/stable-diffusion-3-medium-diffusers, whose VAE decoder has 49,545,475; FLUX.1-dev: its transformer's
# safetensors total; CLIP-L text: openai/clip-vit-large-patch14's text model, + a 768x768 projection in SD3; the
# FLUX.1-dev VAE's 244 tensors). Rounded, as usually published: SD3-medium MMDiT 2.0B, FLUX.1-dev 11.9B, T5 v1.1
# XXL encoder 4.7B, CLIP-L text 123M, OpenCLIP bigG text 695M, VAE 84M. Tolerance: none, the counts must be exact.
SD3_MEDIUM_TRANSFORMER, FLUX_DEV_TRANSFORMER, T5_XXL_ENCODER = 2_028_328_000, 11_901_408_320, 4_762_310_656
CLIP_L_TEXT, CLIP_L_PROJECTION, CLIP_BIGG_TEXT_WITH_PROJECTION = 123_060_480, 768 * 768, 694_659_840
VAE_16_CHANNELS, VAE_16_DECODER = 83_819_683, 49_545_475
REAL_COUNTS = {"sd3": dict(transformer=SD3_MEDIUM_TRANSFORMER, text_encoder=CLIP_L_TEXT + CLIP_L_PROJECTION,
                           text_encoder_2=CLIP_BIGG_TEXT_WITH_PROJECTION, text_encoder_3=T5_XXL_ENCODER,
                           vae=VAE_16_CHANNELS),
               "flux": dict(transformer=FLUX_DEV_TRANSFORMER, text_encoder=CLIP_L_TEXT, text_encoder_2=T5_XXL_ENCODER,
                            vae=VAE_16_CHANNELS)}

TOY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64)  # still 8x down, 16 channels
TOY_CLIP = dict(intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
TOY_T5 = dict(d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16)
# Toy widths that still fit together: SD3's CLIP states (16 + 24) fit in T5's 48, its pooled input is 16 + 24;
# FLUX's rope axes sum to its head width. Vocabularies, latent channels and packing stay the real ones.
TOY_SIZES = {
    "sd3": dict(transformer=dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                                 pos_embed_max_size=16),
                text_encoder=dict(TOY_CLIP, hidden_size=16, projection_dim=16),
                text_encoder_2=dict(TOY_CLIP, hidden_size=24, projection_dim=24),
                text_encoder_3=dict(TOY_T5, d_model=48), vae=TOY_VAE),
    "flux": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                 text_encoder=dict(TOY_CLIP, hidden_size=16, projection_dim=16),
                 text_encoder_2=dict(TOY_T5, d_model=32), vae=TOY_VAE),
}
TOY_RESOLUTION = 64


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stored_dtypes(folder) -> set[str]:
    """The dtypes of every tensor in a component folder's safetensors files, as their headers give them."""
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtypes |= {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    return dtypes


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_full_size_parameter_counts_are_the_real_checkpoints(arch, tmp_path):
    with torch.device("meta"):
        components = random_flow_components(arch, tmp_path / "tokenizer")
    counts = {name: parameter_count(components[name]) for name in REAL_COUNTS[arch]}
    assert counts == REAL_COUNTS[arch]
    assert parameter_count(components["vae"].decoder) == VAE_16_DECODER
    assert {part.device.type for part in components.values() if isinstance(part, torch.nn.Module)} == {"meta"}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_token_tables_keep_the_real_vocabularies_with_small_tokenizers(arch, tmp_path):
    with torch.device("meta"):
        components = random_flow_components(arch, tmp_path / "tokenizer")
    t5 = components["text_encoder_3" if arch == "sd3" else "text_encoder_2"]
    assert components["text_encoder"].get_input_embeddings().num_embeddings == 49408  # CLIP's BPE vocabulary
    assert t5.get_input_embeddings().num_embeddings == 32128  # T5's 32100 pieces, padded
    assert len(components["tokenizer"]) < 1000


def test_mismatched_sizes_fail_in_one_line():
    with pytest.raises(ValueError, match=r"joint_attention_dim=4096 does not fit .* \(32\)$"):
        architecture_configs("flux", dict(text_encoder_2=dict(d_model=32)))
    with pytest.raises(ValueError, match="not components of sd3"):
        architecture_configs("sd3", dict(unet=dict(num_layers=1)))
    with pytest.raises(ValueError, match="unknown architecture 'sdxl'"):
        architecture_configs("sdxl")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_toy_build_loads_with_the_flow_backbone_and_samples(arch, tmp_path):
    from diffusion.flow import flow_generate, load_flow_backbone

    path = build_random_flow_pipeline(tmp_path / arch, arch, sizes=TOY_SIZES[arch])
    saved = json.loads((path / "transformer" / "config.json").read_text())
    expected = architecture_configs(arch, TOY_SIZES[arch])["transformer"]
    assert {key: saved[key] for key in expected} == {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in expected.items()}
    backbone = load_flow_backbone(str(path), dtype="float32")
    assert backbone.kind == arch and backbone.latent_channels == 16 and backbone.vae_scale_factor == 8
    scheduler = backbone.scheduler.config
    assert scheduler.shift == 3.0 and scheduler.use_dynamic_shifting == (arch == "flux")
    images = flow_generate(backbone, ["a photo of a cat"], seeds=[0], num_steps=2, resolution=TOY_RESOLUTION)
    assert images.shape == (1, 3, TOY_RESOLUTION, TOY_RESOLUTION)
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_toy_build_is_saved_in_bfloat16_and_runs_in_the_stock_pipeline(arch, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    path = build_random_flow_pipeline(tmp_path / arch, arch, sizes=TOY_SIZES[arch])
    for component in architecture_configs(arch):
        assert stored_dtypes(path / component) == {"BF16"}, component
    pipeline_class = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
    pipe = pipeline_class.from_pretrained(str(path), dtype=torch.float32)  # CPU: bf16 matmuls are slow
    images = pipe("a photo of a cat", num_inference_steps=2, height=TOY_RESOLUTION, width=TOY_RESOLUTION,
                  max_sequence_length=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, TOY_RESOLUTION, TOY_RESOLUTION) and torch.isfinite(images).all()


@pytest.mark.parametrize("model, kind", [("sd3_random", "sd3"), ("flux_random", "flux")])
def test_configs_name_the_random_builds(model, kind, tmp_path):
    cfg = compose_cfg("evaluate", [f"model={model}"], tmp_path)
    assert cfg.model.kind == kind and BUILDS[cfg.model.build] == kind and cfg.model.resolution == 1024
    assert cfg.model.path.endswith(f"models/{model}")


@pytest.mark.parametrize("build, arch", [("random_sd3", "sd3"), ("random_flux", "flux")])
def test_builds_dispatch_to_the_random_flow_builder(build, arch, tmp_path, monkeypatch):
    import diffusion.builds as builds

    calls = []
    monkeypatch.setattr(builds, "build_random_flow_pipeline", lambda path, name: calls.append((path, name)))
    builds.ensure_built_pipeline(tmp_path / build, build)
    assert calls == [(tmp_path / build, arch)]


def test_the_flow_benchmark_runs_its_random_models_end_to_end_at_toy_sizes(tmp_path):
    """benchmarks/flow_speed.py on the in-memory random pipelines (where SD3's two CLIP encoders share one
    tokenizer): editing, the three methods' training and the sampling variants each give a number."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import flow_speed

    for model, arch in (("sd3_random", "sd3"), ("flux_random", "flux")):
        row = flow_speed.measure(model, 2, 2, 1, tmp_path, list(flow_speed.METHODS),
                                 overrides=[f"model.resolution={2 * TOY_RESOLUTION}"], sizes=TOY_SIZES[arch])
        timings = ["edit_s", *(f"{m}_median_step_s" for m in flow_speed.METHODS),
                   *(f"sample_{v}_s" for v in ("plain", "prompt_slider", "concept_slider"))]
        assert all(row[key] > 0 for key in timings), {key: row.get(key) for key in timings}
        rendered = tmp_path / f"{model}_textual_inversion" / "references" / "sun_medal" / "images" / "00.png"
        assert Image.open(rendered).size == (2 * TOY_RESOLUTION, 2 * TOY_RESOLUTION)  # above the shipped 64 px
