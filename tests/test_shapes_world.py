"""Shapes world: scene sampling, captions, rendering (determinism, masks, colours), the data stream,
and the pretraining method end to end on a toy configuration."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from datamodules.shapes.datamodule import ShapesDataModule, ShapesStream, token_roles
from datamodules.shapes.render import render_batch, render_scene
from datamodules.shapes.world import (BACKGROUND_ROLE, BACKGROUNDS, COLOURS, CONCEPTS, SHAPES, SIZES, Badge, ObjectSpec,
                                      Scene, SceneSampler, concept_scene, parse_caption, vocabulary)


def test_scenes_and_captions_are_deterministic_and_use_the_vocabulary():
    sampler = SceneSampler()
    a = [sampler.sample(random.Random(i)).caption() for i in range(200)]
    b = [sampler.sample(random.Random(i)).caption() for i in range(200)]
    assert a == b and len(set(a)) > 150
    words = set(vocabulary())
    assert all(set(c.split()) <= words for c in a)
    assert any(" left of " in c for c in a) and any("badge" in c for c in a)


def test_held_out_concepts_never_appear_in_training_scenes():
    sampler = SceneSampler(badge_p=1.0)
    held = set(CONCEPTS.values())
    for i in range(500):
        for obj in sampler.sample(random.Random(i)).objects:
            assert obj.badge is not None and obj.badge not in held


def test_size_words_match_the_sampled_size():
    sampler = SceneSampler()
    for i in range(300):
        for obj in sampler.sample(random.Random(i)).objects:
            lo, hi = SIZES[obj.size_word]
            assert lo <= obj.size <= hi


def test_two_object_layout_follows_the_relation():
    sampler = SceneSampler(two_object_p=1.0)
    for i in range(200):
        scene = sampler.sample(random.Random(i))
        first, second = scene.objects
        if scene.relation == "left of":
            assert first.x < second.x
        elif scene.relation == "right of":
            assert first.x > second.x
        elif scene.relation == "above":
            assert first.y < second.y
        else:
            assert first.y > second.y


def test_render_is_deterministic_with_exact_colours_and_masks():
    scene = Scene("gray", [ObjectSpec("square", "red", 0.3, 0.5, 0.5)])
    image, masks = render_scene(scene, 64, 4)
    again, _ = render_scene(scene, 64, 4)
    assert torch.equal(image, again) and image.shape == (3, 64, 64) and masks.shape == (1, 64, 64)
    red = torch.tensor(COLOURS["red"]) / 255
    gray = torch.tensor(BACKGROUNDS["gray"]) / 255
    inside, outside = masks[0] == 1, masks[0] == 0
    torch.testing.assert_close(image[:, inside].T, red.expand(int(inside.sum()), 3))
    torch.testing.assert_close(image[:, outside].T, gray.expand(int(outside.sum()), 3))
    # square half-side 0.82 * radius: area (2 * 0.82 * 0.3)^2 of the image
    assert abs(masks[0].mean().item() - (2 * 0.82 * 0.3) ** 2) < 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_centred_with_a_sensible_area(shape):
    _, masks = render_scene(Scene("white", [ObjectSpec(shape, "blue", 0.3, 0.4, 0.6)]), 64, 4)
    m = masks[0]
    area = m.mean().item()
    assert 0.08 < area < 0.3
    ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    cx, cy = (m * xs).sum() / m.sum() / 64, (m * ys).sum() / m.sum() / 64
    assert abs(cx - 0.4) < 0.05 and abs(cy - 0.6) < 0.08


def test_masks_follow_occlusion_and_shapes_differ():
    scene = Scene("gray", [ObjectSpec("circle", "red", 0.3, 0.45, 0.5), ObjectSpec("square", "blue", 0.2, 0.6, 0.5)])
    _, masks = render_scene(scene, 64, 2)
    assert (masks.sum(0) <= 1 + 1e-6).all(), "visible coverage never exceeds one"
    assert masks[1].sum() > 0 and masks[0].sum() > 0
    sheet, _ = render_batch([Scene("gray", [ObjectSpec(s, "red", 0.3, 0.5, 0.5)]) for s in SHAPES])
    flat = sheet.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1e9).min() > 1.0, "every shape looks different"


def test_concept_renders_vary_pose_but_keep_identity():
    renders = [concept_scene("sun_medal", random.Random(i)) for i in range(5)]
    assert len({(round(s.objects[0].x, 3), s.background) for s in renders}) == 5
    assert all(s.objects[0].badge == CONCEPTS["sun_medal"] for s in renders)
    assert all(s.caption().endswith("background") and "badge" in s.caption() for s in renders)


def test_stream_items_are_a_function_of_the_index():
    stream = ShapesStream(SceneSampler(), seed=3)
    a, b = stream(17), ShapesStream(SceneSampler(), seed=3)(17)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["prompt"] == b["prompt"]
    assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    assert json.loads(a["scene"])["background"] in a["prompt"]
    batch = next(iter(ShapesDataModule(batch_size=4, num_workers=0).train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["masks"].shape == (4, 2, 64, 64)
    assert len(batch["prompt"]) == 4


def test_pretrain_runs_both_stages_and_exports_a_loadable_pipeline(tmp_path):
    """A toy pretraining run: autoencoder stage, latent scale, UNet stage, EMA export that our loader
    and diffusers both read."""
    from tests.helpers import compose_cfg
    import train

    cfg = compose_cfg("train", ["method=pretrain", "trainer=cpu", "logger=csv", "trainer.max_steps=4",
                                "module.vae_steps=2", "module.warmup=1", "data.batch_size=2", "data.num_workers=0",
                                "module.unet.block_out_channels=[32,32,64]", "module.unet.norm_num_groups=32",
                                "module.text_encoder.num_hidden_layers=1"], tmp_path)
    train.train(cfg)
    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate

    backbone = load_backbone(str(tmp_path / "pipeline"))
    assert backbone.resolution == 64 and backbone.vae.config.scaling_factor != 0.18215
    tokenizer = backbone.tokenizers[0]
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in vocabulary())
    images = generate(backbone, ["a red circle on a gray background"], num_steps=4)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    unet_config = json.loads((tmp_path / "pipeline" / "unet" / "config.json").read_text())
    assert "_name_or_path" not in unet_config and unet_config["block_out_channels"] == [32, 32, 64]

    # continue training the exported UNet on its frozen text encoder (how shapes_b and later segments train)
    def continue_from_export(method: str, out, *overrides: str):
        """Two more training steps starting from the exported pipeline (its UNet too); the new export."""
        pipeline = tmp_path / "pipeline"
        train.train(compose_cfg("train", [f"method={method}", "trainer=cpu", "logger=csv", "trainer.max_steps=2",
                                          "data.batch_size=2", "data.num_workers=0", f"module.init_from={pipeline}",
                                          f"module.unet_from={pipeline}", *overrides], out))
        return load_backbone(str(out / "pipeline"))

    continued = continue_from_export("pretrain_b", tmp_path / "continued", "module.warmup=1", "module.pixel_weight=0.1",
                                     "module.pixel_resolutions=[8]", "trainer.log_every_n_steps=1")
    assert list(continued.unet.config.block_out_channels) == [32, 32, 64]  # the exported UNet, not pretrain_b's own
    with open(tmp_path / "continued" / "csv" / "metrics.csv") as f:  # TokenCompose's pixel loss ran and was logged
        pixel = [float(r["train/attention_pixel"]) for r in csv.DictReader(f) if r.get("train/attention_pixel")]
    assert pixel and all(v > 0 for v in pixel)
    assert torch.equal(continued.text_encoders[0].get_input_embeddings().weight,
                       backbone.text_encoders[0].get_input_embeddings().weight)  # frozen: unchanged

    # sharpen the decoder alone: the encoder (so the latents), the UNet and the text encoder stay as they were
    tuned = continue_from_export("pretrain", tmp_path / "decoder", "module.decoder_steps=2")
    before, after = backbone.vae.state_dict(), tuned.vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert tuned.vae.config.scaling_factor == backbone.vae.config.scaling_factor
    assert all(torch.equal(v, tuned.unet.state_dict()[k]) for k, v in backbone.unet.state_dict().items())


def test_pretrain_rejects_missing_sources(tmp_path):
    from lightning_modules.pretrain import PretrainModule
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="module.unet_from=.* has no unet/ folder"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, unet_from=str(tmp_path))
    with pytest.raises(ConfigError, match="module.decoder_steps fine-tunes a trained autoencoder's decoder"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, decoder_steps=5)
    with pytest.raises(ConfigError, match="module.vae_from=.* has no vae/ folder"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, init_from=str(tmp_path),
                       vae_from=str(tmp_path))
    (tmp_path / "vae").mkdir()
    with pytest.raises(ConfigError, match="module.vae_from replaces the autoencoder of module.init_from"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, vae_from=str(tmp_path))
    with pytest.raises(ConfigError, match="module.attention_weight, module.pixel_weight and module.object_weight must be >= 0"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, attention_weight=-1)
    with pytest.raises(ConfigError, match=r"module.pixel_resolutions=\[4\] must be among module.attention_resolutions"):
        PretrainModule(unet={}, text_encoder={}, vae={}, words=["a"], total_steps=1, pixel_resolutions=(4,))


# ----- v2: badges named part by part, caption roles, held-out compositions -------------------------
def test_badges_named_part_by_part_parse_back_and_use_the_vocabulary():
    sampler = SceneSampler(two_object_p=0.5, badge_p=1.0, parts_p=1.0)
    words = set(vocabulary())
    for i in range(200):
        scene = sampler.sample(random.Random(i))
        caption = scene.caption()
        assert caption.count(" badge with a ") == len(scene.objects) and set(caption.split()) <= words
        parsed = parse_caption(caption)
        assert [o.badge for o in parsed.objects] == [o.badge for o in scene.objects]
        assert all(o.parts_named for o in parsed.objects) and parsed.relation == scene.relation
    plain = SceneSampler(badge_p=1.0, parts_p=0.0).sample(random.Random(0))
    assert " with " not in plain.caption() and parse_caption(plain.caption()).objects[0].badge is None


def test_parts_p_zero_keeps_the_earlier_scene_streams():
    """No random draw for the caption form at parts_p=0: every v1 stream (probes, benchmarks) is unchanged."""
    a, b = SceneSampler(badge_p=0.5), SceneSampler(badge_p=0.5, parts_p=0.0)
    assert [a.sample(random.Random(i)).to_dict() for i in range(50)] == \
           [b.sample(random.Random(i)).to_dict() for i in range(50)]


def test_caption_words_name_each_object_and_the_background():
    badge = Badge("hexagon", "purple", "star", "yellow")
    scene = Scene("gray", [ObjectSpec("badge", "purple", 0.22, 0.3, 0.5, badge=badge, parts_named=True),
                           ObjectSpec("circle", "red", 0.15, 0.7, 0.5, texture="striped")], "left of")
    assert scene.caption() == ("a medium purple hexagon badge with a yellow star left of a small red striped circle "
                               "on a gray background")
    roles = [role for _, role in scene.caption_words()]
    assert roles == [None, 0, 0, 0, 0, None, None, 0, 0, None, None, None, 1, 1, 1, 1, None, None,
                     BACKGROUND_ROLE, BACKGROUND_ROLE]
    positions = token_roles(scene)
    assert positions.shape == (77,) and positions[0] == -1 and positions[1] == -1 and positions[2] == 0
    assert positions[13].item() == 1 and positions[19].item() == BACKGROUND_ROLE and (positions[21:] == -1).all()


def test_held_out_compositions_never_appear_in_the_training_stream():
    """By construction (the sampler redraws a held-out badge) and over the pretraining stream's first
    20,000 scenes: no held-out concept's four parts appear together, in any caption form."""
    from datamodules.shapes.world import CONCEPTS

    stream = ShapesStream(SceneSampler(two_object_p=0.6, badge_p=0.3, parts_p=0.5), seed=0)
    held = set(CONCEPTS.values())
    named = 0
    for k in range(20_000):
        scene = stream.scene(k)
        parsed = parse_caption(scene.caption())
        for obj, read in zip(scene.objects, parsed.objects):
            assert obj.badge not in held and read.badge not in held
            named += read.badge is not None
    assert named > 1000  # the part-by-part form is well represented


def test_stream_can_leave_the_drawing_to_the_device():
    """render_on_device: the workers send scene tensors and the datamodule draws the same batch after transfer."""
    common = dict(batch_size=6, num_workers=0, badge_p=0.5, parts_p=0.5)
    drawn = next(iter(ShapesDataModule(**common).train_dataloader()))
    module = ShapesDataModule(**common, render_on_device=True)
    deferred = next(iter(module.train_dataloader()))
    assert "pixel_values" not in deferred and deferred["scene_tensor"].shape[0] == 6
    batch = module.on_after_batch_transfer(deferred, 0)
    torch.testing.assert_close(batch["pixel_values"], drawn["pixel_values"], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch["masks"], drawn["masks"], rtol=0, atol=1e-5)
    assert torch.equal(batch["token_roles"], drawn["token_roles"]) and batch["prompt"] == drawn["prompt"]


# ----- v2 pretraining pieces --------------------------------------------------------------------------
def _world_tokenizer(tmp_path, words):
    from transformers import CLIPTokenizer

    from diffusion.clip_tokenizer import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(words, tmp_path / "tok"))


def test_caption_ids_equal_the_tokenizer(tmp_path):
    from diffusion.clip_tokenizer import CaptionIds

    tokenizer = _world_tokenizer(tmp_path, vocabulary())
    sampler = SceneSampler(two_object_p=0.6, badge_p=0.5, parts_p=0.5)
    prompts = [sampler.sample(random.Random(i)).caption() for i in range(300)] + ["", "a photo of a cat"]
    want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(CaptionIds(tokenizer, vocabulary())(prompts), want)


def test_extended_vocabulary_keeps_every_known_token(tmp_path):
    """A new word gets a row (the mean); known words keep theirs, so old captions encode exactly as before."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion.clip_tokenizer import extend_vocabulary

    old_words = [w for w in vocabulary() if w != "with"]
    tokenizer = _world_tokenizer(tmp_path, old_words)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_attention_heads=2, num_hidden_layers=1,
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id)).eval()
    caption = "a small red striped circle left of a medium badge on a gray background"
    before = encoder(tokenizer([caption], return_tensors="pt").input_ids)[0]
    rows = encoder.get_input_embeddings().weight.detach().clone()
    new = extend_vocabulary(tokenizer, encoder, vocabulary())
    assert len(new(" with", add_special_tokens=False).input_ids) == 1
    after = encoder(new([caption], return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with_row = encoder.get_input_embeddings().weight[new.convert_tokens_to_ids("with</w>")]
    torch.testing.assert_close(with_row, rows.mean(0))
    assert encoder.config.vocab_size == len(new) and encoder.config.eos_token_id == new.eos_token_id


def test_token_attention_loss_by_hand():
    """TokenCompose's token loss: (1 - share of a word's attention inside its region)^2, over words with a role."""
    from diffusion.losses import region_masks, token_attention_loss

    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: the top-left quarter; no object 1; background: the other 3/4
    regions = region_masks(masks, (2, 2))
    assert torch.equal(regions[0], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]))
    maps = torch.full((1, 4, 3), 0.25)  # 3 tokens, each spread evenly over the 4 cells
    roles = torch.tensor([[0, 2, -1]])
    loss, share = token_attention_loss(maps, regions, roles)
    assert loss.item() == pytest.approx(((1 - 0.25) ** 2 + (1 - 0.75) ** 2) / 2)
    assert share.item() == pytest.approx(0.5)
    focused = torch.zeros(1, 4, 3)
    focused[0, 0, 0] = focused[0, 1:, 1] = 1.0
    assert token_attention_loss(focused, regions, roles)[0].item() == pytest.approx(0.0)
    # a batch whose captions were all dropped names nothing: 0, not the NaN of an empty mean
    maps.requires_grad_(True)
    loss, share = token_attention_loss(maps, regions, torch.full((1, 3), -1))
    loss.backward()
    assert (loss.item(), share.item()) == (0.0, 0.0) and torch.equal(maps.grad, torch.zeros_like(maps))


def test_token_pixel_loss_by_hand_rewards_covering_the_region():
    """TokenCompose's pixel loss: BCE of each word's attention probability per cell with its region; a map
    that puts all its mass inside but in one cell (token loss 0) still pays for the region cells it misses."""
    import math

    from diffusion.losses import region_masks, token_attention_loss, token_pixel_loss

    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1
    regions = region_masks(masks, (2, 2))  # object 0 in cell 0, the background in cells 1-3
    roles = torch.tensor([[2]])  # one word, naming the background
    peaked = torch.tensor([[[0.0], [0.9], [0.0], [0.0]]])  # inside only, one cell of three
    covering = torch.tensor([[[0.0], [0.9], [0.9], [0.9]]])
    assert token_attention_loss(peaked, regions, roles)[0].item() == pytest.approx(0.0)
    clamp = 100.0  # BCE's log is clamped at -100
    assert token_pixel_loss(peaked, regions, roles).item() == pytest.approx((-math.log(0.9) + 2 * clamp) / 4)
    assert token_pixel_loss(covering, regions, roles).item() == pytest.approx(-3 * math.log(0.9) / 4)
    assert token_pixel_loss(covering, regions, torch.tensor([[-1]])).item() == 0.0  # no word with a role


def test_localisation_benchmark_reads_each_objects_own_words():
    """benchmarks/shapes_localisation.py: the first shape and colour word of each object (a named badge's outer
    ones), the background colour word, and the coverage-weighted inside / outside ratio."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shapes_localisation import named_words, threshold_iou, weighted_ratio

    badge = Badge("hexagon", "purple", "star", "yellow")
    scene = Scene("gray", [ObjectSpec("badge", "purple", 0.22, 0.3, 0.5, badge=badge, parts_named=True),
                           ObjectSpec("circle", "red", 0.15, 0.7, 0.5)], "left of")
    # "<start> a medium purple hexagon badge with a yellow star left of a small red circle on a gray background"
    assert named_words(scene) == {"shape": [(4, 0), (15, 1)], "colour": [(3, 0), (14, 1)], "background": [(18, -1)]}
    attention = torch.tensor([[4.0, 1.0], [1.0, 1.0]])
    inside = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert weighted_ratio(attention, inside) == pytest.approx(4.0)
    assert weighted_ratio(torch.ones(2, 2), torch.tensor([[0.5, 0.5], [0.0, 0.0]])) == pytest.approx(1.0)
    # EM's mask rule on a map: a peak in one cell of a two-cell region recovers half of it
    region = torch.tensor([[1.0, 0.6], [0.0, 0.0]])  # the second cell is covered more than half: in
    assert threshold_iou(attention, region) == pytest.approx(0.5)
    assert threshold_iou(torch.tensor([[3.0, 2.0], [1.0, 1.0]]), region) == pytest.approx(1.0)
