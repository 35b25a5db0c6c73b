"""Behaviour of diffusion/sampling.py: the DDIM schedule, classifier-free guidance, partial denoising,
DDIM inversion, generate(), and the SD2 (v-prediction) and SDXL layouts of the tiny model."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion.attention import AttentionHub, AttentionReplace, AttentionStore
from diffusion.backbone import Conditioning, load_backbone
from diffusion.sampling import DDIMSchedule, ddim_invert, ddim_sample, generate, guided_epsilon, initial_noise

PROMPTS = ["a photo of a cat", "a photo of a dog"]


# ----- helpers -----------------------------------------------------------------------------------
def noise(backbone, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return initial_noise(backbone, batch, torch.Generator().manual_seed(seed))


def text(backbone, prompts=PROMPTS[:1]) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) for prompts and the empty prompt."""
    return backbone.encode_prompt(list(prompts)), backbone.encode_prompt([""])


@contextmanager
def unet_batches(backbone):
    """Collects the batch size of every UNet call made inside the block."""
    sizes: list[int] = []
    handle = backbone.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def fake_unet(monkeypatch, backbone, f=lambda t: 1.0 + 0.5 * torch.cos(math.pi * t / 1000), seed=5):
    """Replace backbone.predict by eps(x, t) = E * f(t): a fixed random tensor times a smooth function of t.

    Returns E and the list of calls (the timestep of each)."""
    e = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
    calls = []

    def predict(latents, t, cond, cross_attention_kwargs=None):
        t = torch.as_tensor(t).float()
        calls.append(float(t))
        return (e * f(t)).expand_as(latents).clone()

    monkeypatch.setattr(backbone, "predict", predict)
    return e, calls


# ----- the schedule ------------------------------------------------------------------------------
def test_schedule_matches_diffusers_ddim(tiny):
    """Timesteps, alphas and single updates (eta 0 and eta > 0 with given noise) equal DDIMScheduler's."""
    n = 10
    schedule = DDIMSchedule(tiny.scheduler.config, n)
    reference = DDIMScheduler.from_config(tiny.scheduler.config)
    reference.set_timesteps(n)
    assert torch.equal(schedule.timesteps, reference.timesteps.long())
    assert schedule.timesteps.tolist() == list(range(901, 0, -100))  # 'leading' spacing, offset 1

    alphas = torch.stack([schedule.alpha(i) for i in range(n + 1)])
    assert (alphas.diff() > 0).all()  # the noise level falls along the sampling steps
    assert alphas[-1] == schedule.final_alpha == tiny.scheduler.alphas_cumprod[0]  # set_alpha_to_one=False
    assert alphas[0] == tiny.scheduler.alphas_cumprod[schedule.timesteps[0]]

    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in (0, 4, n - 1):
        t = schedule.timesteps[i]
        ours = schedule.step(x, eps, schedule.alpha(i), schedule.alpha(i + 1))
        torch.testing.assert_close(ours, reference.step(eps, t, x).prev_sample, atol=1e-5, rtol=1e-5)
        ours = schedule.step(x, eps, schedule.alpha(i), schedule.alpha(i + 1), eta=0.6, noise=z)
        theirs = reference.step(eps, t, x, eta=0.6, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ----- sampling ----------------------------------------------------------------------------------
def test_ddim_sample_is_deterministic(tiny):
    """Same noise -> identical latents; eta > 0: the same generator seed repeats, another seed differs."""
    cond, uncond = text(tiny)
    z = noise(tiny, seed=0)
    assert torch.equal(z, noise(tiny, seed=0)) and not torch.equal(z, noise(tiny, seed=1))
    a = ddim_sample(tiny, cond, z, uncond, num_steps=2)
    b = ddim_sample(tiny, cond, z.clone(), uncond, num_steps=2)
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.shape == z.shape
    assert torch.equal(z, noise(tiny, seed=0))  # the input is not modified

    def stochastic(seed):
        return ddim_sample(tiny, cond, z, num_steps=2, guidance_scale=1.0, eta=1.0,
                           generator=torch.Generator().manual_seed(seed))

    s1 = stochastic(1)
    assert torch.equal(s1, stochastic(1))
    assert not torch.allclose(s1, stochastic(2), atol=1e-3)
    assert not torch.allclose(s1, ddim_sample(tiny, cond, z, num_steps=2, guidance_scale=1.0), atol=1e-3)


def test_guidance_is_one_batched_call_per_step(tiny):
    """w != 1: one UNet call of batch 2B per step; w == 1: one call of batch B and uncond is ignored."""
    cond, uncond = text(tiny, PROMPTS)
    z = noise(tiny, 2)
    with unet_batches(tiny) as sizes:
        guided = ddim_sample(tiny, cond, z, uncond, num_steps=2, guidance_scale=5.0)
    assert sizes == [4, 4] and torch.isfinite(guided).all()
    with unet_batches(tiny) as sizes:
        plain = ddim_sample(tiny, cond, z, uncond, num_steps=2, guidance_scale=1.0)
    assert sizes == [2, 2]
    assert torch.equal(plain, ddim_sample(tiny, cond, z, None, num_steps=2, guidance_scale=5.0))
    assert not torch.allclose(plain, guided, atol=1e-3)


def test_guided_epsilon_equals_two_separate_calls(tiny):
    """The batched guided prediction is eps_u + w (eps_c - eps_u) of separate calls; one step uses it."""
    cond, uncond = text(tiny, PROMPTS)
    x, w = noise(tiny, 2), 7.5
    schedule = DDIMSchedule(tiny.scheduler.config, 4)
    t = schedule.timesteps[0]
    with torch.no_grad(), unet_batches(tiny) as sizes:
        guided = guided_epsilon(tiny, x, t, cond, uncond, w)
        eps_u = tiny.predict(x, t, uncond.expand(2))
        eps_c = tiny.predict(x, t, cond)
    assert sizes == [4, 2, 2]
    expected = eps_u + w * (eps_c - eps_u)
    # fp32 kernels on a batch of 4 and of 2 differ in the last bits (~1e-6); guidance scales that by 2w + 1
    tolerance = (2 * w + 1) * 1e-5
    torch.testing.assert_close(guided, expected, atol=tolerance, rtol=1e-5)
    assert not torch.allclose(eps_u, eps_c, atol=1e-4)

    one_step = ddim_sample(tiny, cond, x, uncond, num_steps=4, guidance_scale=w, stop_step=1)
    manual = schedule.step(x, expected, schedule.alpha(0), schedule.alpha(1))  # linear in eps, coefficient ~1
    torch.testing.assert_close(one_step, manual, atol=tolerance, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(guided_epsilon(tiny, x, t, cond, uncond, 1.0), eps_c)


def test_partial_denoising_composes_to_a_full_run(tiny):
    """Steps [0, k) then [k, N) give the full run; stop_step=k makes exactly k UNet calls."""
    cond, _ = text(tiny)
    z = noise(tiny)
    full = ddim_sample(tiny, cond, z, num_steps=4, guidance_scale=1.0)
    with unet_batches(tiny) as first_calls:
        half = ddim_sample(tiny, cond, z, num_steps=4, guidance_scale=1.0, stop_step=2)
    with unet_batches(tiny) as rest_calls:
        rest = ddim_sample(tiny, cond, half, num_steps=4, guidance_scale=1.0, start_step=2)
    assert len(first_calls) == 2 and len(rest_calls) == 2
    torch.testing.assert_close(rest, full, atol=1e-6, rtol=0)
    assert not torch.allclose(half, full, atol=1e-3) and not torch.allclose(half, z, atol=1e-3)


def test_eta_noise_comes_from_the_generator_in_order(tiny, monkeypatch):
    """eta > 0: step i adds sigma_i times the i-th draw of the generator; a split run that passes on
    the same generator equals the full run."""
    e, calls = fake_unet(monkeypatch, tiny)
    cond, _ = text(tiny)
    z = noise(tiny)
    full = ddim_sample(tiny, cond, z, num_steps=6, guidance_scale=1.0, eta=0.5,
                       generator=torch.Generator().manual_seed(3))
    schedule, g, manual = DDIMSchedule(tiny.scheduler.config, 6), torch.Generator().manual_seed(3), z
    for i, t in enumerate(schedule.timesteps):
        eps = e * (1.0 + 0.5 * torch.cos(math.pi * t.float() / 1000))
        draw = torch.randn(z.shape, generator=g)
        manual = schedule.step(manual, eps, schedule.alpha(i), schedule.alpha(i + 1), 0.5, draw)
    torch.testing.assert_close(full, manual, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(3)
    half = ddim_sample(tiny, cond, z, num_steps=6, guidance_scale=1.0, eta=0.5, generator=g, stop_step=4)
    rest = ddim_sample(tiny, cond, half, num_steps=6, guidance_scale=1.0, eta=0.5, generator=g, start_step=4)
    torch.testing.assert_close(rest, full, atol=1e-6, rtol=0)
    assert len(calls) == 6 + 6


def test_step_callback_sees_each_step_and_may_replace_latents(tiny, monkeypatch):
    """step_callback(i, x) is called after every step; a returned tensor replaces the latents."""
    fake_unet(monkeypatch, tiny)
    cond, _ = text(tiny)
    seen = []

    def callback(i, x):
        seen.append(i)
        return torch.full_like(x, 7.0) if i == 3 else None

    out = ddim_sample(tiny, cond, noise(tiny), num_steps=4, guidance_scale=1.0, start_step=1, step_callback=callback)
    assert seen == [1, 2, 3] and torch.equal(out, torch.full_like(out, 7.0))


def test_samplers_set_and_reset_the_hub_state(tiny, monkeypatch):
    """Each UNet call sees step, num_steps and cfg of its step; sampling and inversion reset them after."""
    cond, uncond = text(tiny)
    states = []
    with AttentionHub(tiny.unet) as hub:
        e, _ = fake_unet(monkeypatch, tiny)
        inner = tiny.predict
        monkeypatch.setattr(tiny, "predict", lambda *a, **k: states.append(
            (hub.state.step, hub.state.num_steps, hub.state.cfg)) or inner(*a, **k))
        ddim_sample(tiny, cond, noise(tiny), uncond, num_steps=3, guidance_scale=5.0, hub=hub)
        assert states == [(0, 3, True), (1, 3, True), (2, 3, True)]
        assert (hub.state.step, hub.state.num_steps, hub.state.cfg) == (None, None, False)
        states.clear()
        ddim_invert(tiny, noise(tiny), cond, num_steps=3, hub=hub)
        assert states == [(2, 3, False), (1, 3, False), (0, 3, False)]
        assert (hub.state.step, hub.state.num_steps, hub.state.cfg) == (None, None, False)


def test_prompt_to_prompt_windows_follow_the_sampler(tiny):
    """During ddim_sample the edit only acts in its step window: with cross_steps=0.5 of 2 steps, step 0."""
    tok = tiny.tokenizers[0]
    cond, uncond = text(tiny, PROMPTS)
    store = AttentionStore(cond_only=True)
    edit = AttentionReplace.from_prompts(tok, PROMPTS[0], PROMPTS[1:], cross_steps=0.5, self_steps=0.0)
    z = noise(tiny).expand(2, -1, -1, -1)
    with AttentionHub(tiny.unet, [edit, store]) as hub:
        ddim_sample(tiny, cond, z, uncond, num_steps=2, guidance_scale=5.0, hub=hub)
    for place, (step0, step1) in store.maps.items():
        assert step0.shape[0] == 2  # the conditional rows only
        torch.testing.assert_close(step0[1], step0[0], atol=1e-7, rtol=0)
        assert not torch.allclose(step1[1], step1[0], atol=1e-4)


# ----- inversion ---------------------------------------------------------------------------------
def test_inversion_then_sampling_reconstructs(tiny, monkeypatch):
    """With eps depending on t only, ddim_sample(ddim_invert(z0)[-1]) returns z0; partial runs retrace it."""
    _, calls = fake_unet(monkeypatch, tiny)
    cond, _ = text(tiny)
    z0 = noise(tiny, seed=9)
    n = 10
    trajectory = ddim_invert(tiny, z0, cond, num_steps=n)
    assert len(trajectory) == n + 1 and trajectory[0] is z0 and len(calls) == n
    schedule = DDIMSchedule(tiny.scheduler.config, n)
    assert calls == sorted(schedule.timesteps.float().tolist())  # from the cleanest timestep up
    assert not torch.allclose(trajectory[-1], z0, atol=0.1)

    rec = ddim_sample(tiny, cond, trajectory[-1], num_steps=n, guidance_scale=1.0)
    torch.testing.assert_close(rec, z0, atol=1e-4, rtol=0)
    for j in (3, 7):  # after j sampling steps the sampler is back at trajectory[n - j]
        partial = ddim_sample(tiny, cond, trajectory[-1], num_steps=n, guidance_scale=1.0, stop_step=j)
        torch.testing.assert_close(partial, trajectory[n - j], atol=1e-4, rtol=0)
    resumed = ddim_sample(tiny, cond, trajectory[4], num_steps=n, guidance_scale=1.0, start_step=n - 4)
    torch.testing.assert_close(resumed, z0, atol=1e-4, rtol=0)


def test_inversion_trajectory_climbs_the_noise_levels(tiny, monkeypatch):
    """With a constant eps the predicted x0 stays put: entry k is sqrt(a) x0 + sqrt(1 - a) eps for
    a = alpha(N - k), which falls with k (z0 itself sits at alpha(N), the schedule's final alpha)."""
    e, _ = fake_unet(monkeypatch, tiny, f=lambda t: torch.tensor(1.0))
    cond, _ = text(tiny)
    z0 = noise(tiny, seed=9)
    n = 6
    schedule = DDIMSchedule(tiny.scheduler.config, n)
    trajectory = ddim_invert(tiny, z0, cond, num_steps=n)
    levels = torch.stack([schedule.alpha(n - k) for k in range(n + 1)])
    assert (levels.diff() < 0).all()
    x0 = (z0 - (1 - levels[0]).sqrt() * e) / levels[0].sqrt()
    for k, x in enumerate(trajectory):
        torch.testing.assert_close(x, levels[k].sqrt() * x0 + (1 - levels[k]).sqrt() * e, atol=1e-5, rtol=0)
    assert trajectory[-1].flatten().dot(e.flatten()) > trajectory[1].flatten().dot(e.flatten())


# ----- generate ----------------------------------------------------------------------------------
def test_generate_images_are_reproducible(tiny):
    """[B, 3, 64, 64] finite images in [0, 1]; same seed -> same images; prompt i uses seed + i (or seed[i])."""
    images = generate(tiny, PROMPTS, seed=0, num_steps=2)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    assert torch.equal(images, generate(tiny, PROMPTS, seed=0, num_steps=2))
    shifted = generate(tiny, PROMPTS[1:], seed=1, num_steps=2)
    torch.testing.assert_close(shifted[0], images[1], atol=1e-5, rtol=0)
    assert not torch.allclose(shifted[0], images[0], atol=1e-4)
    swapped = generate(tiny, PROMPTS[::-1], seed=[1, 0], num_steps=2)  # explicit per-prompt seeds
    torch.testing.assert_close(swapped, images.flip(0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        generate(tiny, PROMPTS[:1], seed=[0, 1], num_steps=2)


# ----- SD2 layout: v-prediction ------------------------------------------------------------------
def test_v_prediction_conventions_match_diffusers(tiny_dirs, tiny):
    """training_target is diffusers' get_velocity and to_epsilon turns v back into the noise."""
    sd2 = load_backbone(str(tiny_dirs["sd2"]))
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    a = sd2.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = sd2.add_noise(x0, eps, t)
    v = sd2.training_target(x0, eps, t)
    torch.testing.assert_close(v, sd2.scheduler.get_velocity(x0, eps, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(sd2.to_epsilon(v, x_t, t), eps, atol=1e-4, rtol=0)

    assert torch.equal(tiny.training_target(x0, eps, t), eps)  # epsilon layout: identity
    assert tiny.to_epsilon(v, x_t, t) is v


def test_v_prediction_sampling_matches_diffusers_step(tiny_dirs):
    """SD2 layout: finite latents, and one step equals DDIMScheduler.step on the raw v output."""
    sd2 = load_backbone(str(tiny_dirs["sd2"]))
    cond, uncond = text(sd2)
    z = noise(sd2)
    latents = ddim_sample(sd2, cond, z, uncond, num_steps=2, guidance_scale=5.0)
    assert latents.shape == z.shape and torch.isfinite(latents).all() and not torch.allclose(latents, z, atol=1e-2)

    reference = DDIMScheduler.from_config(sd2.scheduler.config)
    reference.set_timesteps(3)
    t = reference.timesteps[0]
    with torch.no_grad():
        v = sd2.predict(z, t, cond)
    expected = reference.step(v, t, z).prev_sample
    ours = ddim_sample(sd2, cond, z, num_steps=3, guidance_scale=1.0, stop_step=1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ----- SDXL layout -------------------------------------------------------------------------------
def test_sdxl_encode_prompt(tiny_sdxl):
    """Penultimate states of both encoders side by side, pooled text of the second, size ids per row."""
    cond = tiny_sdxl.encode_prompt(PROMPTS)
    assert cond.hidden_states.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    with torch.no_grad():
        first = tiny_sdxl.text_encoders[0](tiny_sdxl.tokenize(PROMPTS, 0), output_hidden_states=True)
        second = tiny_sdxl.text_encoders[1](tiny_sdxl.tokenize(PROMPTS, 1), output_hidden_states=True)
    torch.testing.assert_close(cond.pooled, second.text_embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond.hidden_states,
                               torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1), atol=0, rtol=0)


def test_sdxl_guided_sampling_records_attention(tiny_sdxl):
    """SDXL with CFG: pooled text and size ids are batched [uncond; cond], guidance is exact, maps are recorded."""
    cond, uncond = text(tiny_sdxl, PROMPTS)
    z = noise(tiny_sdxl, 2)
    added = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: added.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    store = AttentionStore(cond_only=True)
    with AttentionHub(tiny_sdxl.unet, [store]) as hub:
        latents = ddim_sample(tiny_sdxl, cond, z, uncond, num_steps=2, guidance_scale=5.0, hub=hub)
    assert latents.shape == z.shape and torch.isfinite(latents).all()
    assert len(added) == 2
    assert torch.equal(added[0]["text_embeds"], torch.cat([uncond.pooled, uncond.pooled, cond.pooled]))
    assert added[0]["time_ids"].shape == (4, 6)

    n_cross = sum(name.endswith("attn2.processor") for name in tiny_sdxl.unet.attn_processors)
    assert n_cross == 11 and len(store.maps) == n_cross
    for place, maps in store.maps.items():
        assert len(maps) == 2 and store.counts[place] == 2
        for m in maps:
            h, w = store.hw[place]
            assert m.shape == (2, h * w, 77)
            torch.testing.assert_close(m.sum(-1), torch.ones(2, h * w), atol=1e-5, rtol=0)
    assert store.average(resolution=16).shape == (2, 16, 16, 77)

    t = torch.tensor(501)
    with torch.no_grad():
        guided = guided_epsilon(tiny_sdxl, z, t, cond, uncond, 5.0)
        eps_u, eps_c = tiny_sdxl.predict(z, t, uncond.expand(2)), tiny_sdxl.predict(z, t, cond)
    handle.remove()
    torch.testing.assert_close(guided, eps_u + 5.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
