"""Real images with their source prompts, DDIM-inverted once and cached: StyleDiffusion's targets.

Layout: `images_dir/*.png|jpg|...` and `images_dir/prompts.json` ({image stem: source prompt}),
or a prompts file elsewhere (`prompts_file`). For each image the data module keeps the DDIM
inversion at guidance 1 with the source prompt (paper 003, Sec. 3.3.1 and Alg. 1; T = 30, Sec. 4):
a `Trajectory` of latents z*_0 .. z*_N and the 16x16 cross-attention maps of every step, computed by
`diffusion.inversion.invert_image` (which documents the layout).

The inversion needs the backbone, which the data module does not own: `setup()` only reads and
checks the folder (so a bad folder fails before any model is loaded), and the LightningModule calls
`datamodule.prepare(self.backbone)` from `on_fit_start` (after `setup`, before the first
dataloader is built). Each trajectory is cached in
`cache_dir` under a hash of (image bytes, prompt, model path, num_steps, resolution and the other
settings that change the result), written atomically as safetensors, so reruns and sweeps read it
back without running the UNet. Ranks of a DDP run prepare independently; a concurrent miss is
computed twice and written atomically, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from datamodules.image_set import ImageRecord, load_image, scan_image_set
from datamodules.stream import IndexedStream, collate, pass_order_index, stream_position
from diffusion.backbone import Backbone
from diffusion.inversion import Trajectory, invert_image
from utils.errors import DataError
from utils.io import read_json, write_safetensors

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when what a cache file holds changes


def read_prompts(path: Path, records: Sequence[ImageRecord]) -> list[str]:
    """Each image's source prompt from a JSON file {image stem: prompt}."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; add a JSON file mapping each image's stem to its source prompt")
    prompts = read_json(path, DataError)
    if not isinstance(prompts, dict):
        raise DataError(f"{path} must hold one JSON object {{image stem: source prompt}}")
    out = []
    for r in records:
        text = prompts.get(r.image.stem)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} has no source prompt for image {r.image.name}; add \"{r.image.stem}\": \"...\"")
        out.append(text)
    return out


def cache_key(image_bytes: bytes, prompt: str, settings: dict) -> str:
    """sha256 of the image file's bytes, the prompt and the settings that change the inversion."""
    h = hashlib.sha256(image_bytes)
    h.update(json.dumps({"prompt": prompt, **settings}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_cached(path: Path) -> Trajectory | None:
    """The cached trajectory at `path`, or None when there is none or it is unreadable."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        log.warning("unreadable trajectory cache %s (%s); inverting again", path, e)
        return None
    return Trajectory(tensors["latents"], tensors["maps"])


class TrajectoryDataModule(L.LightningDataModule):
    """Streams (image, source prompt, DDIM trajectory, inverted maps) samples of a few real images."""

    def __init__(self, images_dir: str, model_path: str, cache_dir: str, resolution: int,
                 prompts_file: str | None = None, num_steps: int = 30, map_resolution: int = 16,
                 map_blocks: Sequence[str] = ("down", "up"), encode_seed: int = 0, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.records: list[ImageRecord] | None = None
        self.prompts: list[str] = []
        self.images: list[torch.Tensor] = []
        self.trajectories: list[Trajectory] | None = None

    @property
    def resolution(self) -> int:
        return self.hparams.resolution

    @property
    def prompts_path(self) -> Path:
        hp = self.hparams
        if hp.prompts_file:
            return Path(hp.prompts_file).expanduser()
        return Path(hp.images_dir).expanduser() / "prompts.json"

    def setup(self, stage: str | None = None) -> None:
        """Read and check the images and prompts (no model needed); `prepare` inverts them."""
        if self.records is None:
            hp = self.hparams
            records = scan_image_set(hp.images_dir, min_size=hp.resolution)
            self.prompts = read_prompts(self.prompts_path, records)
            self.images = [load_image(r.image, hp.resolution) for r in records]
            self.records = records
            log.info("trajectories: %d images from %s", len(records), hp.images_dir)

    def settings(self, backbone: Backbone) -> dict:
        """What, besides the image and prompt, decides an inversion (the cache key's settings)."""
        hp = self.hparams
        return {"format": CACHE_FORMAT, "model_path": str(hp.model_path), "num_steps": hp.num_steps,
                "resolution": hp.resolution, "map_resolution": hp.map_resolution,
                "map_blocks": list(hp.map_blocks), "encode_seed": hp.encode_seed, "dtype": str(backbone.dtype)}

    def cache_path(self, index: int, backbone: Backbone) -> Path:
        record = self.records[index]
        key = cache_key(record.image.read_bytes(), self.prompts[index], self.settings(backbone))
        return Path(self.hparams.cache_dir).expanduser() / f"{record.image.stem}-{key[:16]}.safetensors"

    def prepare(self, backbone: Backbone) -> None:
        """Load every image's trajectory from the cache, inverting (and caching) the missing ones."""
        self.setup()
        hp = self.hparams
        trajectories, inverted = [], 0
        for i, record in enumerate(self.records):
            path = self.cache_path(i, backbone)
            trajectory = load_cached(path)
            if trajectory is None:
                trajectory = invert_image(backbone, self.images[i], self.prompts[i], hp.num_steps,
                                          hp.map_resolution, hp.map_blocks, hp.encode_seed)
                write_safetensors(path, {"latents": trajectory.latents, "maps": trajectory.maps},
                                  metadata={"image": record.image.name, "prompt": self.prompts[i],
                                            **{k: str(v) for k, v in self.settings(backbone).items()}})
                inverted += 1
            trajectories.append(trajectory)
        self.trajectories = trajectories
        log.info("trajectories: %d inverted, %d read from %s", inverted, len(trajectories) - inverted, hp.cache_dir)

    def item(self, k: int) -> dict:
        """Sample k: images visited in a fresh random order each pass."""
        i = pass_order_index(self.hparams.seed, k, len(self.records))
        trajectory = self.trajectories[i]
        return {"index": i, "prompt": self.prompts[i], "pixel_values": self.images[i],
                "latents": trajectory.latents, "maps": trajectory.maps}

    def train_dataloader(self) -> DataLoader:
        if self.trajectories is None:
            raise RuntimeError("TrajectoryDataModule.prepare(backbone) was not called; the LightningModule "
                               "calls it from on_fit_start")
        start, rank, world = stream_position(self.trainer)
        stream = IndexedStream(self.item, self.hparams.batch_size, start, rank, world)
        return DataLoader(stream, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, collate_fn=collate)
