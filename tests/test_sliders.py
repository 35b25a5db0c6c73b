"""Prompt Sliders and the Concept Slider baseline: templates, the losses, sampling strengths, artifacts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from datamodules.sliders import SliderPrompts, SliderTemplate, load_templates
from tests.helpers import method_settings, slider_batch
from tests.test_train import ROOT, run_train
from utils.errors import ConfigError

SIZE = {"target": "a {p}", "positive": "a large {p}", "unconditional": "a small {p}", "guidance_scale": 2.0,
        "preserve": ["red circle", "blue star"]}


# ----- templates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, key", [
    ({"target": "a person", "postive": "an old person"}, "'postive'"),  # the misspelling the authors shipped
    ({"positive": "an old person"}, "'target'"),
    ({"target": "x", "unconditional": "y", "negative": "z"}, "'negative'"),
    ({"target": "x", "action": "boost"}, "action"),
    ({"target": "x", "preserve": "male"}, "preserve"),
    ({"target": "x", "dynamic_resolution": True}, "dynamic_resolution"),
])
def test_template_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        SliderTemplate.from_dict(raw)


def test_template_defaults_and_preserve_phrases():
    t = SliderTemplate.from_dict({"target": "a photo of a person"})
    assert (t.positive, t.unconditional, t.neutral, t.action, t.guidance_scale) == (
        "a photo of a person", "", "a photo of a person", "enhance", 1.0)
    assert SliderTemplate.from_dict({"target": "x", "negative": "y"}).unconditional == "y"
    size = SliderTemplate.from_dict(SIZE)
    assert size.prompts("red circle") == {"target": "a red circle", "positive": "a large red circle",
                                          "unconditional": "a small red circle", "neutral": "a red circle"}
    age = SliderTemplate.from_dict({"target": "person", "positive": "person, old"})
    assert age.prompts("male")["positive"] == "male person, old"  # Concept Sliders' attribute prefix
    with pytest.raises(ConfigError, match="batch_size"):
        load_templates([{"target": "a", "batch_size": 1}, {"target": "b", "batch_size": 2}])


@pytest.mark.parametrize("slider", sorted(p.stem for p in (ROOT / "conf" / "slider").glob("*.yaml")))
def test_every_shipped_slider_composes_and_validates(slider, tmp_path):
    from hydra.utils import instantiate

    from tests.helpers import compose_cfg

    for method, module in (("prompt_slider", "SliderModule"), ("concept_slider", "ConceptSliderModule")):
        cfg = compose_cfg("train", [f"method={method}", f"slider={slider}"], tmp_path)
        assert cfg.module._target_.endswith(module)
        data = instantiate(cfg.data)
        assert data.templates and data.batch_size == 1
    erase = slider.startswith(("erase", "shapes_erase"))
    assert cfg.slider.token.train_existing is erase
    if erase:  # the erased word is used at strength 1, and trains there
        cfg = compose_cfg("train", ["method=prompt_slider", f"slider={slider}"], tmp_path)
        assert cfg.module.alpha_min == cfg.module.alpha_max == 1.0
        assert all(cfg.slider.token.name in t.target for t in cfg.slider.templates)


def test_prompt_stream_is_a_function_of_the_index():
    stream = SliderPrompts(load_templates([SIZE, {"target": "x", "action": "erase"}]), seed=3)
    items = [stream(k) for k in range(40)]
    assert [stream(k) for k in range(40)] == items
    assert {i["template"] for i in items} == {0, 1}
    assert {i["target"] for i in items if i["template"] == 0} == {"a red circle", "a blue star"}
    assert {i["sign"] for i in items} == {1.0, -1.0}
    from datamodules.sliders import SliderPromptDataModule
    announced = SliderPromptDataModule([SIZE, {"target": "x", "action": "erase"}]).target_prompts()
    assert announced == ["a red circle", "a blue star", "x"] and {i["target"] for i in items} <= set(announced)


def test_latent_pool_is_the_same_in_any_order(tiny):
    from lightning_modules.slider import LatentPool

    one, two = LatentPool(2, 2, 7.5, seed=0), LatentPool(2, 2, 7.5, seed=0)
    one.fill(tiny, ["a dog", "a cat"], None)
    two.fill(tiny, ["a cat"], None)
    two.fill(tiny, ["a dog"], None)
    assert one.latents["a dog"].shape == (2, 4, 32, 32)
    assert torch.equal(one.latents["a dog"], two.latents["a dog"])
    assert not torch.equal(one.latents["a dog"], one.latents["a cat"])


# ----- the module -----------------------------------------------------------------------------------
def slider_module(tiny_dir, **kwargs):
    from lightning_modules.slider import SliderModule

    token = kwargs.pop("token", {"name": "<size>"})
    settings = OmegaConf.merge(method_settings("prompt_slider", "pool", "reference_code"),
                               {k: kwargs.pop(k) for k in ("pool", "reference_code") if k in kwargs})
    module = SliderModule({"path": str(tiny_dir)}, token, optimizer=torch.optim.AdamW,
                          **OmegaConf.to_container(settings), **kwargs)
    module.configure_model()
    return module


def encode_with_row(backbone, tokens, prompt: str, row: torch.Tensor):
    """The prompt's conditioning with the token's table row set to `row` (the hooks off)."""
    weight = backbone.text_encoders[0].get_input_embeddings().weight
    ids = tokens.rows[0].token_ids
    saved = weight[ids].clone()
    with torch.no_grad(), tokens.original():
        weight[ids] = row
        cond = backbone.encode_prompt([prompt])
        weight[ids] = saved
    return cond


@pytest.mark.parametrize("action", ["enhance", "erase"])
def test_textual_loss_is_eq5_by_hand(tiny_dir, monkeypatch, action):
    """The loss equals || eps(z_t, c_t + alpha S) - [eps(c_t) +- alpha eta (eps(c+) - eps(c-))] ||^2, each
    prediction computed on its own, with alpha S put into the embedding table by hand."""
    module = slider_module(tiny_dir)
    backbone = module.backbone
    with torch.no_grad():
        module.tokens.rows[0].rows.normal_(generator=torch.Generator().manual_seed(1))
    template = {**SIZE, "action": action}
    batch = slider_batch(template, "red circle")
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    module.pool.latents["a red circle"] = z0
    monkeypatch.setattr(module, "step_generator", lambda offset=0, device=None: torch.Generator().manual_seed(7))
    loss = module.textual_loss(batch)

    g = torch.Generator().manual_seed(7)
    torch.randint(1, (1,), generator=g)  # the pool index
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    alpha = float(torch.rand(1, generator=g)) * 3.0
    z_t = backbone.scheduler.add_noise(z0, noise, t)
    with torch.no_grad():
        eps = {k: backbone.unet(z_t, t, backbone.encode_prompt([p]).hidden_states).sample
               for k, p in (("n", "a red circle"), ("p", "a large red circle"), ("m", "a small red circle"))}
        sign = 1.0 if action == "enhance" else -1.0
        target = eps["n"] + sign * alpha * 2.0 * (eps["p"] - eps["m"])
        row = module.tokens.rows[0].rows.detach() * alpha
        cond = encode_with_row(backbone, module.tokens, "a red circle <size>", row)
        expected = F.mse_loss(backbone.unet(z_t, t, cond.hidden_states).sample, target)
    assert 0.0 < alpha < 3.0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_gradients_reach_only_the_token_row(tiny_dir):
    module = slider_module(tiny_dir)
    module.pool.size = 1
    module.textual_loss(slider_batch(SIZE, "blue star")).backward()
    trained = [p for p in module.parameters() if p.grad is not None]
    assert trained == [module.tokens.rows[0].rows] and module.tokens.rows[0].rows.grad.abs().sum() > 0


def test_pool_and_reference_code_settings_are_the_yaml_keys():
    """The yaml gives every value of module.pool and module.reference_code; a missing key is one line."""
    from dataclasses import fields

    from lightning_modules.slider import PoolSettings, ReferenceCodeSettings

    yaml = method_settings("prompt_slider", "pool", "reference_code")
    for key, cls in (("pool", PoolSettings), ("reference_code", ReferenceCodeSettings)):
        assert set(yaml[key]) == {f.name for f in fields(cls)} and cls.from_config(yaml[key]).as_dict() == yaml[key]
    with pytest.raises(ConfigError, match=r"^module\.pool is missing size; "):
        PoolSettings.from_config({"num_steps": 25, "guidance_scale": 7.5})


def test_reference_code_variant_trains_without_alpha(tiny_dir, monkeypatch):
    """variant=reference_code: z_t from partial denoising, the token unscaled (alpha only at inference)."""
    module = slider_module(tiny_dir, variant="reference_code", reference_code={"denoise_steps": 4})
    scales = []
    monkeypatch.setattr(module.tokens, "set_scale", lambda s: scales.append(s))
    loss = module.textual_loss(slider_batch(SIZE, "red circle"))
    assert torch.isfinite(loss) and module.pool.latents == {}
    assert all(s is None for s in scales)


def test_partial_denoising_takes_its_stop_steps_from_the_host_generator(tiny_dir):
    """k ~ U{1..N-1} per sample comes from the CPU generator alone (the loop needs k on the host); the noise
    from the other generator."""
    from diffusion.sampling import DDIMSchedule
    from lightning_modules.slider import denoise_partially

    module = slider_module(tiny_dir, variant="reference_code")
    backbone, uncond = module.backbone, module.frozen_text([""])
    cond = module.frozen_text(["a red circle", "a blue star", "a red star"])

    def run(noise_seed, host_seed):
        return denoise_partially(backbone, cond, uncond, 5, 2.0, torch.Generator().manual_seed(noise_seed),
                                 torch.Generator().manual_seed(host_seed))

    latents, t = run(0, 3)
    ks = torch.randint(1, 5, (3,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, DDIMSchedule(backbone.scheduler.config, 5).timesteps[ks])
    other_noise, same_t = run(1, 3)
    assert torch.equal(same_t, t) and not torch.allclose(other_noise, latents)
    assert torch.equal(run(0, 3)[0], latents)


def test_erasing_reads_the_original_word_for_the_frozen_predictions(tiny_dir):
    """With the word's rows trained, eps(c+) must still be the frozen model's: its cached text is the original."""
    module = slider_module(tiny_dir, token={"name": "red", "train_existing": True}, alpha_min=1.0, alpha_max=1.0)
    with torch.no_grad():
        module.tokens.rows[0].rows.add_(1.0)
    frozen = module.frozen_text(["a red circle"]).hidden_states
    with module.tokens.original():
        plain = module.backbone.encode_prompt(["a red circle"]).hidden_states
    trained = module.backbone.encode_prompt(["a red circle"]).hidden_states
    assert torch.equal(frozen, plain) and not torch.allclose(frozen, trained)
    with pytest.raises(ConfigError, match="must contain"):
        module.trained_prompt("a blue circle")


# ----- sampling strength ----------------------------------------------------------------------------
def test_strength_scales_the_embedding_and_zero_is_a_zero_vector(tiny_dir):
    """Documented behaviour: strength s reads the prompt with s * S in the token's place; at 0 that is a
    zero vector, which (CLIP being causal) still differs from the plain prompt after the token."""
    module = slider_module(tiny_dir)
    backbone, tokens = module.backbone, module.tokens
    prompt = module.sampling_prompt("a red circle", "")
    assert prompt == "a red circle <size>"
    for s in (0.0, 1.5):
        with module.sampling_setting(strength=s):
            got = backbone.encode_prompt([prompt]).hidden_states
        expected = encode_with_row(backbone, tokens, prompt, tokens.rows[0].rows.detach() * s).hidden_states
        torch.testing.assert_close(got, expected)
    with module.sampling_setting(strength=0.0):
        zero = backbone.encode_prompt([prompt]).hidden_states
    plain = backbone.encode_prompt(["a red circle"]).hidden_states
    n = len(backbone.tokenizers[0]("a red circle").input_ids) - 1  # positions before the end token
    torch.testing.assert_close(zero[:, :n], plain[:, :n])
    assert not torch.allclose(zero[:, n + 1:], plain[:, n:-1])


def test_output_scaling_zeroes_the_token_early(tiny_dir):
    """The authors' inference: strength times the encoder output at the token, zero for t > 800."""
    module = slider_module(tiny_dir, variant="reference_code")
    backbone = module.backbone
    prompt = module.sampling_prompt("a red circle", "")
    position = backbone.tokenize([prompt])[0].tolist().index(int(module.tokens.rows[0].token_ids[0]))
    plain = backbone.encode_prompt([prompt]).hidden_states
    with module.sampling_setting(strength=2.0):
        schedule = module.prompt_encoder()([prompt])
    late, early = schedule(40, 500).hidden_states, schedule(2, 900).hidden_states
    torch.testing.assert_close(late[:, position], 2.0 * plain[:, position])
    assert early[:, position].abs().max() == 0
    others = [i for i in range(plain.shape[1]) if i != position]
    assert torch.equal(late[:, others], plain[:, others]) and torch.equal(early[:, others], plain[:, others])


def test_two_sliders_compose_with_independent_strengths(tiny_dir, tmp_path):
    from diffusion.backbone import load_backbone
    from diffusion.sliders import SliderSet, load_slider
    from diffusion.tokens import PlaceholderTokens

    backbone = load_backbone(str(tiny_dir))
    for name, seed in (("<a>", 1), ("<b>", 2)):
        tokens = PlaceholderTokens(backbone, name)
        with torch.no_grad():
            tokens.rows[0].rows.normal_(generator=torch.Generator().manual_seed(seed))
        run = tmp_path / name.strip("<>")
        tokens.save(run / "learned_embeds.safetensors")
        (run / "slider.json").write_text(json.dumps({"method": "prompt_slider", "file": "learned_embeds.safetensors",
                                                     "token": name}))
        tokens.remove()
    fresh = load_backbone(str(tiny_dir))
    sliders = SliderSet([load_slider(fresh, tmp_path / "a"), load_slider(fresh, tmp_path / "b")])
    prompt = sliders.prompt("a dog")
    assert prompt == "a dog <a> <b>"
    table = fresh.text_encoders[0].get_input_embeddings().weight
    ids = [fresh.tokenizers[0].convert_tokens_to_ids(t) for t in ("<a>", "<b>")]
    rows = table[ids].detach().clone()
    with sliders.strengths([2.0, -0.5]):
        got = fresh.encode_prompt([prompt]).hidden_states
    with torch.no_grad():
        table[ids[0]], table[ids[1]] = 2.0 * rows[0], -0.5 * rows[1]
    for s in sliders.sliders:
        s.rows[0].enabled = False
    torch.testing.assert_close(got, fresh.encode_prompt([prompt]).hidden_states)
    with pytest.raises(ConfigError, match="2 sliders"):
        with sliders.strengths([1.0, 2.0, 3.0]):
            pass


def test_an_sdxl_slider_transfers_to_sd_through_clip_l(tiny_dirs, tmp_path):
    """A slider trained on SDXL holds one CLIP-L vector; SD1.x (which shares that encoder) reads it."""
    from diffusion.backbone import load_backbone
    from diffusion.sliders import load_slider

    module = slider_module(tiny_dirs["sdxl"])
    assert len(module.tokens.rows) == 1  # the CLIP-L encoder only: one vector, as the paper's 3 KB
    paths = module.export_artifacts(tmp_path / "run")
    assert set(load_file(paths[0])) == {"clip_l"}
    sd = load_backbone(str(tiny_dirs["sd"]))
    slider = load_slider(sd, tmp_path / "run")
    assert slider.prompt("a dog") == "a dog <size>"
    row = sd.text_encoders[0].get_input_embeddings().weight[sd.tokenizers[0].convert_tokens_to_ids("<size>")]
    torch.testing.assert_close(row, module.tokens.rows[0].rows.detach()[0])


# ----- train.py end to end ----------------------------------------------------------------------------
@pytest.fixture
def slider_base(tiny_dir, tmp_path) -> list[str]:
    return ["model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv", f"paths.log_dir={tmp_path / 'logs'}",
            "callbacks.progress_bar.refresh_rate=0", "callbacks.sample_grid.seeds=[0]",
            "callbacks.sample_grid.num_steps=2", "module.pool.num_steps=2", "module.pool.size=2",
            "slider=age", "slider.templates.0.resolution=null"]


def test_prompt_slider_run_loads_in_diffusers_and_sweeps_in_evaluate(slider_base, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    run_train("method=prompt_slider", *slider_base, "trainer.max_steps=6", f"hydra.run.dir={run}")
    info = json.loads((run / "slider.json").read_text())
    assert info["method"] == "prompt_slider" and info["slider"] == "age" and info["templates"][0]["target"]
    rows = load_file(run / "learned_embeds.safetensors")["<age>"]
    assert rows.shape == (1, 32)
    assert (run / "samples" / "step_000006.png").is_file() and (run / "samples" / "step_000006.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    loaded = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<age>")]
    assert torch.equal(loaded, rows[0])

    out = tmp_path / "eval"
    proc = __import__("subprocess").run(
        [__import__("sys").executable, "evaluate.py", "model=tiny", f"model.path={tiny_dir}", f"artifact={run}",
         "metrics=none", "seeds=[0]", "num_steps=2", "sweep={strength:[0,1,3]}", "prompts=['a photo of a dog']",
         f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["strength"] for s in samples] == [0, 1, 3]
    assert {s["prompt"] for s in samples} == {"a photo of a dog <age>"}
    assert json.loads((out / "grid.json").read_text())["columns"] == {"strength": [0, 1, 3]}


def test_visual_slider_runs_end_to_end(slider_base, tiny_dir, tmp_path):
    from PIL import Image, ImageDraw

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, radius in ((a, 28), (b, 10)):
        folder.mkdir()
        for i in range(3):
            im = Image.new("RGB", (64, 64), (128, 128, 128))
            ImageDraw.Draw(im).ellipse((32 - radius, 32 - radius, 32 + radius, 32 + radius), fill=(200, 30, 30 * i))
            im.save(folder / f"{i}.png")
    run = tmp_path / "visual"
    run_train("method=visual_slider", *slider_base, "trainer.max_steps=4", f"data.images_dir={a}",
              f"data.pair_dirs=[{b}]", "data.templates=['a photo of a circle {}']", f"hydra.run.dir={run}")
    info = json.loads((run / "slider.json").read_text())
    assert info["mode"] == "visual" and info["templates"] == ["a photo of a circle {}"]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(load_file(run / "learned_embeds.safetensors")["<age>"], state["tokens.rows.0.rows"])
    samples = evaluate_slider(run, tiny_dir, tmp_path, "strength=2")
    assert [(s["prompt"], s.get("strength")) for s in samples] == [("a photo of a dog <age>", None)]


def test_erase_run_changes_only_the_erased_words(slider_base, tiny_dir, tmp_path):
    from diffusion.backbone import load_backbone
    from diffusion.sliders import load_slider

    run = tmp_path / "erase"
    run_train("method=prompt_slider", *slider_base[:-2], "slider=erase_van_gogh", "slider.templates.0.resolution=null",
              "trainer.max_steps=4", f"hydra.run.dir={run}")
    assert json.loads((run / "slider.json").read_text())["erase"] is True
    backbone = load_backbone(str(tiny_dir))
    table = backbone.text_encoders[0].get_input_embeddings().weight
    before = table.detach().clone()
    slider = load_slider(backbone, run)
    assert slider.prompt("a painting by van gogh") == "a painting by van gogh"  # nothing appended
    ids = backbone.tokenizers[0]("van gogh", add_special_tokens=False).input_ids
    changed = (table.detach() != before).any(1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids) and len(ids) == 2


def test_concept_slider_exports_lora_that_diffusers_loads(slider_base, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion.backbone import load_backbone
    from diffusion.sliders import load_slider

    run = tmp_path / "lora"
    run_train("method=concept_slider", *slider_base[:8], "slider=age",
              "slider.templates.0.resolution=null", "module.denoise_steps=3", "trainer.max_steps=3",
              f"hydra.run.dir={run}")
    weights = load_file(run / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") for k in weights)
    assert not any("attn2" in k for k in weights) and any("attn1.to_q" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(run), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.unet.peft_config

    backbone = load_backbone(str(tiny_dir))
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    cond = backbone.encode_prompt(["a photo of a person"])
    base = backbone.predict(x, t, cond)
    slider = load_slider(backbone, run)
    with torch.no_grad():
        outs = {}
        for s in (0.0, 1.0, -1.0):
            slider.set_strength(s)
            outs[s] = backbone.predict(x, t, cond)
    torch.testing.assert_close(outs[0.0], base)
    assert not torch.allclose(outs[1.0], base) and not torch.allclose(outs[-1.0], outs[1.0])
    samples = evaluate_slider(run, tiny_dir, tmp_path, "sweep={strength:[0,1]}")
    assert [(s["prompt"], s["strength"]) for s in samples] == [("a photo of a dog", 0), ("a photo of a dog", 1)]


def evaluate_slider(run, tiny_dir, tmp_path, *overrides: str) -> list[dict]:
    """evaluate.py on a slider run (one seed, two steps): the samples it records."""
    from tests.test_evaluation import run_evaluate

    out = tmp_path / "eval"
    run_evaluate("model=tiny", f"model.path={tiny_dir}", f"artifact={run}", "metrics=none", "seeds=[0]", "num_steps=2",
                 "prompts=['a photo of a dog']", *overrides, f"hydra.run.dir={out}")
    return json.loads((out / "samples.json").read_text())["samples"]
