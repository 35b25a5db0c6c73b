"""Personalized residuals: targets and ranks (the SD1.4 parameter count), initialisation, which
parameters train, LAG on the tiny model (base output outside the mask, residual output inside, no
extra UNet calls), the exported file in diffusers, train.py and evaluate.py end to end."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from diffusion.backbone import load_backbone
from diffusion.lora import lora_disabled
from diffusion.random_models import UNETS
from diffusion.residuals import (ADAPTER, ResidualSampler, add_residuals, concept_selection, load_residuals,
                                 target_layers)
from diffusion.sampling import generate
from lightning_modules.residuals import ResidualModule
from tests.test_evaluation import run_evaluate
from tests.test_train import run_train
from utils.errors import ConfigError

PROMPTS = ["a photo of a <v> cat", "a red <v> cat on the beach"]


def meta_unet(arch: str = "sd15") -> UNet2DConditionModel:
    with torch.device("meta"):  # the architecture without its 3.4 GB of weights
        return UNet2DConditionModel(**UNETS[arch])


# ----- targets, ranks, initialisation --------------------------------------------------------------
def test_sd14_proj_out_residuals_have_the_papers_parameter_count():
    """Sec. 4.1: r_i = 0.05 m_i on the 16 proj_out layers of SD1.4 totals about 1.2M parameters."""
    with torch.device("meta"):
        unet = meta_unet()
        params, ranks = add_residuals(unet, "proj_out")
    count = sum(p.numel() for p in params)
    print(f"SD1.4 proj_out residuals: {count} parameters")
    assert len(ranks) == 16 and sorted(set(ranks.values())) == [16, 32, 64]  # m_i = 320, 640, 1280
    assert count == sum(2 * m * round(0.05 * m) for m in [320] * 5 + [640] * 5 + [1280] * 6) == 1_239_040
    assert abs(count - 1.2e6) / 1.2e6 < 0.10


@pytest.mark.parametrize("targets, layers, suffixes", [
    ("kv", 32, {"to_k", "to_v"}), ("proj_in", 16, {"proj_in"}), ("kv+proj_out", 48, {"to_k", "to_v", "proj_out"}),
    ("kv+proj_in+proj_out", 64, {"to_k", "to_v", "proj_in", "proj_out"}),
])
def test_targets_of_table_3(targets, layers, suffixes):
    chosen = target_layers(meta_unet(), targets)
    assert len(chosen) == layers and {n.rsplit(".", 1)[-1] for n in chosen} == suffixes
    assert all("attn2" in n for n in chosen if n.endswith(("to_k", "to_v")))  # cross-attention K/V only


def test_bad_targets_and_ranks_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="target 'to_q' is unknown"):
        add_residuals(tiny.unet, "proj_out+to_q")
    with pytest.raises(ConfigError, match="rank_ratio=0 must be in"):
        add_residuals(tiny.unet, "proj_out", rank_ratio=0)
    with pytest.raises(ConfigError, match="module.init='ones' is unknown"):
        add_residuals(tiny.unet, "proj_out", init="ones")


@pytest.mark.parametrize("kind", ["sd", "sd2"])  # proj_out: 1x1 conv on SD1.x, linear on SD2.x
def test_fixed_rank_and_layer_types(tiny_dirs, kind):
    backbone = load_backbone(str(tiny_dirs[kind]))
    params, ranks = add_residuals(backbone.unet, "proj_out", rank=2)
    assert set(ranks.values()) == {2} and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    base = {n: type(m.base_layer) for n, m in backbone.unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(base) == set(ranks)
    assert set(base.values()) == {torch.nn.Conv2d if kind == "sd" else torch.nn.Linear}


def test_random_init_is_seeded_and_zero_init_starts_at_the_base_model(tiny_dir):
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    outs = {}
    for name, init, seed in (("base", None, 0), ("zero", "zero", 0), ("a", "random", 0), ("b", "random", 0),
                             ("c", "random", 1)):
        backbone = load_backbone(str(tiny_dir))
        if init:
            add_residuals(backbone.unet, "proj_out", init=init, seed=seed)
        with torch.no_grad():
            outs[name] = backbone.predict(x, t, backbone.encode_prompt(["a photo of a cat"]))
    assert torch.equal(outs["zero"], outs["base"])
    assert torch.equal(outs["a"], outs["b"]) and not torch.allclose(outs["a"], outs["c"])
    assert not torch.allclose(outs["a"], outs["base"], atol=1e-3)  # Sec. 4.1: both matrices random


# ----- the module ----------------------------------------------------------------------------------
def residual_module(tiny_dir, **kwargs) -> ResidualModule:
    module = ResidualModule({"path": str(tiny_dir)}, optimizer=torch.optim.AdamW,
                            token={"name": "<v>", "initializer": kwargs.pop("initializer", None),
                                   "train": kwargs.pop("train_token", False)}, class_word="cat", **kwargs)
    module.configure_model()
    return module


@pytest.mark.parametrize("train_token", [False, True])
def test_only_the_residuals_train_and_the_token_when_asked(tiny_dir, train_token):
    module = residual_module(tiny_dir, train_token=train_token)
    unet = module.backbone.unet
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    token_row = module.tokens.rows[0].rows.detach().clone()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    loss = module.diffusion_loss(torch.rand(2, 3, 64, 64) * 2 - 1, [PROMPTS[0]] * 2, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(f".{ADAPTER}." in n for n in grads if "tokens" not in n)
    assert any("tokens" in n for n in grads) == train_token
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    assert torch.equal(module.tokens.rows[0].rows.detach(), token_row) != train_token
    assert module.residual_parameter_count() == sum(p.numel() for n, p in unet.named_parameters()
                                                    if f".{ADAPTER}." in n)


def test_prior_images_add_their_loss(tiny_dir, image_folder):
    from lightning_modules.base import LossBatch

    module = residual_module(tiny_dir, prior={"images_dir": str(image_folder / "images"), "weight": 0.5})
    assert len(module.prior) == 4 and module.prior.prompt == "a photo of a cat"
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "prompt": [PROMPTS[0]] * 2}
    module.log = lambda *args, **kwargs: None
    calls = []
    predict = module.backbone.predict
    module.backbone.predict = lambda latents, *args, **kwargs: calls.append(len(latents)) or predict(latents, *args,
                                                                                                      **kwargs)
    total = module.training_step(batch, 0)
    assert calls == [4]  # concept and class images in one UNet call
    concept = module.diffusion_loss(batch["pixel_values"], batch["prompt"])
    pixels, prompts = module.prior.draw(2, module.step_generator(offset=1), module.device)
    prior = module.diffusion_loss(pixels, prompts, module.step_generator(offset=2))
    torch.testing.assert_close(total, concept + 0.5 * prior)
    # images of another size: a call each, the same losses
    small = torch.rand(2, 3, 32, 32) * 2 - 1
    calls.clear()
    losses = module.diffusion_losses([LossBatch(batch["pixel_values"], batch["prompt"]),
                                      LossBatch(small, prompts, module.step_generator(offset=2))])
    assert calls == [2, 2]
    torch.testing.assert_close(losses[0], concept)
    torch.testing.assert_close(losses[1], module.diffusion_loss(small, prompts, module.step_generator(offset=2)))
    # the picks follow the generator's seed (drawn on the host, whatever the generator's device)
    draws = [module.prior.draw(8, torch.Generator().manual_seed(seed), "cpu")[0] for seed in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert all(any(torch.equal(image, known) for known in module.prior.images) for image in draws[2])


# ----- LAG ------------------------------------------------------------------------------------------
def concept_positions(backbone, prompt: str) -> list[int]:
    tokenizer = backbone.tokenizers[0]
    wanted = tokenizer("<v> cat", add_special_tokens=False).input_ids
    assert len(wanted) == 2
    return [k for k, i in enumerate(backbone.tokenize([prompt])[0].tolist()) if i in wanted]


def test_concept_selection_marks_the_token_and_the_class_word(tiny_dir):
    module = residual_module(tiny_dir)
    selection = concept_selection(module.backbone.tokenizers[0], PROMPTS, module.token_ids(), "cat")
    assert selection.shape == (2, 77)
    for row, prompt in zip(selection, PROMPTS):
        assert row.nonzero().flatten().tolist() == concept_positions(module.backbone, prompt)
    with pytest.raises(ConfigError, match="names neither the concept token nor its class word"):
        concept_selection(module.backbone.tokenizers[0], ["a photo of a dog"], module.token_ids(), "cat")


@pytest.mark.parametrize("kind", ["sd", "sd2"])
def test_lag_is_the_base_output_outside_the_mask_and_the_residual_output_inside(tiny_dirs, kind):
    """eq. (3) at every proj_out: (1 - M) W x + M (W + dW) x, M the median split of V* + class attention."""
    module = residual_module(tiny_dirs[kind])
    backbone, unet = module.backbone, module.backbone.unet
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in layers.items()]
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = backbone.encode_prompt(PROMPTS)
    with torch.no_grad(), module.sampler.applied(PROMPTS, lag=True) as hub:
        token_mask = hub.controllers[0]
        lag = backbone.predict(x, torch.tensor([500]), cond)
        masks = {n: token_mask.mask_for(n.rsplit(".", 1)[0]) for n in layers}
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = backbone.predict(x, torch.tensor([500]), cond)
    assert len(seen) == 7 and not torch.allclose(lag, plain, atol=1e-5)
    for name, (inp, out) in seen.items():
        layer = layers[name]
        with torch.no_grad():
            base, residual = layer.base_layer(inp), layer(inp)  # after the block: the residual everywhere
        mask = masks[name]
        on = (mask if out.ndim == 4 else mask.flatten(2).transpose(1, 2)).bool().expand_as(out)
        assert mask.flatten(1).mean(1).tolist() == [0.5, 0.5]  # binarised at the median
        assert not torch.allclose(base, residual)
        assert torch.equal(out[~on], base[~on]) and torch.equal(out[on], residual[on])


def test_lag_reads_each_block_at_its_last_transformer_layer_alone(tiny_dirs):
    """An SDXL block stacks transformer layers and LAG's mask is its last layer's map: the key sums are read at
    that layer alone, one read per block, and the masks are those of reading every layer."""
    module = residual_module(tiny_dirs["sdxl"])
    backbone = module.backbone
    cond = backbone.encode_prompt(PROMPTS)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reads, masks = {}, {}
    with torch.no_grad(), module.sampler.applied(PROMPTS, lag=True) as hub:
        token_mask = hub.controllers[0]
        read = token_mask.read
        for every_layer in (False, True):
            token_mask.layers = None if every_layer else token_mask.layers
            reads[every_layer] = []
            token_mask.read = lambda sums, call, seen=reads[every_layer]: (seen.append(call.place.name),
                                                                           read(sums, call))
            backbone.predict(x, torch.tensor([500]), cond)
            masks[every_layer] = dict(token_mask.masks)
    blocks = {name.split(".transformer_blocks.")[0] for name in reads[True]}
    assert len(reads[False]) == len(blocks) < len(reads[True])  # tiny SDXL: a block of 2 layers
    assert masks[False].keys() == masks[True].keys() == blocks
    assert all(torch.equal(masks[False][b], masks[True][b]) for b in blocks)


def test_lag_sampling_costs_no_extra_unet_calls_and_strength_zero_is_the_base_model(tiny_dir):
    module = residual_module(tiny_dir)
    backbone = module.backbone
    calls = []
    handle = backbone.unet.register_forward_hook(lambda *args: calls.append(1))
    images = {}
    for lag in (False, True):
        calls.clear()
        images[lag] = module.sample(PROMPTS, [0, 1], {"lag": lag}, num_steps=3)
        assert len(calls) == 3  # one batched (CFG) call per step either way
    zero = module.sample(PROMPTS, [0, 1], {"strength": 0.0}, num_steps=3)
    handle.remove()
    with lora_disabled(backbone.unet):
        base = generate(backbone, PROMPTS, seed=[0, 1], num_steps=3)
    torch.testing.assert_close(zero, base)
    assert not torch.allclose(images[False], images[True])
    with pytest.raises(ConfigError, match="no sampling setting"):
        module.sample(PROMPTS, [0, 1], {"eta": 1.0}, num_steps=2)


# ----- end to end -------------------------------------------------------------------------------------
@pytest.fixture
def residual_run(tiny_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    run_train("method=residuals", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
              f"data.images_dir={image_folder / 'images'}", "module.class_word=cat", "trainer.max_steps=3",
              "data.batch_size=2", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run}")
    return run


def test_residual_run_exports_lora_that_diffusers_loads(residual_run, tiny_dir):
    from diffusers import StableDiffusionPipeline

    info = json.loads((residual_run / "residuals.json").read_text())
    assert info["method"] == "residuals" and info["targets"] == "proj_out" and info["class_word"] == "cat"
    weights = load_file(residual_run / "pytorch_lora_weights.safetensors")
    assert info["parameters"] == sum(v.numel() for v in weights.values()) > 0
    assert len(weights) == 2 * len(info["ranks"]) and all(".proj_out.lora_" in k for k in weights)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(residual_run / "learned_embeds.safetensors"))
    pipe.load_lora_weights(str(residual_run), weight_name="pytorch_lora_weights.safetensors")
    backbone = load_backbone(str(tiny_dir))
    sampler, concept = load_residuals(backbone, residual_run)
    assert concept == "<v> cat" and isinstance(sampler, ResidualSampler)
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    with torch.no_grad():
        ours = backbone.predict(x, t, backbone.encode_prompt(["a photo of a <v> cat"]))
        ids = pipe.tokenizer(["a photo of a <v> cat"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        theirs = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_evaluate_sweeps_lag_on_a_residual_run(residual_run, tiny_dir, tmp_path):
    out = tmp_path / "eval"
    run_evaluate("model=tiny", f"model.path={tiny_dir}", f"artifact={residual_run}", "metrics=none",
                 "prompts=['a photo of a {}']", "seeds=[0]", "num_steps=2", "sweep={lag:[false,true]}",
                 f"hydra.run.dir={out}")
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["lag"] for s in samples] == [False, True] and samples[0]["prompt"] == "a photo of a <v> cat"


@pytest.mark.parametrize("overrides, message", [
    (["strength=[1,2]"], "strength of a residuals run is one number"),
    (["sweep={eta:[0,1]}"], "sweep.eta is not a sampling setting here"),
])
def test_evaluate_bad_residual_settings_are_one_line(residual_run, tiny_dir, tmp_path, overrides, message):
    proc = run_evaluate("model=tiny", f"model.path={tiny_dir}", f"artifact={residual_run}", "metrics=none",
                        *overrides, f"hydra.run.dir={tmp_path / 'eval'}", expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


def test_evaluate_lag_needs_a_residual_run(tiny_dir, tmp_path):
    proc = run_evaluate("model=tiny", f"model.path={tiny_dir}", "metrics=none", "lag=true",
                        f"hydra.run.dir={tmp_path / 'eval'}", expect_ok=False)
    assert proc.returncode == 2 and "lag=true but no artifact is a residuals run" in proc.stderr
