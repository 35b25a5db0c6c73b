"""Prompt Sliders on the rectified-flow backbones (tiny SD3 and FLUX): eq. (5) on velocities, the latent pool from the
flow sampler, train.py end to end, strength at sampling time, and the slider file in the stock diffusers pipelines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusion.flow import pack_latents
from tests.helpers import method_settings, slider_batch
from tests.test_flow_textual_inversion import (FILE_KEYS, GUIDANCE, sd3_pipeline_with_token, seeded_latents,
                                               train_on_tiny_flow_models)
from utils.errors import ConfigError

KINDS = ("sd3", "flux")
TOKEN = "<size>"
SIZE = {"target": "a photo of a {p}", "positive": "a photo of a large {p}", "unconditional": "a photo of a small {p}",
        "guidance_scale": 2.0, "preserve": ["cat"]}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def runs(flow_dirs, tmp_path_factory) -> dict[str, Path]:
    """A 5-step prompt-slider run of train.py on each tiny flow model, with a 1-sample, 2-step latent pool."""
    return train_on_tiny_flow_models(flow_dirs, tmp_path_factory, "slider", [
        "method=prompt_slider", "slider=tiny_size", "trainer.max_steps=5", "callbacks.sample_grid.seeds=[0]",
        "callbacks.sample_grid.num_steps=2", "module.pool.size=1", "module.pool.num_steps=2"])


def slider_module(path: Path, kind: str, token: str = TOKEN, **kwargs):
    from lightning_modules.slider import SliderModule

    settings = method_settings("prompt_slider", "pool", "reference_code")
    backbone = {"name": f"tiny_{kind}", "path": str(path), "kind": kind, "resolution": 64}
    module = SliderModule(backbone, {"name": token}, optimizer=torch.optim.AdamW, **settings, **kwargs)
    module.configure_model()
    return module


def encode_with_rows(backbone, tokens, prompt: str, scale: float):
    """The prompt's conditioning with every encoder's token row set to scale * the trained row (the hooks off)."""
    saved = []
    with torch.no_grad(), tokens.original():
        for rows, encoder in zip(tokens.rows, backbone.text_encoders):
            weight = encoder.get_input_embeddings().weight
            saved.append(weight[rows.token_ids].clone())
            weight[rows.token_ids] = scale * rows.rows.detach()
        cond = backbone.encode_prompt([prompt])
        for rows, encoder, old in zip(tokens.rows, backbone.text_encoders, saved):
            encoder.get_input_embeddings().weight[rows.token_ids] = old
    return cond


def randomise_rows(tokens) -> None:
    with torch.no_grad():
        for i, rows in enumerate(tokens.rows):
            rows.rows.normal_(generator=torch.Generator().manual_seed(10 + i))


# ----- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_slider_loss_is_eq5_on_frozen_velocities(kind, flow_dirs, monkeypatch):
    """loss = || v(x_t, c_t + alpha S) - [v(c_t) + alpha eta (v(c+) - v(c-))] ||^2 at x_t = (1 - t) z0 + t noise, each
    velocity computed on its own, t logit-normal with SD3's shift 3 (FLUX: none), alpha S written into every text
    encoder's table by hand, all drawn in the module's order from the same generator."""
    module = slider_module(flow_dirs[kind], kind)
    backbone, tokens = module.backbone, module.tokens
    assert len(tokens.rows) == len(backbone.text_encoders) == len(FILE_KEYS[kind])  # CLIP-L (+ CLIP-G), T5
    randomise_rows(tokens)
    z0 = torch.randn(1, backbone.latent_channels, 32, 32, generator=torch.Generator().manual_seed(2))
    module.pool.latents[PROMPT] = z0
    monkeypatch.setattr(module, "step_generator", lambda offset=0, device=None: torch.Generator().manual_seed(7))
    loss = module.textual_loss(slider_batch(SIZE, "cat"))

    g = torch.Generator().manual_seed(7)
    torch.randint(1, (1,), generator=g)  # the pool index
    noise = torch.randn(z0.shape, generator=g)
    shift = {"sd3": 3.0, "flux": 1.0}[kind]
    u = torch.sigmoid(torch.randn(1, generator=g))
    t = shift * u / (1 + (shift - 1) * u)
    alpha = float(torch.rand(1, generator=g)) * 3.0
    x_t = (1 - t) * z0 + t * noise
    guidance = 3.5 if kind == "flux" else None  # FLUX's guidance embedding in training, as diffusers' scripts feed it
    with torch.no_grad():
        v = {k: backbone.predict_velocity(x_t, t, backbone.encode_prompt([p]), guidance=guidance)
             for k, p in (("n", PROMPT), ("p", "a photo of a large cat"), ("m", "a photo of a small cat"))}
        target = v["n"] + alpha * 2.0 * (v["p"] - v["m"])
        cond = encode_with_rows(backbone, tokens, f"{PROMPT} {TOKEN}", alpha)
        expected = F.mse_loss(backbone.predict_velocity(x_t, t, cond, guidance=guidance), target)
    assert 0.0 < alpha < 3.0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert [p for p in module.parameters() if p.grad is not None] == [rows.rows for rows in tokens.rows]
    assert all(rows.rows.grad.abs().sum() > 0 for rows in tokens.rows)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_pool_samples_the_target_with_the_flow_sampler(kind, flow_dirs):
    from diffusion.flow import flow_generate
    from lightning_modules.slider import LatentPool

    module = slider_module(flow_dirs[kind], kind)
    pool = LatentPool(1, 2, 3.5, seed=0)
    pool.fill(module.backbone, [PROMPT], None)
    seed = int(hashlib.sha256(PROMPT.encode()).hexdigest()[:12], 16) % (2 ** 63)
    expected = flow_generate(module.backbone, [PROMPT], [seed], 2, 3.5, decode=False)
    assert pool.latents[PROMPT].shape == (1, module.backbone.latent_channels, 32, 32)
    torch.testing.assert_close(pool.latents[PROMPT], expected)


def test_variants_other_than_the_papers_textual_slider_refuse_flow_backbones(flow_dirs):
    optimizer = torch.optim.AdamW
    settings = method_settings("prompt_slider", "pool", "reference_code")
    from lightning_modules.slider import SliderModule

    for kwargs, named in (({"variant": "reference_code"}, "module.variant=reference_code"),
                          ({"mode": "visual"}, "module.mode=visual")):
        with pytest.raises(ConfigError, match=rf"^{named}.* runs on UNet backbones, not model.kind=sd3; use module"):
            SliderModule({"path": str(flow_dirs["sd3"]), "kind": "sd3"}, {"name": TOKEN}, optimizer=optimizer,
                         **settings, **kwargs)
    module = SliderModule({"path": str(flow_dirs["flux"]), "kind": "auto"}, {"name": TOKEN}, optimizer=optimizer,
                          **settings, variant="reference_code")
    with pytest.raises(ConfigError, match=r"runs on UNet backbones, not model.kind=flux"):
        module.configure_model()  # auto: refused once the folder says FLUX


def test_unet_only_sliders_refuse_a_flow_backbone_at_sampling(flow_dirs, tmp_path):
    """A reference_code slider (output scaling edits the UNet's CLIP states) and a concept slider (a UNet LoRA) each
    stop with one line on FLUX."""
    from diffusion.backbone import load_backbone
    from diffusion.sliders import SliderSet, load_slider
    from utils.errors import ArtifactError
    from utils.io import write_safetensors

    run = tmp_path / "reference_code"
    write_safetensors(run / "learned_embeds.safetensors", {"clip_l": torch.zeros(1, 32), "t5": torch.zeros(1, 64)},
                      metadata={"token": TOKEN})
    (run / "slider.json").write_text(json.dumps({"method": "prompt_slider", "file": "learned_embeds.safetensors",
                                                 "token": TOKEN, "scaling": "output", "zero_above": 800}))
    backbone = load_backbone(str(flow_dirs["flux"]), resolution=64)
    with pytest.raises(ConfigError, match=r"^slider <size> scales the text encoder's output .*train variant=paper$"):
        SliderSet([load_slider(backbone, run)]).encoder(backbone)
    (run / "slider.json").write_text(json.dumps({"method": "concept_slider", "file": "learned_embeds.safetensors"}))
    with pytest.raises(ArtifactError, match=r"is a concept_slider \(a UNet LoRA\); load it on the SD1.x / SDXL"):
        load_slider(backbone, run)


# ----- sampling strength --------------------------------------------------------------------------
def loaded_slider_image(flow_dir: Path, run: Path, strength: float | None, seed: int, steps: int, scale: float):
    """The slider run loaded as evaluate.py loads it (diffusion.artifacts), sampled by generate at `strength`."""
    from diffusion.artifacts import ArtifactSet, load_artifact
    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate

    backbone = load_backbone(str(flow_dir), resolution=64)
    artifacts = ArtifactSet([load_artifact(backbone, run)])
    prompt = artifacts.fill(PROMPT, "")
    assert prompt == f"{PROMPT} {TOKEN}"
    with artifacts.applied([prompt], strength=strength):
        return generate(backbone, [prompt], seed=[seed], num_steps=steps, guidance_scale=scale,
                        encode=artifacts.encoder(backbone))


@pytest.mark.parametrize("kind", KINDS)
def test_strength_scales_every_encoders_row_and_the_loaded_file_samples_as_the_module(kind, flow_dirs, tmp_path):
    """Strength s reads the prompt with s * S in every encoder's token row; the exported slider, loaded through
    diffusion.artifacts, gives DiffusionModule.sample's image at the same strength."""
    module = slider_module(flow_dirs[kind], kind)
    backbone, tokens = module.backbone, module.tokens
    randomise_rows(tokens)
    prompt = module.sampling_prompt(PROMPT, "")
    assert prompt == f"{PROMPT} {TOKEN}"
    for s in (0.0, 1.5):
        with module.sampling_setting(strength=s):
            got = backbone.encode_prompt([prompt])
        expected = encode_with_rows(backbone, tokens, prompt, s)
        torch.testing.assert_close(got.hidden_states, expected.hidden_states)
        torch.testing.assert_close(got.pooled, expected.pooled)
    module.export_artifacts(tmp_path / "run")
    ours = module.sample([prompt], [3], {"strength": 1.5}, num_steps=2, guidance_scale=GUIDANCE[kind])
    loaded = loaded_slider_image(flow_dirs[kind], tmp_path / "run", 1.5, 3, 2, GUIDANCE[kind])
    torch.testing.assert_close(loaded, ours)


def test_two_flux_sliders_compose_with_their_own_strengths_in_every_encoder(flow_dirs, tmp_path):
    """Two slider runs loaded as evaluate.py composes them (artifact=[a, b] strength=[2, -0.5]): both tokens appended,
    each encoder's row of each token scaled by its own strength."""
    from diffusion.artifacts import ArtifactSet, load_artifact
    from diffusion.backbone import load_backbone

    for name, seed in (("<a>", 1), ("<b>", 2)):
        module = slider_module(flow_dirs["flux"], "flux", token=name)
        with torch.no_grad():
            for rows in module.tokens.rows:
                rows.rows.normal_(generator=torch.Generator().manual_seed(seed))
        module.export_artifacts(tmp_path / name.strip("<>"))
    backbone = load_backbone(str(flow_dirs["flux"]), resolution=64)
    artifacts = ArtifactSet([load_artifact(backbone, tmp_path / "a"), load_artifact(backbone, tmp_path / "b")])
    prompt = artifacts.fill(PROMPT, "")
    assert prompt == f"{PROMPT} <a> <b>"
    with artifacts.applied([prompt], strength=[2.0, -0.5]):
        got = backbone.encode_prompt([prompt])
    for tokenizer, encoder in zip(backbone.tokenizers, backbone.text_encoders):
        table = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(["<a>", "<b>"])
        with torch.no_grad():
            table[ids[0]], table[ids[1]] = 2.0 * table[ids[0]], -0.5 * table[ids[1]]
    for artifact in artifacts.artifacts:
        for rows in artifact.slider.rows:
            rows.enabled = False  # the hand-scaled table alone
    expected = backbone.encode_prompt([prompt])
    torch.testing.assert_close(got.hidden_states, expected.hidden_states)
    torch.testing.assert_close(got.pooled, expected.pooled)


# ----- train.py end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_train_writes_per_encoder_slider_and_a_strength_grid(kind, runs, flow_dirs):
    run = runs[kind]
    state = load_file(run / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: (1, w) for k, w in FILE_KEYS[kind].items()}
    info = json.loads((run / "slider.json").read_text())
    assert (info["method"], info["token"], info["backbone"], info["slider"]) == (
        "prompt_slider", TOKEN, f"tiny_{kind}", "tiny_size")
    assert (info["mode"], info["variant"], info["scaling"]) == ("textual", "paper", "embedding")
    assert (run / "samples" / "step_000005.png").is_file()
    assert json.loads((run / "samples" / "step_000005.json").read_text())["columns"] == {"strength": [0, 1]}
    losses = [float(line.split(",")[-1]) for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]
              if line.split(",")[-1]]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    start = slider_module(flow_dirs[kind], kind).tokens  # the same seeded random start as the run's
    for key, rows in zip(FILE_KEYS[kind], start.rows):
        assert (state[key] - rows.rows.detach()).abs().max() > 1e-4, f"5 steps left the {key} rows where they started"


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_and_one_give_different_images(kind, runs, flow_dirs):
    zero = loaded_slider_image(flow_dirs[kind], runs[kind], 0.0, 7, 4, GUIDANCE[kind])
    one = loaded_slider_image(flow_dirs[kind], runs[kind], 1.0, 7, 4, GUIDANCE[kind])
    assert (zero - one).abs().max() > 1e-3  # measured after 5 steps: FLUX 0.011, SD3 0.031


# ----- the slider file in the stock pipelines -----------------------------------------------------
def test_flux_slider_loads_in_the_stock_pipeline_and_samples_as_strength_one(flow_dirs, runs):
    """FluxPipeline + load_textual_inversion per encoder ("clip_l", then "t5") with the prompt + token gives our
    sampler's image at strength 1 (the token as trained), at the same latents and steps."""
    from diffusers import FluxPipeline

    state = load_file(runs["flux"] / "learned_embeds.safetensors")
    pipe = FluxPipeline.from_pretrained(flow_dirs["flux"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    seed, steps = 7, 4
    stock = pipe(f"{PROMPT} {TOKEN}", latents=pack_latents(seeded_latents(seed)), num_inference_steps=steps,
                 height=64, width=64, guidance_scale=GUIDANCE["flux"], output_type="pt").images
    ours = loaded_slider_image(flow_dirs["flux"], runs["flux"], 1.0, seed, steps, GUIDANCE["flux"])
    torch.testing.assert_close(ours, stock)  # measured: identical (max difference 0.0)
    plain = pipe(PROMPT, latents=pack_latents(seeded_latents(seed)), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["flux"], output_type="pt").images
    assert (stock - plain).abs().max() > 1e-4  # the token took part in the comparison


def test_sd3_slider_written_into_the_stock_pipeline_samples_as_strength_one(flow_dirs, runs):
    """StableDiffusion3Pipeline has no load_textual_inversion: the token added to each tokenizer and the file's rows
    written into each encoder's grown table (README's recipe) give our sampler's image at strength 1."""
    pipe = sd3_pipeline_with_token(flow_dirs["sd3"], runs["sd3"] / "learned_embeds.safetensors", TOKEN)
    seed, steps = 7, 4
    stock = pipe(f"{PROMPT} {TOKEN}", latents=seeded_latents(seed), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["sd3"], output_type="pt").images
    ours = loaded_slider_image(flow_dirs["sd3"], runs["sd3"], 1.0, seed, steps, GUIDANCE["sd3"])
    torch.testing.assert_close(ours, stock)  # measured: identical (max difference 0.0)
    plain = pipe(PROMPT, latents=seeded_latents(seed), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["sd3"], output_type="pt").images
    assert (stock - plain).abs().max() > 1e-4  # the token took part in the comparison
