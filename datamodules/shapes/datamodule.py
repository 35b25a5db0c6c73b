"""An infinite stream of shapes-world scenes with their captions and per-object masks."""

from __future__ import annotations

import json
import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.shapes.render import pad_masks, render_scene, render_tensors, scene_tensor
from datamodules.shapes.world import Scene, SceneSampler
from datamodules.stream import IndexedStream, stream_position

CAPTION_POSITIONS = 77  # CLIP's context length: the text encoder's token positions


def token_roles(scene: Scene) -> torch.Tensor:
    """[CAPTION_POSITIONS] what each token position of the caption names (`Scene.caption_words`): 0 or 1
    for an object, BACKGROUND_ROLE for the background, -1 for nothing. Position 0 is the start token, and
    every word of the world is one token."""
    roles = torch.full((CAPTION_POSITIONS,), -1, dtype=torch.long)
    for i, (_, role) in enumerate(scene.caption_words()):
        if role is not None:
            roles[i + 1] = role
    return roles


class ShapesStream:
    """Sample k of the world: a scene drawn from Random(seed, k), rendered, with its caption.

    render=False leaves the drawing to the consumer: the item holds the scene's `scene_tensor` instead of
    pixels and masks, and `render_tensors` draws the whole batch on the GPU (`ShapesDataModule`)."""

    def __init__(self, sampler: SceneSampler, seed: int = 0, resolution: int = 64, supersample: int = 2,
                 render: bool = True):
        self.sampler, self.seed = sampler, seed
        self.resolution, self.supersample, self.render = resolution, supersample, render

    def scene(self, k: int):
        return self.sampler.sample(random.Random(self.seed * 1_000_003 + k))

    def __call__(self, k: int) -> dict:
        scene = self.scene(k)
        item = {"prompt": scene.caption(), "token_roles": token_roles(scene), "scene": json.dumps(scene.to_dict())}
        if not self.render:
            return item | {"scene_tensor": scene_tensor(scene)}
        image, masks = render_scene(scene, self.resolution, self.supersample)
        return item | {"pixel_values": image * 2 - 1, "masks": pad_masks(masks)}


class ShapesDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, num_workers: int = 0, resolution: int = 64, supersample: int = 2,
                 two_object_p: float = 0.4, badge_p: float = 0.15, texture_p: float = 0.35, parts_p: float = 0.0,
                 render_on_device: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        sampler = SceneSampler(two_object_p=two_object_p, badge_p=badge_p, texture_p=texture_p, parts_p=parts_p)
        self.stream = ShapesStream(sampler, seed, resolution, supersample, render=not render_on_device)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        start, rank, world = stream_position(self.trainer)
        dataset = IndexedStream(self.stream, hp.batch_size, start, rank, world)
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """With render_on_device, draw the batch where it now is (the workers only sample scenes)."""
        if "scene_tensor" in batch:
            images, masks = render_tensors(batch.pop("scene_tensor"), self.hparams.resolution, self.hparams.supersample)
            batch |= {"pixel_values": images * 2 - 1, "masks": masks}
        return batch
