"""The batched shapes renderer: `render_tensors` of `scene_tensor` rows draws what `render_batch` draws."""

from __future__ import annotations

import random

import torch

from datamodules.shapes.render import SCENE_TENSOR_SIZE, render_batch, render_tensors, scene_tensor
from datamodules.shapes.world import ObjectSpec, Scene, SceneSampler

SAMPLER = SceneSampler(two_object_p=0.5, badge_p=0.4, texture_p=0.5, parts_p=0.5)


def _check(scenes: list[Scene], supersample: int = 2):
    params = torch.stack([scene_tensor(scene) for scene in scenes])
    assert params.shape == (len(scenes), SCENE_TENSOR_SIZE) and params.dtype == torch.float32
    images, masks = render_tensors(params, 64, supersample)
    want_images, want_masks = render_batch(scenes, 64, supersample)
    assert images.shape == (len(scenes), 3, 64, 64) and masks.shape == (len(scenes), 2, 64, 64)
    torch.testing.assert_close(images, want_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(masks, want_masks, rtol=0, atol=1e-5)
    return masks


def test_batched_render_matches_the_per_scene_renderer():
    scenes = [SAMPLER.sample(random.Random(i)) for i in range(64)]
    kinds = [(len(s.objects), any(o.badge for o in s.objects), any(o.texture != "plain" for o in s.objects))
             for s in scenes]
    assert {n for n, _, _ in kinds} == {1, 2} and any(b for _, b, _ in kinds) and any(t for _, _, t in kinds)
    masks = _check(scenes)
    one = torch.tensor([len(s.objects) == 1 for s in scenes])
    assert (masks[one, 1] == 0).all() and (masks[~one, 1].flatten(1).sum(1) > 0).all()


def test_batched_render_of_one_scene_at_the_default_supersampling():
    badge = next(s for s in (SAMPLER.sample(random.Random(i)) for i in range(100)) if s.objects[-1].badge)
    _check([badge], supersample=4)


def test_batched_render_without_badges_or_scenes():
    scenes = [Scene("navy", [ObjectSpec("star", "yellow", 0.3, 0.5, 0.5, "checkered", 10.0)]),
              Scene("beige", [ObjectSpec("heart", "red", 0.2, 0.3, 0.4, "dotted", -5.0),
                              ObjectSpec("cross", "blue", 0.2, 0.6, 0.5)], "left of")]
    _check(scenes)
    images, masks = render_tensors(torch.zeros(0, SCENE_TENSOR_SIZE))
    assert images.shape == (0, 3, 64, 64) and masks.shape == (0, 2, 64, 64)
