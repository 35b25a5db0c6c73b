"""Shapes world: scene sampling, captions, rendering (determinism, masks, colours), the data stream,
and the pretraining method end to end on a toy configuration."""

from __future__ import annotations

import json
import random

import pytest
import torch

from datamodules.shapes.datamodule import ShapesDataModule, ShapesStream
from datamodules.shapes.render import render_batch, render_scene
from datamodules.shapes.world import (BACKGROUNDS, COLOURS, CONCEPTS, SHAPES, SIZES, ObjectSpec, Scene, SceneSampler,
                                      concept_scene, vocabulary)


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

    continued = continue_from_export("pretrain_b", tmp_path / "continued", "module.warmup=1")
    assert list(continued.unet.config.block_out_channels) == [32, 32, 64]  # the exported UNet, not pretrain_b's own
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
