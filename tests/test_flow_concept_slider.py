"""The LoRA Concept Slider on the rectified-flow backbones (tiny SD3 and FLUX): train.py end to end, the file in the
stock pipelines' `load_lora_weights`, and the strength as the LoRA scale at sampling time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.flow import pack_latents
from tests.test_flow_textual_inversion import GUIDANCE, seeded_latents, train_on_tiny_flow_models

KINDS = ("sd3", "flux")
PROMPT = "a photo of a cat"
SEED, STEPS = 7, 4


@pytest.fixture(scope="module")
def runs(flow_dirs, tmp_path_factory) -> dict[str, Path]:
    """A 3-step concept-slider run of train.py on each tiny flow model, with a 1-sample, 2-step latent pool (a large
    learning rate, so that the LoRA moves the image)."""
    return train_on_tiny_flow_models(flow_dirs, tmp_path_factory, "concept_slider", [
        "method=concept_slider", "slider=tiny_size", "trainer.max_steps=3", "callbacks.sample_grid.seeds=[0]",
        "callbacks.sample_grid.num_steps=2", "module.pool.size=1", "module.pool.num_steps=2",
        "module.optimizer.lr=0.05"])


def slider_image(flow_dir: Path, run: Path | None, strength: float | None, kind: str) -> torch.Tensor:
    """Our sampler's image of PROMPT: the run loaded as evaluate.py loads it (diffusion.artifacts) at `strength`;
    run None: the base model."""
    from diffusion.artifacts import ArtifactSet, load_artifact
    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate

    backbone = load_backbone(str(flow_dir), resolution=64)
    artifacts = ArtifactSet([load_artifact(backbone, run)] if run is not None else [])
    prompt = artifacts.fill(PROMPT, "") if run is not None else PROMPT
    assert prompt == PROMPT  # a LoRA slider leaves the prompt as it is
    with artifacts.applied([prompt], strength=strength):
        return generate(backbone, [prompt], seed=[SEED], num_steps=STEPS, guidance_scale=GUIDANCE[kind],
                        encode=artifacts.encoder(backbone))


def stock_pipeline(kind: str, flow_dir: Path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (FluxPipeline if kind == "flux" else StableDiffusion3Pipeline).from_pretrained(flow_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(pipe, kind: str) -> torch.Tensor:
    latents = pack_latents(seeded_latents(SEED)) if kind == "flux" else seeded_latents(SEED)
    return pipe(PROMPT, latents=latents, num_inference_steps=STEPS, height=64, width=64,
                guidance_scale=GUIDANCE[kind], output_type="pt", joint_attention_kwargs={"scale": 1.0}).images


@pytest.mark.parametrize("kind", KINDS)
def test_train_writes_transformer_lora_weights_and_slider_info(kind, runs):
    state = load_file(runs[kind] / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("transformer.") for k in state)
    layers = {k.split(".lora_")[0].removeprefix("transformer.") for k in state}
    assert {name.rsplit(".attn.", 1)[1] for name in layers} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert any(t.abs().max() > 0 for k, t in state.items() if "lora_B" in k)  # trained away from B = 0
    info = json.loads((runs[kind] / "slider.json").read_text())
    assert (info["method"], info["kind"], info["file"], info["targets"]) == (
        "concept_slider", kind, "pytorch_lora_weights.safetensors", "attention")


@pytest.mark.parametrize("kind", KINDS)
def test_stock_pipeline_with_load_lora_weights_samples_as_strength_one(kind, runs, flow_dirs):
    """StableDiffusion3Pipeline / FluxPipeline.load_lora_weights(run) at scale 1 gives our sampler's image at
    strength 1 (same latents and steps); strength 0 gives the base model's image."""
    pipe = stock_pipeline(kind, flow_dirs[kind])
    base_stock = stock_image(pipe, kind)
    pipe.load_lora_weights(runs[kind], adapter_name="slider")
    pipe.set_adapters(["slider"], adapter_weights=[1.0])
    stock = stock_image(pipe, kind)
    ours = slider_image(flow_dirs[kind], runs[kind], 1.0, kind)
    torch.testing.assert_close(ours, stock)  # measured: identical (max difference 0.0)
    assert (stock - base_stock).abs().max() > 1e-3  # the LoRA took part; measured: SD3 0.015, FLUX 0.0030
    zero = slider_image(flow_dirs[kind], runs[kind], 0.0, kind)
    base = slider_image(flow_dirs[kind], None, None, kind)
    torch.testing.assert_close(zero, base)  # measured: identical
    torch.testing.assert_close(base, base_stock)


def test_a_flux_concept_slider_refuses_sd3(runs, flow_dirs):
    from diffusion.backbone import load_backbone
    from diffusion.sliders import load_slider
    from utils.errors import ArtifactError

    backbone = load_backbone(str(flow_dirs["sd3"]), resolution=64)
    with pytest.raises(ArtifactError, match=r"is a concept_slider \(a flux LoRA\); load it on the flux model it was "
                                            r"trained on, not on sd3$"):
        load_slider(backbone, runs["flux"])
