"""Behaviour of diffusion/inversion.py (null-text and negative-prompt inversion, guided replay) and of
datamodules/trajectories.py (cached DDIM trajectories and inverted attention maps of real images)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from datamodules.trajectories import TrajectoryDataModule
from diffusion.attention import AttentionHub, ControlledAttnProcessor
from diffusion.inversion import (UncondSchedule, negative_prompt_inversion, null_text_inversion,
                                 optimise_until_below, reconstruct)
from diffusion.sampling import ddim_invert, ddim_sample, initial_noise
from utils.errors import DataError

PROMPT = "a photo of a cat"


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error relative to the reference's mean square."""
    return float((x - reference).pow(2).mean() / reference.pow(2).mean())


def generated_trajectory(backbone, num_steps: int, seed: int = 0):
    """(cond, noise, z_0, DDIM trajectory of z_0) for an image the model samples at guidance 1 from noise."""
    cond = backbone.encode_prompt([PROMPT])
    noise = initial_noise(backbone, 1, torch.Generator().manual_seed(seed))
    z0 = ddim_sample(backbone, cond, noise, num_steps=num_steps, guidance_scale=1.0)
    return cond, noise, z0, ddim_invert(backbone, z0, cond, num_steps)


# ----- DDIM inversion of a generated image -------------------------------------------------------
def test_ddim_trajectory_of_a_generated_image_reconstructs_it(tiny):
    """Inverting the model's own guidance-1 sample finds its noise, and sampling from z_N returns z_0.

    What is left is DDIM inversion's discretisation error (step k predicts eps at z_k for the move to
    z_{k+1}): measured 0.5-0.6% relative MSE for z_N and z_0 at N = 10 over seeds 0-2, 3.2-3.3x less
    at N = 20. The test allows 1% at N = 10 and asks the error to fall by more than 2.5x when the
    steps halve, which a wrong timestep or noise-level pairing would not do (a fresh noise sits at 200%).
    """
    errors = {}
    for n in (10, 20):
        cond, noise, z0, trajectory = generated_trajectory(tiny, n)
        rec = ddim_sample(tiny, cond, trajectory[-1], num_steps=n, guidance_scale=1.0)
        errors[n] = relative_error(trajectory[-1], noise), relative_error(rec, z0)
    assert max(errors[10]) < 0.01
    assert errors[10][0] / errors[20][0] > 2.5 and errors[10][1] / errors[20][1] > 2.5
    assert relative_error(initial_noise(tiny, 1, torch.Generator().manual_seed(1)), noise) > 1.0


# ----- null-text inversion -----------------------------------------------------------------------
def test_null_text_inversion_reconstructs_better_than_ddim_at_guidance(tiny):
    """At w = 7.5 the optimised per-step embeddings bring z_0 back far closer than the "" embedding.

    Measured (N = 6, 5 Adam steps): 3.6% (seed 0) and 3.3% (seed 3) relative MSE for plain DDIM
    inversion re-sampled at 7.5, 1.2% and 1.1% after null-text inversion: a ratio of 0.33-0.34, asserted
    below 0.5. The tiny UNet reacts weakly to its 32-d text states, so lr is 0.1 here (1e-2 for SD).
    """
    n = 6
    cond, _, z0, trajectory = generated_trajectory(tiny, n)
    empty = tiny.encode_prompt([""])
    plain = reconstruct(tiny, trajectory, cond, empty, n, guidance_scale=7.5)
    schedule = null_text_inversion(tiny, trajectory, cond, n, guidance_scale=7.5, inner_steps=5, lr=0.1)
    inverted = reconstruct(tiny, trajectory, cond, schedule, n, guidance_scale=7.5)
    assert len(schedule) == n and schedule.iterations == [5] * n  # losses ~1e-2: never below 1e-5 + i 2e-5
    assert relative_error(inverted, z0) / relative_error(plain, z0) < 0.5
    assert schedule(3, 0) is schedule[3] and schedule[3].hidden_states.shape == empty.hidden_states.shape
    assert not schedule[3].hidden_states.requires_grad


def test_null_text_warm_start_learning_rate_and_early_stop(tiny):
    """With one Adam step per sampling step every coordinate moves by at most lr_i = lr (1 - i decay)
    (Adam's first step), and the distance from "" grows step after step (each step starts where the
    previous one ended). Early stop: a loss below early_stop + i * growth ends a step's updates."""
    n, lr, decay = 3, 1e-2, 0.2
    cond, _, _, trajectory = generated_trajectory(tiny, n)
    empty = tiny.encode_prompt([""]).hidden_states
    schedule = null_text_inversion(tiny, trajectory, cond, n, inner_steps=1, lr=lr, lr_decay=decay)
    previous = empty
    for i, c in enumerate(schedule.embeddings):
        lr_i = lr * (1 - i * decay)
        move = (c.hidden_states - previous).abs().max().item()
        assert 0.95 * lr_i < move <= lr_i * (1 + 1e-4)
        previous = c.hidden_states
    far = [(c.hidden_states - empty).abs().max().item() for c in schedule.embeddings]
    assert far[1] > 1.5 * lr * (1 - decay) and far[2] > far[1] + 0.5 * lr * (1 - 2 * decay)

    always = null_text_inversion(tiny, trajectory, cond, n, inner_steps=4, early_stop=1e9)
    assert always.iterations == [1] * n and all(loss < 1e9 for loss in always.losses)
    growing = null_text_inversion(tiny, trajectory, cond, n, inner_steps=4, early_stop=0.0, early_stop_growth=1e9)
    assert growing.iterations == [4, 1, 1]  # threshold 0 at step 0, then 1e9 * i


# ----- negative-prompt inversion and schedules ---------------------------------------------------
@pytest.mark.parametrize("max_updates, threshold, updates", [(10, 1.0, 3), (10, 0.0, 10), (2, 1.0, 2), (0, 1.0, 0)])
def test_inner_loop_applies_the_update_that_stops_it_and_no_more(max_updates, threshold, updates):
    """SGD at lr 1/4 on |w|^2 halves w per update: losses 13, 3.25, 0.8125, ... measured before each update; the
    first below 1.0 is the third, whose update is applied; the gradient queued after it is not."""
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.25)
    calls = []

    def loss_and_gradient():
        optimizer.zero_grad()
        loss = w.pow(2).sum()
        loss.backward()
        calls.append(loss.item())
        return loss

    done, loss = optimise_until_below(loss_and_gradient, optimizer.step, max_updates, threshold)
    assert done == updates
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, -2.0]) * 0.5 ** updates)
    if updates:
        assert loss == 13 * 0.25 ** (updates - 1)  # the loss measured before the last update
    else:
        assert loss != loss  # nan: no update, no loss
    assert len(calls) == updates + (updates < max_updates)  # one queued forward beyond a stop that came early


def test_negative_prompt_inversion_samples_with_the_source_prompt_as_uncond(tiny):
    """NPI's reconstruction at 7.5 is ddim_sample with uncond = the source embedding; a schedule of one
    embedding samples as that fixed embedding."""
    n = 4
    cond, _, z0, trajectory = generated_trajectory(tiny, n)
    schedule = negative_prompt_inversion(cond, n)
    assert isinstance(schedule, UncondSchedule) and len(schedule) == n and schedule(2, 0) is cond
    npi = reconstruct(tiny, trajectory, cond, schedule, n, guidance_scale=7.5)
    expected = ddim_sample(tiny, cond, trajectory[-1], cond, num_steps=n, guidance_scale=7.5)
    torch.testing.assert_close(npi, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(npi, ddim_sample(tiny, cond, trajectory[-1], num_steps=n, guidance_scale=1.0),
                               atol=1e-4, rtol=0)  # eps_u = eps_c: guidance changes nothing

    empty = tiny.encode_prompt([""])
    torch.testing.assert_close(ddim_sample(tiny, cond, trajectory[-1], UncondSchedule([empty] * n), n, 7.5),
                               ddim_sample(tiny, cond, trajectory[-1], empty, num_steps=n, guidance_scale=7.5),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs 5 latents"):
        reconstruct(tiny, trajectory[1:], cond, schedule, n)


# ----- the trajectory cache ----------------------------------------------------------------------
@pytest.fixture
def real_images(tmp_path):
    """Two 72x72 images of a disc on a background, with prompts.json."""
    folder = tmp_path / "real"
    folder.mkdir()
    for i, bg in enumerate([(200, 200, 200), (40, 90, 160)]):
        im = Image.new("RGB", (72, 72), bg)
        ImageDraw.Draw(im).ellipse((10 + 8 * i, 12, 50 + 8 * i, 52), fill=(210, 30, 30))
        im.save(folder / f"{i:02d}.png")
    (folder / "prompts.json").write_text(json.dumps({"00": "a red circle", "01": "a red circle in the sky"}))
    return folder


def unet_calls(backbone):
    calls = []
    return calls, backbone.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))


def prepared(backbone, folder, cache, num_steps=3, model_path="tiny"):
    data = TrajectoryDataModule(str(folder), model_path, str(cache), resolution=64, num_steps=num_steps)
    data.setup("fit")
    calls, handle = unet_calls(backbone)
    data.prepare(backbone)
    handle.remove()
    return data, len(calls)


def test_trajectories_are_cached_and_reused(tiny, real_images, tmp_path):
    """First prepare inverts (N UNet calls per image) and writes one file per image; a second data
    module reads them without a UNet call; a changed prompt or num_steps misses."""
    cache = tmp_path / "cache"
    first, calls = prepared(tiny, real_images, cache)
    assert calls == 2 * 3 and len(list(cache.glob("*.safetensors"))) == 2
    assert not any(isinstance(p, ControlledAttnProcessor) for p in tiny.unet.attn_processors.values())

    t = first.trajectories[0]
    assert t.latents.shape == (4, 4, 32, 32) and t.maps.shape == (3, 16, 16, 77)
    torch.testing.assert_close(t.maps.sum(-1), torch.ones(3, 16, 16), atol=1e-5, rtol=0)  # softmax over keys
    again = ddim_invert(tiny, t.latents[:1], tiny.encode_prompt(["a red circle"]), 3)
    torch.testing.assert_close(torch.cat(again), t.latents, atol=1e-5, rtol=0)  # z*_0 ... z*_N in order
    assert [m.data_ptr() for m in map(t.step_map, range(3))] == [t.maps[k].data_ptr() for k in (2, 2, 1)]

    second, calls = prepared(tiny, real_images, cache)
    assert calls == 0
    for a, b in zip(first.trajectories, second.trajectories):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.maps, b.maps)

    (real_images / "prompts.json").write_text(json.dumps({"00": "a red circle", "01": "a blue circle"}))
    _, calls = prepared(tiny, real_images, cache)
    assert calls == 3  # only the image whose prompt changed
    _, calls = prepared(tiny, real_images, cache, num_steps=4)
    assert calls == 2 * 4
    with AttentionHub(tiny.unet) as outer:  # a hub the module installed: stacked over, then back
        other, calls = prepared(tiny, real_images, cache, model_path="another")
        assert all(isinstance(p, ControlledAttnProcessor) and p.hub is outer
                   for p in tiny.unet.attn_processors.values())
    assert calls == 2 * 3
    torch.testing.assert_close(other.trajectories[0].maps, first.trajectories[0].maps, atol=1e-6, rtol=0)

    batch = next(iter(second.train_dataloader()))
    assert batch["latents"].shape == (1, 4, 4, 32, 32) and batch["maps"].shape == (1, 3, 16, 16, 77)
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and len(batch["prompt"]) == 1


def test_missing_prompts_are_one_line_data_errors(real_images, tmp_path):
    """A missing prompt entry or prompts file names the file; no model is needed to find out."""
    (real_images / "prompts.json").write_text(json.dumps({"00": "a red circle"}))
    data = TrajectoryDataModule(str(real_images), "tiny", str(tmp_path / "cache"), resolution=64)
    with pytest.raises(DataError, match=r"prompts.json has no source prompt for image 01.png"):
        data.setup("fit")
    (real_images / "prompts.json").unlink()
    with pytest.raises(DataError, match=r"prompts.json does not exist"):
        TrajectoryDataModule(str(real_images), "tiny", str(tmp_path / "cache"), resolution=64).setup("fit")
    with pytest.raises(DataError, match="is not a folder"):
        TrajectoryDataModule(str(tmp_path / "none"), "tiny", str(tmp_path / "cache"), resolution=64).setup("fit")
