"""GPU checks (skipped without CUDA): bf16 frozen weights with fp32 trained rows, CUDA determinism."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import lightning as L
import pytest
import torch

from tests.test_train import base, run_train  # noqa: F401 (base is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_textual_inversion_trains_in_bf16_on_gpu(base, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run_train(*[o for o in base if o != "trainer=cpu"], "trainer=gpu", "trainer.max_steps=10", f"hydra.run.dir={run}")
    rows = load_file(run / "learned_embeds.safetensors")["<concept>"]
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    timing = (run / "timing.json").read_text()
    assert "bf16-mixed" in timing and "peak_memory_gib" in timing


def test_the_default_fast_path_learns_what_eager_learns(base, tiny, tmp_path):
    """fast_unet's default (auto: CUDA graphs of the frozen UNet) against eager: the same token, within bf16."""
    from safetensors.torch import load_file

    def rows(mode: str):
        run = tmp_path / mode
        proc = run_train(*[o for o in base if o != "trainer=cpu"], "trainer=gpu", "trainer.max_steps=20",
                         f"callbacks.fast_unet.mode={mode}", f"hydra.run.dir={run}")
        return load_file(run / "learned_embeds.safetensors")["<concept>"], proc.stdout + proc.stderr

    eager, eager_log = rows("null")
    fast, fast_log = rows("auto")
    assert "fast UNet: cuda_graphs (auto)" in fast_log and "fast UNet" not in eager_log
    word = tiny.tokenizers[0]("object", add_special_tokens=False).input_ids  # conf/model/tiny.yaml's initializer
    init = tiny.text_encoders[0].get_input_embeddings().weight[word].detach().float()
    moved = (eager - init).abs().mean()
    assert moved > 0 and (fast - eager).abs().mean() < 0.1 * moved


def test_module_keeps_frozen_bf16_and_trained_fp32(tiny_dir):
    import lightning as L

    from lightning_modules.textual_inversion import TextualInversionModule

    module = TextualInversionModule({"path": str(tiny_dir)}, {"name": "<t>", "initializer": "cat"},
                                    optimizer=torch.optim.AdamW)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                        enable_checkpointing=False)
    module.trainer = trainer
    module.configure_model()
    assert module.backbone.unet.dtype == torch.bfloat16
    assert module.backbone.text_encoders[0].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())


def test_cuda_sampling_is_deterministic(tiny):
    from diffusion.sampling import generate

    tiny.to("cuda")
    a = generate(tiny, ["a red cat", "a dog"], seed=[3, 4], num_steps=4)
    b = generate(tiny, ["a red cat", "a dog"], seed=[3, 4], num_steps=4)
    assert torch.equal(a, b) and a.is_cuda


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_unet_graphs_replay_the_eager_unet_and_its_input_gradients(model, request):
    from diffusion.backbone import Conditioning
    from diffusion.cuda_graphs import UNetGraphs

    backbone = request.getfixturevalue(model).to("cuda")
    cond = backbone.encode_prompt(["a red cat", "a dog"])
    t = torch.tensor([10, 700], device="cuda")
    size = backbone.unet.config.sample_size
    g = torch.Generator("cuda").manual_seed(0)

    def run(x, hidden):  # output, and d(loss)/d(text states) when they need it
        out = backbone.predict(x, t, Conditioning(hidden, cond.pooled, cond.time_ids))
        if not hidden.requires_grad:
            return out, None
        return out, torch.autograd.grad((out.float() ** 2).mean(), hidden)[0]

    xs = [torch.randn(2, 4, size, size, generator=g, device="cuda") for _ in range(3)]
    hidden = cond.hidden_states.detach().requires_grad_()
    eager = [run(x, hidden) for x in xs]
    with torch.no_grad():
        eager_frozen = [run(x, cond.hidden_states)[0] for x in xs]
    backbone.unet_graphs = UNetGraphs(backbone.unet)
    for x, (out, grad), frozen in zip(xs, eager, eager_frozen):  # the first call captures, the next replay
        graphed_out, graphed_grad = run(x, hidden)
        torch.testing.assert_close(graphed_out, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(graphed_grad, grad, rtol=1e-4, atol=1e-7)
        with torch.no_grad():
            torch.testing.assert_close(run(x, cond.hidden_states)[0], frozen, rtol=1e-4, atol=1e-5)
    assert len(backbone.unet_graphs.graphs) == 2  # with and without gradients


def test_unet_graphs_train_lora_residuals_as_eager_does(tiny, caplog):
    """Training graphs of a UNet whose LoRA residuals train: the output and the residuals' gradients match eager,
    and so do a few SGD steps (linear in the gradients: Adam's first steps would amplify rounding); another residual
    scale captures its own graph; calls without gradients run eager."""
    import logging

    from diffusion.cuda_graphs import UNetGraphs
    from diffusion.lora import set_lora_scale
    from diffusion.residuals import ADAPTER, add_residuals

    tiny.to("cuda")
    params, _ = add_residuals(tiny.unet)
    cond = tiny.encode_prompt(["a red cat", "a dog"])
    size = tiny.unet.config.sample_size
    g = torch.Generator("cuda").manual_seed(0)
    batches = [(torch.randn(2, 4, size, size, generator=g, device="cuda"), torch.tensor([10, 700], device="cuda"))
               for _ in range(3)]
    start = [p.detach().clone() for p in params]

    def train(graphs: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        optimizer = torch.optim.SGD(params, lr=1e-2)
        tiny.unet_graphs = UNetGraphs(tiny.unet) if graphs else None
        outs, first_grads = [], []
        for x, t in batches:
            out = tiny.predict(x, t, cond)
            optimizer.zero_grad(set_to_none=True)
            (out.float() ** 2).mean().backward()
            first_grads = first_grads or [p.grad.clone() for p in params]
            optimizer.step()
            outs.append(out.detach())
        return outs, first_grads, [p.detach().clone() for p in params]

    eager = train(False)
    caplog.set_level(logging.INFO, logger="diffusion.cuda_graphs")
    graphed = train(True)
    assert caplog.text.count("captured:") == 1

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:  # largest difference against the eager tensor's scale
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    gaps = {"outputs": [gap(a, b) for a, b in zip(graphed[0], eager[0])],
            "first gradients": [gap(a, b) for a, b in zip(graphed[1], eager[1])],
            "trained": [gap(a, b) for a, b in zip(graphed[2], eager[2])]}
    assert all(g < 1e-3 for values in gaps.values() for g in values), gaps
    assert any(g.abs().sum() > 0 for g in graphed[1])
    x, t = batches[0]
    with torch.no_grad():
        tiny.predict(x, t, cond)
    set_lora_scale(tiny.unet, 0.5, ADAPTER)
    out = tiny.predict(x, t, cond)
    tiny.unet_graphs = None
    torch.testing.assert_close(out, tiny.predict(x, t, cond), rtol=1e-4, atol=1e-5)
    assert caplog.text.count("captured:") == 2  # the no-grad call ran eager; scale 0.5 has its own graph


def test_unet_graphs_leave_recording_attention_eager(tiny):
    from diffusion.attention import AttentionHub
    from diffusion.cuda_graphs import UNetGraphs

    tiny.to("cuda")
    cond = tiny.encode_prompt(["a red cat"])
    x = torch.randn(1, 4, tiny.unet.config.sample_size, tiny.unet.config.sample_size, device="cuda")
    tiny.unet_graphs = UNetGraphs(tiny.unet)
    hub = AttentionHub(tiny.unet)
    with torch.no_grad():
        tiny.predict(x, 500, cond)
    assert not tiny.unet_graphs.graphs
    hub.restore()
    with torch.no_grad():
        tiny.predict(x, 500, cond)
    assert len(tiny.unet_graphs.graphs) == 1


def test_lag_masks_read_from_the_fused_kernel_in_bf16(tiny):
    """LAG's TokenMask alone on CUDA in bf16: the fused call with the tokens as values runs (its value width differs
    from the keys'), the UNet's output is the plain one, and the masks are those read from the probabilities
    up to bf16 ties at the median."""
    from diffusion.attention import AttentionHub, AttentionStore, TokenMask
    from diffusion.backbone import Conditioning

    tiny.to("cuda", torch.bfloat16)
    cond = Conditioning.cat([tiny.encode_prompt(["", ""]), tiny.encode_prompt(["a photo of a cat", "a red dog"])])
    side = tiny.unet.config.sample_size
    x = torch.randn(2, 4, side, side, device="cuda", dtype=torch.bfloat16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        plain = tiny.predict(x, 500, cond)
        alone, beside = TokenMask([5]), TokenMask([5])
        with AttentionHub(tiny.unet, [alone]) as hub, hub.sampling_state(cfg=True):
            fused = tiny.predict(x, 500, cond)
        with AttentionHub(tiny.unet, [beside, AttentionStore()]) as hub, hub.sampling_state(cfg=True):
            tiny.predict(x, 500, cond)
    assert torch.equal(fused, plain) and len(alone.masks) == 7
    for block, mask in alone.masks.items():
        assert mask.dtype == torch.bfloat16 and (mask != beside.masks[block]).float().mean() < 0.05


def test_sampling_replays_graphs_of_the_residuals_and_lag_as_eager_runs_them(tiny, caplog):
    """One sampling loop captures the UNet once with its residual adapter (and LAG's masks and hooks) and replays
    it: the latents, and LAG's last masks, are eager's within bf16."""
    import logging

    from diffusion.residuals import ResidualSampler, add_residuals, lora_b_modules
    from diffusion.sampling import ddim_sample, initial_noise

    add_residuals(tiny.unet)
    tiny.to("cuda", torch.bfloat16)
    with torch.no_grad():
        for b in lora_b_modules(tiny.unet).values():
            b.weight.normal_(0.0, 0.05, generator=torch.Generator("cuda").manual_seed(0))  # a residual that shows
    prompts = ["a photo of a cat", "a cat on the beach"]
    sampler = ResidualSampler(tiny, tiny.tokenizers[0]("cat", add_special_tokens=False).input_ids, "cat")
    cond, uncond = tiny.encode_prompt(prompts), tiny.encode_prompt([""])
    noise = initial_noise(tiny, 2, torch.Generator().manual_seed(0), device="cpu").to("cuda")
    for lag in (False, True):
        latents, masks = {}, {}
        for graphs in (False, True):
            caplog.clear()
            with sampler.applied(prompts, lag=lag) as hub, \
                    caplog.at_level(logging.DEBUG, logger="diffusion.cuda_graphs"):
                latents[graphs] = ddim_sample(tiny, cond, noise, uncond, 5, 7.5, hub=hub, cuda_graphs=graphs)
                masks[graphs] = dict(hub.controllers[0].masks) if lag else {}
            assert caplog.text.count("captured:") == int(graphs) and tiny.unet_graphs is None
        torch.testing.assert_close(latents[True], latents[False], rtol=2e-2, atol=2e-2)
        for block, mask in masks[False].items():
            assert (mask != masks[True][block]).float().mean() < 0.02


def test_null_text_inversion_replays_graphs_and_fits_what_eager_fits(tiny, caplog):
    import logging

    from diffusion.inversion import null_text_inversion
    from diffusion.sampling import ddim_invert, ddim_sample, initial_noise

    tiny.to("cuda")
    cond = tiny.encode_prompt(["a red cat"])
    noise = initial_noise(tiny, 1, torch.Generator().manual_seed(0), device="cpu").to("cuda")
    trajectory = ddim_invert(tiny, ddim_sample(tiny, cond, noise, num_steps=4, guidance_scale=1.0), cond, 4)
    settings = dict(guidance_scale=7.5, inner_steps=3, lr=0.1, early_stop=0.0, early_stop_growth=0.0)
    eager = null_text_inversion(tiny, trajectory, cond, 4, cuda_graphs=False, **settings)
    with caplog.at_level(logging.INFO, logger="diffusion.cuda_graphs"):
        graphed = null_text_inversion(tiny, trajectory, cond, 4, **settings)
    assert "captured:" in caplog.text and tiny.unet_graphs is None  # graphs were on inside, freed after
    assert graphed.iterations == eager.iterations == [3] * 4
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=2e-2, atol=1e-6)
    start = tiny.encode_prompt([""]).hidden_states
    for a, b in zip(graphed.embeddings, eager.embeddings):
        # Adam's steps are about lr (0.1) whatever the gradient's size: where a gradient is near zero, rounding
        # picks the direction, so some elements differ by a step or two; on average the two agree to a small
        # fraction of how far the embedding moved (measured 0.9e-3 to 2.3e-3 against moves of 0.24 to 0.61)
        moved = (b.hidden_states - start).abs().mean()
        gap = (a.hidden_states - b.hidden_states).abs().mean()
        assert gap < 0.03 * moved, (gap.item(), moved.item())


@contextlib.contextmanager
def host_waits() -> Iterator[list[tuple[str, int]]]:
    """(file, line) of each call inside that made the host wait for the GPU (CUDA's sync debug mode), filled on
    exit."""
    waits: list[tuple[str, int]] = []
    torch.cuda.set_sync_debug_mode("warn")  # outside the record: the first call warns that the mode is on
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield waits
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits.extend((w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message))


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_encoding_a_prompt_seen_before_never_waits_for_the_gpu(model, request):
    """Training steps encode their trained prompts every step: token ids and SDXL's size ids come from caches
    on the device, so the host queues the text encoders without draining the GPU's queue first."""
    backbone = request.getfixturevalue(model).to("cuda")
    first = backbone.encode_prompt(["a red cat", "a dog"])
    with host_waits() as waits:
        again = backbone.encode_prompt(["a red cat", "a dog"])
    assert not waits
    torch.testing.assert_close(again.hidden_states, first.hidden_states)
    if first.time_ids is not None:
        assert again.time_ids.tolist() == [[backbone.resolution] * 2 + [0, 0] + [backbone.resolution] * 2] * 2


def test_a_checkpointing_unet_replays_only_its_calls_without_gradients(tiny_dir):
    """Gradient checkpointing recomputes blocks in the backward, which a graph's capture cannot hold: calls with
    gradients run eager (and give the same gradients), calls without replay a graph."""
    from diffusion.backbone import load_backbone
    from diffusion.cuda_graphs import UNetGraphs

    backbone = load_backbone(str(tiny_dir), gradient_checkpointing=True).to("cuda")
    graphs = UNetGraphs(backbone.unet)
    cond = backbone.encode_prompt(["a red cat"])
    size = backbone.unet.config.sample_size
    x, t = torch.randn(1, 4, size, size, device="cuda"), torch.tensor([500], device="cuda")
    with torch.no_grad():
        replayed = graphs(x, t, cond.hidden_states)
        eager = backbone.unet(x, t, encoder_hidden_states=cond.hidden_states).sample
    grads = []
    for call in (graphs, lambda *a: backbone.unet(a[0], a[1], encoder_hidden_states=a[2]).sample):
        states = cond.hidden_states.clone().requires_grad_(True)
        call(x, t, states).square().mean().backward()
        grads.append(states.grad)
    assert [key[0] for key in graphs.graphs] == [False]  # one graph, of the call without gradients
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1])


def test_inversion_and_sampling_loops_never_wait_for_the_gpu(tiny):
    """Inside null-text inversion and DDIM sampling, schedules' set-up included, nothing copies to or from the
    host in a way that drains the GPU's queue (each such copy stalls a launch-bound batch-1 loop)."""
    from diffusion.inversion import null_text_inversion
    from diffusion.sampling import ddim_invert, ddim_sample, initial_noise

    tiny.to("cuda")
    cond, uncond = tiny.encode_prompt(["a red cat"]), tiny.encode_prompt([""])
    noise = initial_noise(tiny, 1, torch.Generator().manual_seed(0), device="cpu").to("cuda")
    trajectory = ddim_invert(tiny, ddim_sample(tiny, cond, noise, num_steps=4, guidance_scale=1.0), cond, 4)
    with host_waits() as waits:
        schedule = null_text_inversion(tiny, trajectory, cond, 4, inner_steps=3, early_stop=0.0,
                                       early_stop_growth=0.0, uncond=uncond)
        ddim_sample(tiny, cond, trajectory[-1], schedule, num_steps=4)
    assert schedule.iterations == [3] * 4 and not waits, waits


class WaitsPerBatch(L.Callback):
    """Records host waits batch by batch (first in the trainer's list): each batch's record runs from its start
    to the next batch's, so the loggers, the progress bar and the callbacks around a step count in it."""

    def __init__(self, batches: range):
        self.batches = batches
        self.waits: dict[int, list[tuple[str, int]]] = {}
        self._open = contextlib.ExitStack()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._open.close()
        if batch_idx in self.batches:
            self.waits[batch_idx] = self._open.enter_context(host_waits())

    def on_train_end(self, trainer, pl_module):
        self._open.close()


@pytest.mark.parametrize("method,kind", [("textual_inversion", "sd"), ("prompt_slider", "sdxl"),
                                         ("concept_slider", "sd"), ("residuals", "sd"), ("em_mask", "sd"),
                                         ("pretrain", None)])
def test_training_waits_for_the_gpu_only_when_it_reports(method, kind, tiny_dirs, image_folder, tmp_path):
    """With every default callback and a logger, a training step queues its work without draining the GPU's
    queue: only the batch that ends each 10-step interval (the progress bar, the logger and the finite check
    read the device there) may wait. A wait every step would cap the step at host time plus GPU time. (EM's
    first mask round is at step 0, its next at step 50.)"""
    from hydra.utils import instantiate

    from datamodules.shapes.scenes import write_scene_set
    from utils.config import entry_config, instantiate_list

    images = f"data.images_dir={image_folder / 'images'}"
    scenes = write_scene_set(tmp_path / "scenes", count=2, resolution=64) if method == "em_mask" else None
    overrides = {"textual_inversion": [images],
                 "prompt_slider": ["slider=age", "slider.templates.0.resolution=null", "module.pool.size=2",
                                   "module.pool.num_steps=3"],
                 "concept_slider": ["slider=age", "slider.templates.0.resolution=null", "module.denoise_steps=4"],
                 "residuals": [images, "module.class_word=cat", "data.batch_size=2",
                               f"module.prior.images_dir={image_folder / 'images'}"],  # prior preservation too
                 "em_mask": [f"data.scenes_dir={scenes}", "module.em.timesteps=2", "module.em.update_timesteps=2"],
                 "pretrain": ["module.vae_steps=2", "module.warmup=1", "data.batch_size=2", "data.num_workers=0",
                              "module.unet.block_out_channels=[32,32,64]", "module.unet.norm_num_groups=32",
                              "module.text_encoder.num_hidden_layers=1", "trainer.log_every_n_steps=10"]}[method]
    model = [] if kind is None else [f"model={'tiny' if kind == 'sd' else 'sdxl'}", f"model.path={tiny_dirs[kind]}"]
    cfg = entry_config("train", [f"method={method}", *model, "trainer=gpu", "trainer.max_steps=16",
                                 "logger=csv", "callbacks.sample_grid=null", f"paths.output_dir={tmp_path / 'run'}",
                                 *overrides])
    assert cfg.trainer.log_every_n_steps == cfg.callbacks.progress_bar.refresh_rate == 10
    assert cfg.callbacks.non_finite.every_n_steps == 10
    recorder = WaitsPerBatch(range(4, 14))
    trainer = instantiate(cfg.trainer, callbacks=[recorder, *instantiate_list(cfg.callbacks)],
                          logger=instantiate_list(cfg.logger))
    trainer.fit(instantiate(cfg.module), datamodule=instantiate(cfg.data))
    assert sorted(recorder.waits) == list(range(4, 14))
    waited = {batch: waits for batch, waits in recorder.waits.items() if waits}
    assert set(waited) <= {9}, waited


def test_residuals_train_on_gpu(tiny_dir, image_folder, tmp_path):
    """The residuals' seeded random init draws on the CPU under Lightning's CUDA init context."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run_train("method=residuals", "model=tiny", f"model.path={tiny_dir}", "trainer=gpu", "logger=csv",
              f"data.images_dir={image_folder / 'images'}", "module.class_word=cat", "trainer.max_steps=2",
              "data.batch_size=2", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run}")
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_style_diffusion_fits_replays_and_edits_on_gpu(tiny_dir, tmp_path):
    """An inversion keeps E(x) on the CPU; replay and edit move it to the mapping networks' device."""
    from diffusion.image_encoder import build_random_encoder
    from diffusion.inversion import invert_latents
    from diffusion.style_editing import edit, reconstruct
    from lightning_modules.style_diffusion import StyleDiffusionModule
    from tests.helpers import style_diffusion_settings

    encoder = build_random_encoder(tmp_path / "clip-tiny", size="tiny")
    module = StyleDiffusionModule({"path": str(tiny_dir)}, {"path": str(encoder), "build": None}, num_steps=2,
                                  **style_diffusion_settings(inner={"K": 2, "schedule": "paper"}))
    module.configure_model()
    module.to("cuda")
    backbone = module.backbone
    z0 = torch.randn(1, 4, 32, 32, device="cuda")
    trajectory = invert_latents(backbone, z0, "a red cat", 2)
    inversion = module.fit_image(torch.rand(1, 3, 64, 64, device="cuda") * 2 - 1, "a red cat", trajectory)
    assert inversion.features.device.type == "cpu"
    replay = reconstruct(backbone, module.attention_hub(), inversion)
    edited = edit(backbone, module.attention_hub(), inversion, ["a red dog"])
    assert replay.is_cuda and edited.is_cuda and edited.shape == (2, 4, 32, 32)


def test_the_value_branch_replays_its_output_maps_and_value_gradient(tiny):
    """Algorithm 1's conditional branch from CUDA graphs gives the eager epsilon, 16x16 maps and gradient to the
    values, call after call (the first captures), with gradients and without."""
    from diffusion.attention import AttentionHub
    from diffusion.style_inversion import ValueBranch

    tiny.to("cuda")
    cond = tiny.encode_prompt(["a red cat"])
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda")
    t = torch.tensor(500, device="cuda")
    with AttentionHub(tiny.unet) as hub:
        eager, graphed = (ValueBranch(tiny, hub, ("down", "up"), 16, cuda_graphs=on) for on in (False, True))
        assert eager.graphs is None and graphed.graphs is not None
        for seed in range(3):
            values = torch.randn(cond.hidden_states.shape, generator=torch.Generator().manual_seed(seed)).to("cuda")
            results = []
            for branch in (eager, graphed):
                v = values.clone().requires_grad_()
                eps, maps = branch(x, t, cond, v)
                grad, = torch.autograd.grad(eps.square().mean() + maps.square().mean(), v)
                with torch.no_grad():
                    frozen = branch(x, t, cond, values)[0]
                results.append((eps.detach(), maps.detach(), grad, frozen))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
        assert len(graphed.graphs.graphs) == 2  # with and without gradients


def test_style_diffusion_replays_graphs_and_fits_what_eager_fits(tiny_dir, tmp_path, caplog):
    """Algorithm 1 through the module replays two graphs (the conditional branch with its backward to the values,
    and the no-grad calls) and takes the eager run's iterations and losses. (The trained weights are not compared:
    Adam moves each weight by about lr whatever the gradient's size, so rounding decides the direction wherever a
    gradient is near zero; test_the_value_branch_replays_its_output_maps_and_value_gradient checks the gradients.)"""
    import logging

    from diffusion.image_encoder import build_random_encoder
    from diffusion.inversion import invert_latents
    from lightning_modules.style_diffusion import StyleDiffusionModule
    from tests.helpers import style_diffusion_settings

    encoder = build_random_encoder(tmp_path / "clip-tiny", size="tiny")
    settings = style_diffusion_settings(inner={"K": 4, "schedule": "paper"}, adam={"preset": "code"},
                                        early_stop=0.0, early_stop_growth=0.0)
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to("cuda")
    pixels = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1).to("cuda")
    fits = {}
    for graphs in (False, True):
        module = StyleDiffusionModule({"path": str(tiny_dir)}, {"path": str(encoder), "build": None}, num_steps=3,
                                      cuda_graphs=graphs, **settings)
        module.configure_model()
        module.to("cuda")
        trajectory = invert_latents(module.backbone, z0, "a red cat", 3)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="diffusion.cuda_graphs"):
            inversion = module.fit_image(pixels, "a red cat", trajectory,
                                         generator=torch.Generator("cuda").manual_seed(0))
        assert caplog.text.count("StyleDiffusion graph") == 2 * graphs
        fits[graphs] = inversion
    assert fits[True].iterations == fits[False].iterations == [4, 2, 1]
    torch.testing.assert_close(torch.tensor(fits[True].losses), torch.tensor(fits[False].losses), rtol=5e-2, atol=1e-5)


def test_token_pixel_loss_runs_under_cuda_autocast():
    """CUDA autocast refuses binary_cross_entropy; the pretraining's pixel loss runs under bf16-mixed."""
    from diffusion.losses import token_pixel_loss

    maps = torch.rand(2, 16, 5, device="cuda").softmax(-1)
    regions = (torch.rand(2, 3, 16, device="cuda") > 0.5).float()
    roles = torch.tensor([[0, 1, -1, 2, -1], [2, -1, -1, 0, 1]], device="cuda")
    plain = token_pixel_loss(maps, regions, roles)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = token_pixel_loss(maps.bfloat16(), regions, roles)
    assert mixed.dtype == torch.float32 and abs(mixed.item() - plain.item()) < 0.02
