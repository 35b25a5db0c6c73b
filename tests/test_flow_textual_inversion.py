"""Textual inversion on the rectified-flow backbones (tiny SD3 and FLUX): the flow-matching loss of
DiffusionModule.diffusion_loss, train.py end to end, and the artifact in the stock diffusers pipelines."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.backbone import Backbone, check_backbone_path, load_backbone
from diffusion.flow import FlowBackbone, pack_latents
from utils.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sd3", "flux")
TOKEN = "<concept>"
IMAGES = ROOT / "assets" / "concepts" / "red_ring"
FILE_KEYS = {"sd3": {"clip_l": 32, "clip_g": 48, "t5": 96}, "flux": {"clip_l": 32, "t5": 64}}  # key -> width
GUIDANCE = {"sd3": 5.0, "flux": 3.5}  # SD3: classifier-free guidance against ""; FLUX.1-dev: its guidance embedding


@pytest.fixture(scope="module")
def runs(flow_dirs, tmp_path_factory) -> dict[str, Path]:
    """A 20-step textual-inversion run of train.py on each tiny flow model (the issue's command)."""
    return train_on_tiny_flow_models(flow_dirs, tmp_path_factory, "ti", [
        "method=textual_inversion", f"data.images_dir={IMAGES}", "trainer.max_steps=20"])


def train_on_tiny_flow_models(flow_dirs, tmp_path_factory, name: str, overrides: list[str]) -> dict[str, Path]:
    """train.py with `overrides` on each tiny flow model (CPU, csv logs every step, no progress bar): run folders."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    folders = {}
    for kind in KINDS:
        run = tmp_path_factory.mktemp(f"{name}_{kind}") / "run"
        args = [f"model=tiny_{kind}", f"model.path={flow_dirs[kind]}", "trainer=cpu", "logger=csv",
                "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0", *overrides,
                f"hydra.run.dir={run}", f"paths.log_dir={run.parent / 'logs'}"]
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"train.py on tiny_{kind} failed:\n{proc.stderr[-4000:]}"
        folders[kind] = run
    return folders


def sd3_pipeline_with_token(flow_dir: Path, embeds_file: Path, token: str):
    """README's recipe for SD3, whose pipeline has no load_textual_inversion: the token added to each tokenizer and
    the file's rows written into each text encoder's grown table."""
    from diffusers import StableDiffusion3Pipeline

    state = load_file(embeds_file)
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_dir)
    pipe.set_progress_bar_config(disable=True)
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
                                    ("t5", pipe.tokenizer_3, pipe.text_encoder_3)):
        tokenizer.add_tokens(token)
        encoder.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = state[key][0]
    return pipe


def textual_inversion_module(path: Path, kind: str):
    from lightning_modules.textual_inversion import TextualInversionModule

    backbone = {"name": f"tiny_{kind}", "path": str(path), "kind": kind, "resolution": 64}
    module = TextualInversionModule(backbone, {"name": TOKEN, "initializer": "object"},
                                    optimizer=functools.partial(torch.optim.AdamW, lr=5e-3))
    module.configure_model()
    return module


def concept_pixels() -> torch.Tensor:
    """The red_ring images at the tiny models' 64 px, in [-1, 1]."""
    from PIL import Image

    files = sorted(IMAGES.glob("*.png"))[:2]
    pixels = [torch.tensor(list(Image.open(f).convert("RGB").resize((64, 64)).getdata()), dtype=torch.float32)
              for f in files]
    return torch.stack([p.view(64, 64, 3).permute(2, 0, 1) / 127.5 - 1 for p in pixels])


# ----- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_diffusion_loss_is_flow_matching_with_logit_normal_t(kind, flow_dirs):
    """diffusion_loss on a flow backbone = || (noise - x0) - v(x_t, t) ||^2 at x_t = (1 - t) x0 + t noise with
    t = sigmoid(n), n ~ N(0, 1), shifted by SD3's static shift 3 (FLUX: none), all drawn from the same generator
    in the same order."""
    module = textual_inversion_module(flow_dirs[kind], kind)
    backbone = module.backbone
    assert isinstance(backbone, FlowBackbone) and not backbone.is_sdxl and backbone.resolution == 64
    pixels, prompts = concept_pixels(), [f"a photo of a {TOKEN}", f"a rendering of a {TOKEN}"]
    loss = module.diffusion_loss(pixels, prompts, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    x0 = backbone.encode_images(pixels, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    shift = {"sd3": 3.0, "flux": 1.0}[kind]
    assert backbone.training_shift == shift
    u = torch.sigmoid(torch.randn(2, generator=g))
    t = shift * u / (1 + (shift - 1) * u)
    x_t = (1 - t.view(2, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1) * noise
    guidance = 3.5 if kind == "flux" else None  # FLUX trains with the guidance embedding at 3.5, as diffusers does
    velocity = backbone.predict_velocity(x_t, t, backbone.encode_prompt(prompts), guidance=guidance)
    torch.testing.assert_close(loss, ((velocity - (noise - x0)) ** 2).mean())
    loss.backward()
    assert all(rows.rows.grad is not None and rows.rows.grad.abs().sum() > 0 for rows in module.tokens.rows)

    t = backbone.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    draws = torch.logit(t / (shift - (shift - 1) * t))  # the shift undone
    assert abs(draws.mean().item()) < 0.03 and abs(draws.std().item() - 1) < 0.03  # logit-normal, m = 0, s = 1


def test_unet_timesteps_are_the_uniform_draws_of_before(tiny):
    """The UNet backbone's sampler draws the same integers torch.randint did in diffusion_loss."""
    assert isinstance(tiny, Backbone)
    ours = tiny.sample_timesteps(8, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(5)))


# ----- tokens on every text encoder ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_placeholder_token_reaches_every_text_encoder(kind, flow_dirs):
    """The token is one new id for each CLIP tokenizer and for T5, and its trained rows change what each encoder
    gives (T5's forward reads the table the rows are spliced into)."""
    module = textual_inversion_module(flow_dirs[kind], kind)
    backbone, tokens = module.backbone, module.tokens
    assert len(tokens.rows) == len(backbone.text_encoders) == len(FILE_KEYS[kind])
    for tokenizer in backbone.tokenizers:
        ids = tokenizer(f"a {TOKEN}", add_special_tokens=False).input_ids
        assert tokenizer.convert_tokens_to_ids(TOKEN) in ids
    prompt = f"a photo of a {TOKEN}"
    before = backbone.encode_prompt(prompt)
    with torch.no_grad():
        tokens.rows[-1].rows.add_(1.0)  # T5's rows only
    after = backbone.encode_prompt(prompt)
    assert (after.hidden_states - before.hidden_states).abs().max() > 1e-3
    torch.testing.assert_close(after.pooled, before.pooled)  # pooled text comes from CLIP alone


def test_a_tokenizer_two_encoders_share_gets_the_token_once(flow_dirs):
    """A pipeline built in memory may hand SD3's two CLIP encoders one tokenizer: the token is added once and
    both encoders' tables grow to hold its row, each trained on its own."""
    from diffusion.flow import load_flow_backbone
    from diffusion.tokens import PlaceholderTokens

    backbone = load_flow_backbone(str(flow_dirs["sd3"]))
    backbone.clip_tokenizers[1] = backbone.clip_tokenizers[0]
    size = len(backbone.clip_tokenizers[0])
    tokens = PlaceholderTokens(backbone, TOKEN, initializer="object")
    assert len(backbone.clip_tokenizers[0]) == size + 1
    assert tokens.rows[0].token_ids.tolist() == tokens.rows[1].token_ids.tolist() == [size]
    for encoder in backbone.text_encoders[:2]:
        assert encoder.get_input_embeddings().weight.shape[0] == size + 1
    widths = [FILE_KEYS["sd3"]["clip_l"], FILE_KEYS["sd3"]["clip_g"]]  # SD3 joins the CLIP states feature-wise
    for k, columns in enumerate((slice(0, widths[0]), slice(widths[0], sum(widths)))):
        before = backbone.encode_prompt(f"a photo of a {TOKEN}").hidden_states
        with torch.no_grad():
            tokens.rows[k].rows.add_(1.0)
        change = (backbone.encode_prompt(f"a photo of a {TOKEN}").hidden_states - before).abs()[0, :77].amax(0)
        assert change[columns].max() > 0.5 and change[:sum(widths)].sum() == change[columns].sum()


# ----- train.py end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_train_writes_per_encoder_embeddings_and_a_sample_grid(kind, runs, flow_dirs):
    run = runs[kind]
    state = load_file(run / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: (1, w) for k, w in FILE_KEYS[kind].items()}
    info = json.loads((run / "learned_embeds.json").read_text())
    assert info["token"] == TOKEN and info["backbone"] == f"tiny_{kind}"
    assert (run / "samples" / "step_000020.png").is_file()
    losses = [float(line.split(",")[-1]) for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:]
              if line.split(",")[-1]]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))

    module = textual_inversion_module(flow_dirs[kind], kind)  # the token at the initializer's rows: the start
    backbone = module.backbone
    for key, tokenizer, encoder in zip(backbone.embedding_keys, backbone.tokenizers, backbone.text_encoders):
        start = encoder.get_input_embeddings().weight[tokenizer("object", add_special_tokens=False).input_ids]
        assert (state[key] - start).abs().max() > 1e-3, f"20 steps left the {key} rows where they started"

    def held_out_loss() -> float:
        """The loss over fixed draws of noise and t (the same before and after), so the comparison is paired."""
        pixels, prompts = concept_pixels(), [f"a photo of a {TOKEN}"] * 2
        with torch.no_grad():
            return sum(module.diffusion_loss(pixels, prompts, torch.Generator().manual_seed(s)).item()
                       for s in range(16)) / 16

    before = held_out_loss()
    with torch.no_grad():
        for rows, key in zip(module.tokens.rows, backbone.embedding_keys):
            rows.rows.copy_(state[key])
    assert held_out_loss() < before  # measured over 32 draws: FLUX 1.408 -> 1.392, SD3 3.791 -> 3.777


# ----- the artifact in the stock pipelines ---------------------------------------------------------
def our_image(flow_dir: Path, run: Path, prompt: str, seed: int, steps: int, scale: float) -> torch.Tensor:
    """The run's artifact loaded as evaluate.py loads it, sampled by diffusion.sampling.generate."""
    from diffusion.artifacts import load_artifact
    from diffusion.sampling import generate

    backbone = load_backbone(str(flow_dir), resolution=64)  # the model config's size
    word = load_artifact(backbone, run).word
    assert word == TOKEN
    return generate(backbone, [prompt], seed=[seed], num_steps=steps, guidance_scale=scale)


def seeded_latents(seed: int) -> torch.Tensor:
    """The noise generate draws for `seed` on the CPU: 4 channels at 32 x 32 (64 px)."""
    return torch.randn(1, 4, 32, 32, generator=torch.Generator("cpu").manual_seed(seed))


def test_flux_artifact_loads_in_the_stock_pipeline_and_samples_the_same(flow_dirs, runs):
    """FluxPipeline + load_textual_inversion (CLIP, then T5 with the file's "t5" rows) gives our sampler's image."""
    from diffusers import FluxPipeline

    state = load_file(runs["flux"] / "learned_embeds.safetensors")
    pipe = FluxPipeline.from_pretrained(flow_dirs["flux"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["t5"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt, seed, steps = f"a photo of a {TOKEN}", 7, 4
    stock = pipe(prompt, latents=pack_latents(seeded_latents(seed)), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["flux"], output_type="pt").images
    ours = our_image(flow_dirs["flux"], runs["flux"], prompt, seed, steps, GUIDANCE["flux"])
    torch.testing.assert_close(ours, stock)  # measured: identical (max difference 0.0)
    plain = pipe("a photo of a object", latents=pack_latents(seeded_latents(seed)), num_inference_steps=steps,
                 height=64, width=64, guidance_scale=GUIDANCE["flux"], output_type="pt").images
    assert (stock - plain).abs().max() > 1e-4  # the token's rows took part in the comparison


def test_sd3_artifact_written_into_the_stock_pipeline_samples_the_same(flow_dirs, runs):
    """StableDiffusion3Pipeline has no load_textual_inversion: a user adds the token to each tokenizer and writes the
    file's rows into each text encoder's grown table; its image equals our sampler's (CFG against "")."""
    pipe = sd3_pipeline_with_token(flow_dirs["sd3"], runs["sd3"] / "learned_embeds.safetensors", TOKEN)
    prompt, seed, steps = f"a photo of a {TOKEN}", 7, 4
    stock = pipe(prompt, latents=seeded_latents(seed), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["sd3"], output_type="pt").images
    ours = our_image(flow_dirs["sd3"], runs["sd3"], prompt, seed, steps, GUIDANCE["sd3"])
    torch.testing.assert_close(ours, stock)  # measured: identical (max difference 0.0)
    plain = pipe("a photo of a object", latents=seeded_latents(seed), num_inference_steps=steps, height=64, width=64,
                 guidance_scale=GUIDANCE["sd3"], output_type="pt").images
    assert (stock - plain).abs().max() > 1e-4  # the token's rows took part in the comparison


# ----- loading ------------------------------------------------------------------------------------
def test_load_backbone_dispatches_on_kind_and_model_index(flow_dirs, tiny_dir):
    assert load_backbone(str(flow_dirs["flux"])).kind == "flux"  # auto: model_index.json names FluxPipeline
    sd3 = load_backbone(str(flow_dirs["sd3"]), kind="sd3", max_sequence_length=77, resolution=128)
    assert isinstance(sd3, FlowBackbone) and sd3.max_sequence_length == 77 and sd3.resolution == 128
    with pytest.raises(ModelLoadError, match=r"holds a sd3 pipeline, not model.kind=flux$"):
        load_backbone(str(flow_dirs["sd3"]), kind="flux")
    with pytest.raises(ModelLoadError, match=r"has no transformer/; point it at a diffusers-format FLUX folder$"):
        check_backbone_path(str(tiny_dir), kind="flux")
    check_backbone_path(str(flow_dirs["sd3"]))  # auto: an SD3 folder passes the early check



def test_methods_that_hook_the_unet_refuse_a_flow_backbone(flow_dirs):
    """A method not written for the shared interface stops with one line: at construction when model.kind says
    sd3 / flux, after loading when the folder's model_index.json does."""
    from lightning_modules.base import DiffusionModule
    from utils.errors import ConfigError

    class UNetMethod(DiffusionModule):
        def build(self, backbone) -> None:
            pass

    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ConfigError, match=r"^UNetMethod runs on Stable Diffusion UNet backbones .*not model.kind=sd3;"):
        UNetMethod({"path": str(flow_dirs["sd3"]), "kind": "sd3"}, optimizer)
    module = UNetMethod({"path": str(flow_dirs["flux"]), "kind": "auto"}, optimizer)
    with pytest.raises(ConfigError, match=r"not model.kind=flux; train textual_inversion on SD3 / FLUX"):
        module.configure_model()


def test_multi_vector_token_exports_rows_flux_expands_the_same_way(flow_dirs, tmp_path):
    """A 2-vector token on FLUX: the file holds [2, d] per encoder; after load_textual_inversion the stock pipeline
    spells '<concept>' out as '<concept> <concept>_1' in CLIP and T5 prompts, as the module's sampling prompt does, and
    encodes it as our backbone does."""
    from diffusers import FluxPipeline

    from lightning_modules.textual_inversion import TextualInversionModule

    backbone = {"name": "tiny_flux", "path": str(flow_dirs["flux"]), "kind": "flux", "resolution": 64}
    module = TextualInversionModule(backbone, {"name": TOKEN, "num_vectors": 2, "initializer": None},
                                    optimizer=functools.partial(torch.optim.AdamW, lr=5e-3))
    module.configure_model()
    module.export_artifacts(tmp_path)
    state = load_file(tmp_path / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 32), "t5": (2, 64)}

    pipe = FluxPipeline.from_pretrained(flow_dirs["flux"])
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("t5", pipe.tokenizer_2, pipe.text_encoder_2)):
        pipe.load_textual_inversion(state[key], token=TOKEN, text_encoder=encoder, tokenizer=tokenizer)
    prompt = module.sampling_prompt("a photo of a {}", "object")
    assert prompt == f"a photo of a {TOKEN} {TOKEN}_1"
    states, pooled, _ = pipe.encode_prompt(f"a photo of a {TOKEN}", None)
    ours = module.backbone.encode_prompt(prompt)
    torch.testing.assert_close(ours.hidden_states, states)
    torch.testing.assert_close(ours.pooled, pooled)
