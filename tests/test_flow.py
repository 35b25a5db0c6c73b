"""Rectified-flow backbones (SD3, FLUX.1) on the tiny random models: they load in stock diffusers, and our text
encoding, schedules and Euler sampler reproduce the stock pipelines; the flow-matching loss and inversion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffusion.conditioning import Conditioning
from diffusion.flow import (euler_sample, flow_invert, flow_matching_loss, load_flow_backbone, noisy_latents,
                            pack_latents, unpack_latents)
from utils.errors import ConfigError, ModelLoadError

KINDS = ("sd3", "flux")
GUIDANCE = {"sd3": 5.0, "flux": 3.5}  # SD3: real classifier-free guidance; FLUX.1-dev: the embedded guidance
CLIP_TOKENIZER_FOLDERS = {"sd3": ("tokenizer", "tokenizer_2"), "flux": ("tokenizer",)}


@pytest.fixture(scope="module")
def backbones(flow_dirs) -> dict:
    return {kind: load_flow_backbone(str(flow_dirs[kind])) for kind in KINDS}


@pytest.fixture(scope="module")
def stock_pipelines(flow_dirs) -> dict:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipes = {"sd3": StableDiffusion3Pipeline.from_pretrained(flow_dirs["sd3"]),
             "flux": FluxPipeline.from_pretrained(flow_dirs["flux"])}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def latents_like(backbone, batch: int, seed: int) -> torch.Tensor:
    """Gaussian latents for a 64 px image of the tiny models."""
    return torch.randn(batch, backbone.latent_channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_flow_pipelines_load_in_stock_diffusers_and_rebuild_the_same(kind, flow_dirs, stock_pipelines,
                                                                          tmp_path):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTokenizer, T5EncoderModel

    from diffusion.builds import ensure_built_pipeline
    from diffusion.tiny import TINY_WORDS

    pipe = stock_pipelines[kind]
    expected = SD3Transformer2DModel if kind == "sd3" else FluxTransformer2DModel
    assert isinstance(pipe.transformer, expected)
    t5 = pipe.text_encoder_3 if kind == "sd3" else pipe.text_encoder_2
    assert isinstance(t5, T5EncoderModel)
    assert json.loads((flow_dirs[kind] / "model_index.json").read_text())["_class_name"] == type(pipe).__name__
    if kind == "flux":
        assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.use_dynamic_shifting
    else:
        assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    again = ensure_built_pipeline(tmp_path / kind, f"tiny_{kind}")  # model.build=tiny_<kind> builds the same
    first, second = folder_bytes(flow_dirs[kind]), folder_bytes(again)
    weights = {"sd3": 5, "flux": 4}[kind]  # text encoders, transformer, VAE
    assert sum(name.endswith(".safetensors") for name in first) == weights and first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []  # byte for byte, tokenizers included
    for folder in CLIP_TOKENIZER_FOLDERS[kind]:
        tokenizer = CLIPTokenizer.from_pretrained(flow_dirs[kind] / folder)
        assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in TINY_WORDS)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompt_matches_the_stock_pipeline(kind, backbones, stock_pipelines):
    prompts = ["a photo of a cat", "a red zebra on the beach"]  # "zebra" is no listed word: T5 spells it out
    ours = backbones[kind].encode_prompt(prompts)
    pipe = stock_pipelines[kind]
    if kind == "sd3":
        states, negative_states, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None)
        empty = backbones[kind].encode_prompt(["", ""])
        torch.testing.assert_close(empty.hidden_states, negative_states)
        torch.testing.assert_close(empty.pooled, negative_pooled)
        assert states.shape == (2, 77 + 256, 96) and pooled.shape == (2, 32 + 48)
    else:
        states, pooled, _ = pipe.encode_prompt(prompts, None)
        assert states.shape == (2, 512, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(ours.hidden_states, states)
    torch.testing.assert_close(ours.pooled, pooled)


@pytest.mark.parametrize("kind", KINDS)
def test_euler_sample_reproduces_the_stock_pipeline(kind, backbones, stock_pipelines):
    """Same initial latents and step count: our sampler and decoder give the stock pipeline's latents and image
    (SD3 with classifier-free guidance against "", FLUX with its guidance embedding)."""
    backbone, pipe, scale = backbones[kind], stock_pipelines[kind], GUIDANCE[kind]
    prompts, steps = ["a photo of a cat", "a blue house in the snow"], 4
    noise = latents_like(backbone, 2, seed=0)
    cond = backbone.encode_prompt(prompts)
    negative = backbone.encode_prompt(["", ""]) if kind == "sd3" else None
    sigmas = backbone.sigmas(steps, backbone.image_seq_len(noise))
    ours = euler_sample(backbone, cond, noise, sigmas, scale, negative)

    stock_input = noise if kind == "sd3" else pack_latents(noise)  # FluxPipeline takes packed latents
    common = dict(num_inference_steps=steps, guidance_scale=scale, height=64, width=64, latents=stock_input)
    stock = pipe(prompts, output_type="latent", **common).images
    stock = stock if kind == "sd3" else unpack_latents(stock, 32, 32)
    torch.testing.assert_close(ours, stock)
    torch.testing.assert_close(backbone.decode_latents(ours), pipe(prompts, output_type="pt", **common).images)
    unguided = euler_sample(backbone, cond, noise, sigmas, 1.0)
    assert (ours - unguided).abs().max() > 1e-2  # the guidance took part in the comparison


def test_sigmas_shift_statically_for_sd3_and_with_resolution_for_flux(backbones):
    sd3, flux = backbones["sd3"], backbones["flux"]
    sigmas = sd3.sigmas(4, 256)
    assert len(sigmas) == 5 and sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas.diff() < 0).all())
    torch.testing.assert_close(sigmas, sd3.sigmas(4, 4096))
    small, large = flux.sigmas(4, 256), flux.sigmas(4, 4096)
    assert small[0] == large[0] == 1 and small[-1] == large[-1] == 0
    assert bool((large[1:-1] > small[1:-1]).all())  # more image tokens: more of the steps spent at high noise
    # 256 tokens: mu = base_shift = 0.5, and FLUX's time shift maps t to e^mu t / (1 + (e^mu - 1) t)
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
    shifted = math.exp(0.5) * grid / (1 + (math.exp(0.5) - 1) * grid)
    torch.testing.assert_close(small, torch.cat([shifted, torch.zeros(1)]))
    assert flux.image_seq_len(torch.zeros(1, 4, 32, 32)) == 256 == sd3.image_seq_len(torch.zeros(1, 4, 32, 32))


def test_flow_matching_loss_and_interpolation_by_hand():
    generator = torch.Generator().manual_seed(0)
    latents, noise, velocity = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    target = noise - latents  # v = noise - x0
    torch.testing.assert_close(flow_matching_loss(velocity, noise, latents), ((velocity - target) ** 2).mean())
    weight = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    expected = sum(w * ((velocity[i] - target[i]) ** 2).mean() for i, w in enumerate([0.5, 1.0, 2.0])) / 3
    torch.testing.assert_close(flow_matching_loss(velocity, noise, latents, weight), expected)
    assert flow_matching_loss(target, noise, latents) == 0
    sigma = torch.tensor([0.0, 0.25, 1.0])
    mixed = noisy_latents(latents, noise, sigma)
    torch.testing.assert_close(mixed[0], latents[0])
    torch.testing.assert_close(mixed[1], 0.75 * latents[1] + 0.25 * noise[1])
    torch.testing.assert_close(mixed[2], noise[2])


@pytest.mark.parametrize("kind", KINDS)
def test_inverting_then_sampling_returns_to_the_latents(kind, backbones):
    """Euler inversion and sampling err by O(1/steps); measured relative L2 errors on the tiny models: 3.9% (SD3) /
    3.1% (FLUX) at 10 steps, 0.72% / 0.62% at 50 steps (max abs 0.032 / 0.041)."""
    backbone, scale = backbones[kind], GUIDANCE[kind] if kind == "flux" else 1.0
    cond = backbone.encode_prompt("a photo of a cat")
    clean = latents_like(backbone, 1, seed=1)

    def round_trip_error(steps: int) -> tuple[float, float]:
        """(relative L2, max abs) error of the latents after inverting and sampling back with `steps` steps."""
        sigmas = backbone.sigmas(steps, backbone.image_seq_len(clean))
        noise = flow_invert(backbone, cond, clean, sigmas, guidance_scale=scale)
        error = euler_sample(backbone, cond, noise, sigmas, scale) - clean
        return (error.norm() / clean.norm()).item(), error.abs().max().item()

    (coarse, _), (fine, fine_max) = round_trip_error(10), round_trip_error(50)
    assert fine < 0.01 and fine_max < 0.06
    assert fine < coarse / 3  # first order: 5x the steps, about a fifth of the error


def test_rf_inversion_controller_pulls_the_inverted_noise_towards_y1(backbones):
    backbone = backbones["flux"]
    unconditional = backbone.encode_prompt("")
    clean, target = latents_like(backbone, 1, seed=1), latents_like(backbone, 1, seed=2)
    sigmas = backbone.sigmas(10, backbone.image_seq_len(clean))

    def distance_to_target(gamma: float) -> float:
        noise = flow_invert(backbone, unconditional, clean, sigmas, guidance_scale=3.5, controller_gamma=gamma,
                            target_noise=target)
        return ((noise - target).norm() / target.norm()).item()

    plain, half, full = distance_to_target(0.0), distance_to_target(0.5), distance_to_target(1.0)
    assert plain > 1.0 and half < plain / 4  # measured relative distances: 1.59 (gamma 0) -> 0.22 (gamma 0.5)
    assert full < 1e-5  # gamma = 1 follows the straight path to y1 and ends on it


def test_vae_normalisation_uses_shift_and_scale(backbones):
    backbone = backbones["sd3"]
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    encoded = backbone.encode_images(pixels, torch.Generator().manual_seed(0))
    raw = backbone.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    config = backbone.vae.config
    torch.testing.assert_close(encoded, (raw - config.shift_factor) * config.scaling_factor)
    decoded = backbone.vae.decode(encoded / config.scaling_factor + config.shift_factor).sample
    torch.testing.assert_close(backbone.decode_latents(encoded), (decoded / 2 + 0.5).clamp(0, 1))


def test_guidance_needs_what_it_uses(backbones):
    sd3, flux = backbones["sd3"], backbones["flux"]
    noise = latents_like(sd3, 1, seed=0)
    sigmas = sd3.sigmas(2, 256)
    cond = sd3.encode_prompt("a cat")
    with pytest.raises(ValueError, match=r"^guidance_scale=5.0 needs negative_cond"):
        euler_sample(sd3, cond, noise, sigmas, 5.0)
    flux_cond = flux.encode_prompt("a cat")
    with pytest.raises(ValueError, match="FLUX embeds its guidance"):
        euler_sample(flux, flux_cond, noise, sigmas, 3.5, negative_cond=flux_cond)
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        flux.predict_velocity(noise, 0.5, flux_cond)
    with pytest.raises(ValueError, match="needs target_noise"):
        flow_invert(flux, flux_cond, noise, sigmas, 3.5, controller_gamma=0.5)
    both = Conditioning.cat([cond, cond.expand(1)])
    assert len(both) == 2 and len(cond.expand(3)) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_model_config_loads_a_flow_backbone(kind, flow_dirs, tmp_path):
    """conf/model/tiny_<kind>.yaml, as train.py composes it, is what load_flow_backbone takes."""
    from omegaconf import OmegaConf

    from tests.helpers import compose_cfg

    cfg = compose_cfg("train", [f"model=tiny_{kind}", f"model.path={flow_dirs[kind]}"], tmp_path)
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    assert settings["kind"] == kind and settings["build"] == f"tiny_{kind}"
    backbone = load_flow_backbone(**settings)
    assert backbone.kind == kind and backbone.name == f"tiny_{kind}" and not backbone.training
    assert backbone.max_sequence_length == {"sd3": 256, "flux": 512}[kind]
    assert not any(p.requires_grad for p in backbone.parameters())


def test_loading_names_what_is_wrong(flow_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"^model.path is not set"):
        load_flow_backbone(None)
    with pytest.raises(ConfigError, match=r"^model.kind='sdxl' is unknown for a flow backbone"):
        load_flow_backbone(str(flow_dirs["sd3"]), kind="sdxl")
    with pytest.raises(ModelLoadError, match=r"holds a sd3 pipeline, not model.kind=flux$"):
        load_flow_backbone(str(flow_dirs["sd3"]), kind="flux")
    (tmp_path / "sd15").mkdir()
    (tmp_path / "sd15" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="is a StableDiffusionPipeline pipeline; flow backbones are SD3 or FLUX"):
        load_flow_backbone(str(tmp_path / "sd15"))
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_flow_backbone(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"/nowhere/sd3 does not exist; point it at"):
        load_flow_backbone(str(tmp_path / "nowhere" / "sd3"))
    broken = tmp_path / "broken"  # a FLUX index without its component folders
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_flow_backbone(str(broken))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_recomputes_transformer_blocks_and_keeps_the_gradients(kind, flow_dirs):
    from tests.test_backbone import grad_and_block_calls

    plain, checkpointed = (load_flow_backbone(str(flow_dirs[kind]), gradient_checkpointing=on) for on in (False, True))
    assert checkpointed.transformer.is_gradient_checkpointing and not plain.transformer.is_gradient_checkpointing
    latents = latents_like(plain, 1, 0)
    (g0, n0), (g1, n1) = (grad_and_block_calls(b, b.transformer.transformer_blocks[0], latents, torch.tensor([0.5]))
                          for b in (plain, checkpointed))
    assert (n0, n1) == (1, 2)  # the backward ran the block again instead of keeping its activations
    torch.testing.assert_close(g1, g0)


def test_a_flow_backbone_keeps_attention_off_cudnns_fused_kernel(flow_dirs):
    """cuDNN's fused attention backward fails on FLUX's training shapes: building a flow backbone switches that
    kernel off for the process (the flash and memory-efficient kernels remain)."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        load_flow_backbone(str(flow_dirs["flux"]))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
