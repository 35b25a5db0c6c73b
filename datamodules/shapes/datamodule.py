"""An infinite stream of shapes-world scenes with their captions and per-object masks."""

from __future__ import annotations

import json
import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.shapes.render import pad_masks, render_scene
from datamodules.shapes.world import SceneSampler
from datamodules.stream import IndexedStream, stream_position


class ShapesStream:
    """Sample k of the world: a scene drawn from Random(seed, k), rendered, with its caption."""

    def __init__(self, sampler: SceneSampler, seed: int = 0, resolution: int = 64, supersample: int = 2):
        self.sampler, self.seed = sampler, seed
        self.resolution, self.supersample = resolution, supersample

    def scene(self, k: int):
        return self.sampler.sample(random.Random(self.seed * 1_000_003 + k))

    def __call__(self, k: int) -> dict:
        scene = self.scene(k)
        image, masks = render_scene(scene, self.resolution, self.supersample)
        return {"pixel_values": image * 2 - 1, "prompt": scene.caption(), "masks": pad_masks(masks),
                "scene": json.dumps(scene.to_dict())}


class ShapesDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, num_workers: int = 0, resolution: int = 64, supersample: int = 2,
                 two_object_p: float = 0.4, badge_p: float = 0.15, texture_p: float = 0.35, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        sampler = SceneSampler(two_object_p=two_object_p, badge_p=badge_p, texture_p=texture_p)
        self.stream = ShapesStream(sampler, seed, resolution, supersample)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        start, rank, world = stream_position(self.trainer)
        dataset = IndexedStream(self.stream, hp.batch_size, start, rank, world)
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=torch.cuda.is_available())
