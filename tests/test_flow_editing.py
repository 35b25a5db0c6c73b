"""Real-image editing on the tiny SD3 and FLUX models (diffusion/flow_editing.py): flow inversion, then
prompt-to-prompt on the joint attention; edit.py end to end with the model's own guidance."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusion.editing import load_edit_method
from diffusion.flow import euler_sample, flow_invert, load_flow_backbone
from utils.errors import ConfigError

from tests.test_edit import run_edit

KINDS = ("sd3", "flux")
GUIDANCE = {"sd3": 5.0, "flux": 3.5}
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
STEPS = 4


@pytest.fixture(scope="module")
def backbones(flow_dirs) -> dict:
    return {kind: load_flow_backbone(str(flow_dirs[kind])) for kind in KINDS}


def latents(backbone, seed: int = 0) -> torch.Tensor:
    """A clean latent of a 64 px image (32 x 32 for the tiny models' VAEs)."""
    return torch.randn(1, backbone.latent_channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_sampling(backbone, start: torch.Tensor, guidance: float) -> torch.Tensor:
    """[source, target] Euler-sampled from one start latent with no attention control."""
    sigmas = backbone.sigmas(STEPS, backbone.image_seq_len(start))
    negative = backbone.encode_prompt([""]) if backbone.kind == "sd3" else None
    return euler_sample(backbone, backbone.encode_prompt([SOURCE, TARGET]), start.expand(2, -1, -1, -1), sigmas,
                        guidance, negative)


@pytest.mark.parametrize("kind", KINDS)
def test_the_source_row_is_sampled_from_the_inverted_noise_and_only_the_target_row_is_edited(kind, backbones):
    backbone, z0 = backbones[kind], latents(backbones[kind])
    edited = load_edit_method("flow_p2p", num_steps=STEPS)(backbone, z0, SOURCE, TARGET, guidance_scale=GUIDANCE[kind])
    sigmas = backbone.sigmas(STEPS, backbone.image_seq_len(z0))
    noise = flow_invert(backbone, backbone.encode_prompt([SOURCE]), z0, sigmas, 1.0)
    plain = plain_sampling(backbone, noise, GUIDANCE[kind])
    torch.testing.assert_close(edited[0], plain[0])
    assert (edited[1] - plain[1]).abs().max() > 1e-3  # the source's maps change the target row
    unedited = load_edit_method("flow_p2p", num_steps=STEPS, tau_c=0.0)(backbone, z0, SOURCE, TARGET,
                                                                        guidance_scale=GUIDANCE[kind])
    torch.testing.assert_close(unedited, plain)  # tau_c = 0 edits no step


@pytest.mark.parametrize("kind", KINDS)
def test_the_reconstruction_comes_closer_to_the_image_with_more_steps(kind, backbones):
    """Inverting and sampling at the same guidance retrace one ODE: Euler's error shrinks with the step size."""
    backbone, z0 = backbones[kind], latents(backbones[kind], seed=1)
    method = load_edit_method("flow_p2p")
    errors = [(method(backbone, z0, SOURCE, TARGET, num_steps=n, guidance_scale=1.0)[0] - z0[0]).pow(2).mean().item()
              for n in (2, 32)]
    assert errors[1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("kind", KINDS)
def test_rf_inversion_at_gamma_1_starts_from_the_seeded_noise(kind, backbones):
    backbone, z0 = backbones[kind], latents(backbones[kind])
    edited = load_edit_method("flow_p2p", num_steps=STEPS, gamma=1.0, invert_with="empty")(
        backbone, z0, SOURCE, TARGET, guidance_scale=GUIDANCE[kind], seed=3)
    seeded = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(edited[0], plain_sampling(backbone, seeded, GUIDANCE[kind])[0])


def test_bad_settings_and_backbones_are_refused(backbones, tiny):
    with pytest.raises(ConfigError, match=r"edit_method.gamma=2 must be a number in \[0, 1\]"):
        load_edit_method("flow_p2p", gamma=2)
    with pytest.raises(ConfigError, match="edit_method.invert_with='noise' is unknown; use source or empty"):
        load_edit_method("flow_p2p", invert_with="noise")
    with pytest.raises(ConfigError, match="edit_method.inversion_guidance=-1 must be a number >= 0"):
        load_edit_method("flow_p2p", inversion_guidance=-1)
    with pytest.raises(ConfigError, match="source has 5 words and target 6"):
        load_edit_method("flow_p2p", controller="replace")(backbones["sd3"], latents(backbones["sd3"]), SOURCE,
                                                           "a photo of a dog outside")
    with pytest.raises(ConfigError, match="FlowInversionP2P edits rectified-flow models, not this sd one"):
        load_edit_method("flow_p2p", num_steps=2)(tiny, torch.zeros(1, 4, 8, 8), SOURCE, TARGET)
    flux = backbones["flux"]
    with pytest.raises(ConfigError, match="DDIMWordSwap edits UNet models, not this flux one; use edit_method=flow"):
        load_edit_method("ddim_word_swap", num_steps=2)(flux, latents(flux), SOURCE, TARGET)


def test_edit_py_edits_with_flux_at_the_models_own_guidance(flow_dirs, tmp_path):
    image_file, out = tmp_path / "scene.png", tmp_path / "run"
    Image.new("RGB", (80, 80), (40, 120, 200)).save(image_file)
    proc = run_edit(f"image={image_file}", f"source={SOURCE}", f"target={TARGET}", "edit_method=flow_p2p",
                    "model=tiny_flux", f"model.path={flow_dirs['flux']}", "num_steps=3", "device=cpu",
                    f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "edit.json").read_text())
    assert info["guidance_scale"] == 3.5 and info["num_steps"] == 3 and info["settings"]["gamma"] == 0.0
    for name in ("source.png", "reconstruction.png", "edited.png"):
        assert Image.open(out / name).size == (64, 64), name
