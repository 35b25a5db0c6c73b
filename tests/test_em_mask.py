"""EMMaskModule: scenes, eq. (3) and eq. (4) by hand, which parameters each stage trains, the mask
variants, and an end-to-end run on the shapes world."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from datamodules.scenes import SceneSet, concept_tokens, scan_scenes
from datamodules.shapes.scenes import write_scene_set
from diffusion.concept_masks import EMSettings, JointSettings, LossSettings, PriorSettings, draw_subset
from diffusion.losses import cross_attention_loss, downsample_mask, masked_diffusion_loss
from lightning_modules.em_mask import EMMaskModule
from tests.helpers import assert_missing_and_unknown, method_settings
from tests.test_train import run_train
from utils.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    return write_scene_set(tmp_path_factory.mktemp("scenes") / "scenes", count=2, resolution=64)


# ----- scenes -------------------------------------------------------------------------------------
def test_shapes_scenes_partition_each_image(scenes_dir):
    records = scan_scenes(scenes_dir)
    scenes = SceneSet(records, 64)
    assert concept_tokens(records) == ["<s00_c0>", "<s00_c1>", "<s00_bg>", "<s01_c0>", "<s01_c1>", "<s01_bg>"]
    for record, masks in zip(records, scenes.masks):
        assert record.background == record.concepts[2]
        stacked = torch.stack([masks[t] for t in record.concepts])
        assert stacked.sum(0).eq(1).float().mean() > 0.97  # every pixel belongs to one concept (edges aside)
        assert all(0.03 < m.mean() < 0.9 for m in stacked)


@pytest.mark.parametrize("entry, message", [
    ({"image": "00.png", "concepts": ["<a>"], "colour": "red"}, "unknown key 'colour'"),
    ({"image": "missing.png", "concepts": ["<a>"]}, "missing.png not found"),
    ({"image": "00.png", "concepts": []}, "non-empty 'concepts'"),
    ({"image": "00.png", "concepts": ["<a>", "<a>"]}, "listed twice"),
    ({"image": "00.png", "concepts": ["<a>"], "masks": {"<b>": "00_c0.png"}}, "mask for '<b>'"),
    ({"image": "00.png", "concepts": ["<a>"], "background": "<b>"}, "background '<b>'"),
])
def test_bad_scenes_files_name_the_problem(scenes_dir, tmp_path, entry, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("00.png", "00_c0.png"):
        (folder / name).write_bytes((scenes_dir / name).read_bytes())
    (folder / "scenes.json").write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=message):
        scan_scenes(folder)


# ----- losses by hand -------------------------------------------------------------------------------
def test_loss_forms():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    by_hand = ((pred * mask - target * mask) ** 2).sum() / pred.numel()  # not divided by the mask's area
    assert torch.allclose(masked_diffusion_loss(pred, target, mask), by_hand)
    maps, masks = torch.rand(1, 2, 4, 4, generator=g), (torch.rand(1, 2, 4, 4, generator=g) > 0.5).float()
    per_token = [((maps[0, i] - masks[0, i]) ** 2).mean() for i in range(2)]
    assert torch.allclose(cross_attention_loss(maps, masks, "paper"), (per_token[0] + per_token[1]) / 2)
    normed = [((maps[0, i] / maps[0, i].max() - masks[0, i]) ** 2).mean() for i in range(2)]
    assert torch.allclose(cross_attention_loss(maps, masks, "break_a_scene"), normed[0] + normed[1])
    square = torch.zeros(8, 8)
    square[:4, :4] = 1
    assert torch.equal(downsample_mask(square, 2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def yaml_settings() -> dict:
    """conf/method/em_mask.yaml's settings, less what a run fills in: the code's only defaults."""
    return method_settings("em_mask", "concepts", "masks", "initializer", "prompt", "joiner", "inversion_steps",
                           "em", "losses", "joint", "crf")


def em_module(tiny_dir, scenes_dir, tmp_path=None, **kwargs) -> EMMaskModule:
    """The yaml's settings with Stable Diffusion's prompt form (what these tests were written for), then kwargs."""
    sd_prompt = {"prompt": "a photo of {}", "joiner": " and "}
    settings = OmegaConf.to_container(OmegaConf.merge(yaml_settings(), sd_prompt, kwargs))
    module = EMMaskModule({"path": str(tiny_dir)}, optimizer=torch.optim.AdamW,
                          out_dir=None if tmp_path is None else str(tmp_path), **settings)
    module.scene_set = SceneSet(scan_scenes(scenes_dir), 64, flip_p=0.0)
    module.configure_model()
    return module


def attention_by_hand(unet, tokens_at: list[int], resolution: int):
    """Forward hooks on every cross-attention's to_q / to_k: softmax(q k^T / sqrt(d)) per head, heads
    averaged, at the layers of `resolution` in down and up blocks, layers averaged: [n, r, r]."""
    seen, handles = {}, []
    for name, attn in unet.named_modules():
        if name.endswith("attn2") and not name.startswith("mid"):
            for part in ("to_q", "to_k"):
                handles.append(getattr(attn, part).register_forward_hook(
                    lambda m, a, out, name=name, part=part: seen.setdefault(name, {}).__setitem__(part, out)))
    heads = {name: attn.heads for name, attn in unet.named_modules() if name.endswith("attn2")}

    def maps():
        out = []
        for name, qk in seen.items():
            q, k = qk["to_q"], qk["to_k"]
            if q.shape[1] != resolution ** 2:
                continue
            h = heads[name]
            q = q.view(1, -1, h, q.shape[-1] // h).transpose(1, 2)
            k = k.view(1, -1, h, k.shape[-1] // h).transpose(1, 2)
            probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)[0]  # [r*r, keys]
            out.append(probs[:, tokens_at].T.reshape(-1, resolution, resolution))
        for handle in handles:
            handle.remove()
        return torch.stack(out).mean(0)
    return maps


def test_em_loss_is_eq3_plus_eq4_by_hand(tiny_dir, scenes_dir, monkeypatch):
    module = em_module(tiny_dir, scenes_dir, masks="ground_truth", joint={"steps": 0})
    backbone = module.backbone
    module.scene_masks = [{t: m > 0.5 for t, m in masks.items()} for masks in module.scene_set.masks]
    tokens = ["<s00_c0>", "<s00_bg>"]
    pixels = module.scene_set.images[0][None]
    monkeypatch.setattr(module, "step_generator", lambda offset=0, device=None: torch.Generator().manual_seed(5))
    prompt = module.concept_prompt(tokens)
    assert prompt == "a photo of <s00_c0> and <s00_bg>"
    positions = module.token_positions(prompt, tokens)
    by_hand_maps = attention_by_hand(backbone.unet, positions, 16)
    loss, parts = module.concept_loss(pixels, tokens, 0, flip=False)
    maps = by_hand_maps()

    g = torch.Generator().manual_seed(5)
    latents = backbone.encode_images(pixels, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    with torch.no_grad():
        pred = backbone.predict(backbone.add_noise(latents, noise, t), t, backbone.encode_prompt([prompt]))
    masks = [module.scene_masks[0][tok].float() for tok in tokens]
    union = F.adaptive_avg_pool2d(torch.maximum(*masks)[None, None], 32) >= 0.5
    eq3 = ((pred - noise) ** 2 * union).sum() / pred.numel()
    small = torch.stack([F.adaptive_avg_pool2d(m[None, None], 16)[0, 0] >= 0.5 for m in masks]).float()
    eq4 = ((maps - small) ** 2).mean()
    assert torch.allclose(parts["mask"], eq3, rtol=1e-4, atol=1e-7)
    assert torch.allclose(parts["attention"], eq4, rtol=1e-4, atol=1e-7)
    assert torch.allclose(loss, eq3 + 1e-2 * eq4, rtol=1e-4)


def test_training_masks_follow_each_new_set_of_masks(tiny_dir, scenes_dir):
    """The loss reads a device copy of the training masks, made again whenever a round adopts new masks."""
    module = em_module(tiny_dir, scenes_dir, masks="ground_truth")
    module.scene_masks = [{t: m > 0.5 for t, m in masks.items()} for masks in module.scene_set.masks]
    tokens = ["<s00_c0>", "<s00_bg>"]
    first = module.training_masks(0, tokens)
    assert first.dtype == torch.bool and torch.equal(first, torch.stack([module.scene_masks[0][t] for t in tokens]))
    assert first.any() and not first.all()
    module.scene_masks = [{t: ~m for t, m in scene.items()} for scene in module.scene_masks]  # a new round's
    assert torch.equal(module.training_masks(0, tokens), ~first)


def test_gradients_reach_only_what_the_stage_trains(tiny_dir, scenes_dir):
    module = em_module(tiny_dir, scenes_dir, masks="ground_truth", joint={"steps": 5, "weights": "lora"})
    module.scene_masks = [{t: m > 0.5 for t, m in masks.items()} for masks in module.scene_set.masks]
    pixels = module.scene_set.images[0][None]
    row = {t.token: t.rows[0].rows for t in module.tokens}
    loss, _ = module.concept_loss(pixels, ["<s00_c1>"], 0, flip=True)
    loss.backward()
    assert row["<s00_c1>"].grad.abs().sum() > 0
    assert all(r.grad is None or r.grad.abs().sum() == 0 for tok, r in row.items() if tok != "<s00_c1>")
    assert all(p.grad is None for p in module.backbone.parameters())  # the em stage: tokens only
    for p in module.weight_params:  # the joint stage switches the weights on
        p.requires_grad_(True)
    loss, _ = module.concept_loss(pixels, ["<s00_c1>"], 0, flip=False)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.weight_params)
    lora = {id(p) for p in module.weight_params}
    assert all(p.grad is None for p in module.backbone.parameters() if id(p) not in lora)


@pytest.mark.parametrize("variant", ["em", "fixed", "ground_truth"])
def test_mask_variants_adopt_what_they_should(tiny_dir, scenes_dir, tmp_path, monkeypatch, variant):
    module = em_module(tiny_dir, scenes_dir, tmp_path, masks=variant, joint={"steps": 0})
    module.em = replace(module.em, estimate="denoising")
    rounds, estimates = [], []

    def fake_estimate(index, num_timesteps, estimate):
        estimates.append(estimate)
        record = module.scene_set.records[index]
        full = torch.zeros(64, 64, dtype=torch.bool)
        full[: 8 * (len(rounds) + 1)] = True
        return {t: full.clone() for t in record.concepts}

    monkeypatch.setattr(module, "estimate_masks", fake_estimate)
    for _ in range(3):
        module.mask_round()
        rounds.append(module.scene_masks[0]["<s00_c0>"].sum().item())
    truth = module.scene_set.masks[0]["<s00_c0>"].sum().item()
    expected = {"em": [512, 1024, 1536], "fixed": [512, 512, 512], "ground_truth": [truth] * 3}[variant]
    assert rounds == expected
    assert estimates == ["attention"] * 2 + ["denoising"] * 4  # the initial masks always from attention
    iou = json.loads((tmp_path / "masks" / "iou.json").read_text())
    assert len(iou) == 3 * 6 * 2 and {r["role"] for r in iou} == {"subject", "background"}
    used = [r["iou"] for r in iou if r["kind"] == "used" and r["token"] == "<s00_c0>"]
    assert (used[0] == 1.0) == (variant == "ground_truth") and (used[2] == used[0]) == (variant != "em")
    assert len(list((tmp_path / "masks" / "round_02").glob("*.png"))) == 6


def test_estimated_masks_come_from_the_tokens_attention(tiny_dir, scenes_dir):
    module = em_module(tiny_dir, scenes_dir, joint={"steps": 0}, em={"refine": False, "threshold": 0.0})
    masks = module.estimate_masks(0, num_timesteps=2)
    assert set(masks) == {"<s00_c0>", "<s00_c1>", "<s00_bg>"}
    assert all(m.shape == (64, 64) and m.all() for m in masks.values())  # threshold 0: everything
    module.em = replace(module.em, threshold=0.999)
    masks = module.estimate_masks(0, num_timesteps=2)
    assert all(0 < m.float().mean() < 0.2 for m in masks.values())  # only around each map's peak
    module.em = replace(module.em, background="complement")
    masks = module.estimate_masks(0, num_timesteps=2)
    assert torch.equal(masks["<s00_bg>"], ~(masks["<s00_c0>"] | masks["<s00_c1>"]))


@pytest.mark.parametrize("contrast", ["leave_one_out", "alone"])
def test_denoising_estimate_partitions_the_scene(tiny_dir, scenes_dir, contrast):
    module = em_module(tiny_dir, scenes_dir, joint={"steps": 0}, em={"refine": False, "contrast": contrast, "chunk": 2})
    image, tokens = module.scene_set.images[0], list(module.scene_set.records[0].concepts)
    scores = module.estimator.denoising_scores(image, tokens, 3, torch.Generator().manual_seed(0))
    latent = module.backbone.encode_images(image[None]).shape[-2:]
    assert scores.shape == (3, *latent) and scores.isfinite().all()
    masks = module.estimate_masks(0, num_timesteps=3, estimate="denoising")
    assert set(masks) == set(tokens) and all(m.shape == (64, 64) for m in masks.values())
    cover = torch.stack([masks[t] for t in tokens]).sum(0)  # each latent pixel to one concept (upsampled)
    assert cover.le(1).all() and cover.eq(1).float().mean() > 0.9


def test_unknown_variant_and_missing_ground_truth_are_errors(tiny_dir, scenes_dir, tmp_path):
    with pytest.raises(ConfigError, match="module.masks='gt'"):
        em_module(tiny_dir, scenes_dir, masks="gt")
    for key in ("estimate", "contrast"):
        with pytest.raises(ConfigError, match=f"module.em.{key}='x' is unknown"):
            em_module(tiny_dir, scenes_dir, em={key: "x"})
    module = em_module(tiny_dir, scenes_dir, masks="ground_truth", joint={"steps": 0},
                       em={"refine": False, "timesteps": 1})
    module.scene_set.masks[1].pop("<s01_bg>")
    with pytest.raises(ConfigError, match="has no mask for <s01_bg>"):
        module.mask_round()


SETTINGS = {"em": EMSettings, "losses": LossSettings, "joint": JointSettings}


def test_settings_fields_are_the_yaml_keys():
    """The yaml holds every default and the dataclasses name every key: neither can drift from the other."""
    yaml = yaml_settings()
    for section, cls in SETTINGS.items():
        assert set(yaml[section]) == {f.name for f in fields(cls)}, section
    assert set(yaml["joint"]["prior"]) == {f.name for f in fields(PriorSettings)}
    built = JointSettings.from_config(yaml["joint"])
    assert isinstance(built.prior, PriorSettings) and built.as_dict() == yaml["joint"]


@pytest.mark.parametrize("section, key", [("em", "assignment"), ("em", "background"), ("em", "estimate"),
                                          ("em", "contrast"), ("losses", "attention"), ("joint", "weights")])
def test_settings_reject_unknown_choices_and_missing_keys(section, key):
    cls, values = SETTINGS[section], yaml_settings()[section]
    with pytest.raises(ConfigError, match=rf"^module\.{section}\.{key}='x' is unknown; use one of \(") as bad:
        cls.from_config({**values, key: "x"})
    assert "\n" not in str(bad.value)
    assert_missing_and_unknown(cls, values, key)
    with pytest.raises(ConfigError, match=r"^module\.joint\.prior is missing prompt, weight; "):
        JointSettings.from_config({**yaml_settings()["joint"], "prior": {"images_dir": None}})


# ----- end to end -----------------------------------------------------------------------------------
def test_joint_stage_adds_the_prior_preservation_loss(tiny_dir, scenes_dir, image_folder, monkeypatch):
    """With class images, the joint stage's loss is eq. (3) + lambda eq. (4) + weight * the class images'
    plain diffusion loss under their prompt."""
    prior = {"images_dir": str(image_folder / "images"), "prompt": "a photo", "weight": 0.5}
    module = em_module(tiny_dir, scenes_dir, em={"steps": 0, "refine": False, "timesteps": 1},
                       joint={"steps": 2, "weights": "lora", "prior": prior})
    assert len(module.prior) == 4 and module.stage(0) == "joint"
    monkeypatch.setattr(module, "enter_joint_stage", lambda: setattr(module, "in_joint", True))
    module.log = lambda *args, **kwargs: None
    batch = {"pixel_values": module.scene_set.images[0][None], "index": [0], "flip": [False]}  # as collated
    total = module.training_step(batch, 0)
    tokens = draw_subset(list(module.scene_set.records[0].concepts), module.step_generator(offset=1, device="cpu"))
    concept, _ = module.concept_loss(batch["pixel_values"], tokens, 0, flip=False)
    pixels, prompts = module.prior.draw(1, module.step_generator(offset=2), module.device)
    class_loss = module.diffusion_loss(pixels, prompts, module.step_generator(offset=3))
    assert prompts == ["a photo"] and class_loss > 0
    torch.testing.assert_close(total, concept + 0.5 * class_loss)


def test_em_run_writes_tokens_weights_masks_and_resumes(tiny_dir, scenes_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion.artifacts import load_artifact
    from diffusion.backbone import load_backbone

    common = ["method=em_mask", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
              f"data.scenes_dir={scenes_dir}", "module.em.steps=4", "module.em.every=2", "module.em.timesteps=2",
              "module.em.update_timesteps=2", "module.joint.steps=2", "module.joint.weights=lora",
              "callbacks.sample_grid=null", "callbacks.model_checkpoint.every_n_train_steps=3",
              "module.prompt='a photo of {}'", "module.joiner=' and '"]
    run = tmp_path / "run"
    run_train(*common, f"hydra.run.dir={run}")
    info = json.loads((run / "concepts.json").read_text())
    assert info["concepts"] == concept_tokens(scan_scenes(scenes_dir)) and info["mask_rounds"] == 2
    assert sorted(p.name for p in (run / "masks").iterdir()) == ["iou.json", "round_00", "round_01"]
    assert len(json.loads((run / "masks" / "iou.json").read_text())) == 2 * 6 * 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_textual_inversion(run / "tokens" / "s01_c1.safetensors")
    pipe.load_lora_weights(run / info["weights"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["em_round"] == 2 and len(ckpt["em_masks"]) == 2
    assert any("lora_" in k for k in ckpt["state_dict"])  # the joint stage's weights are in it

    resumed = tmp_path / "resumed"
    run_train(*common, "module.joint.steps=3", f"hydra.run.dir={resumed}", f"ckpt_path={run}/checkpoints/last.ckpt")
    assert json.loads((resumed / "concepts.json").read_text())["step"] == 7
    backbone = load_backbone(str(tiny_dir))  # the run loads like any artifact: its tokens and LoRA
    artifact = load_artifact(backbone, run)
    assert "em_joint" in backbone.unet.peft_config and artifact.fill("a <s01_c1>", "object") == "a <s01_c1>"
    assert backbone.tokenizers[0].convert_tokens_to_ids("<s01_c1>") != backbone.tokenizers[0].unk_token_id


def test_initializer_per_role_starts_background_tokens_from_their_word(tiny_dir, scenes_dir):
    """{subject: null, background: <word>}: each scene's background token starts at the word's embedding (the
    paper's "initialise tokens from a word"), the subjects from their random starts."""
    module = em_module(tiny_dir, scenes_dir, initializer={"subject": None, "background": "cat"})
    table = module.backbone.text_encoders[0].get_input_embeddings().weight
    word = table[module.backbone.tokenizers[0]("cat", add_special_tokens=False).input_ids[0]]
    starts = {t.token: t.rows[0].rows.detach()[0] for t in module.tokens}
    backgrounds = {record.background for record in module.scenes().records}
    assert backgrounds == {"<s00_bg>", "<s01_bg>"}
    for token, row in starts.items():
        assert torch.allclose(row, word.float()) == (token in backgrounds), token
    with pytest.raises(ConfigError, match=r"module.initializer=\{'object': 'cat'\} names roles \['object'\]"):
        em_module(tiny_dir, scenes_dir, initializer={"object": "cat"})
