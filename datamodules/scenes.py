"""Scenes for learning several concepts at once: images, the concepts each illustrates, optional masks.

Layout: `scenes_dir/scenes.json`, a list with one entry per image:

    {"image": "00.png", "concepts": ["<c0>", "<c1>", "<bg>"],
     "background": "<bg>",                         # optional: which concept is the background
     "masks": {"<c0>": "00_c0.png", ...}}          # optional, white = the concept

A concept may appear in several images. Masks are read only by the ground-truth baseline and for
measuring mask IoU. Everything is checked at setup, so a bad folder fails at once naming the file.
The stream yields one scene per step (a fresh random order each pass, a random horizontal flip);
which of its concepts a step trains is the module's choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.image_set import load_image, load_mask
from datamodules.stream import IndexedStream, collate, item_generator, pass_order_index, stream_position
from utils.errors import DataError
from utils.io import read_json

log = logging.getLogger(__name__)
SCENES_FILE = "scenes.json"


@dataclass
class SceneRecord:
    image: Path
    concepts: tuple[str, ...]
    masks: dict[str, Path] = field(default_factory=dict)
    background: str | None = None


def scan_scenes(scenes_dir: str | Path) -> list[SceneRecord]:
    root = Path(scenes_dir)
    index = root / SCENES_FILE
    if not index.is_file():
        raise DataError(f"{index} not found; a scenes folder holds {SCENES_FILE} (see datamodules/scenes.py)")
    entries = read_json(index, DataError)
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{index} must be a non-empty list of scenes")
    records = []
    for k, entry in enumerate(entries):
        where = f"{index} entry {k}"
        unknown = set(entry) - {"image", "concepts", "background", "masks", "attributes"}
        if unknown:
            raise DataError(f"{where}: unknown key {sorted(unknown)[0]!r}; use image, concepts, background, masks, "
                            f"attributes")
        if "image" not in entry or not entry.get("concepts"):
            raise DataError(f"{where}: needs 'image' and a non-empty 'concepts' list")
        concepts = tuple(entry["concepts"])
        if len(set(concepts)) != len(concepts):
            raise DataError(f"{where}: a concept is listed twice in {list(concepts)}")
        image = root / entry["image"]
        if not image.is_file():
            raise DataError(f"{where}: image {image} not found")
        masks = {}
        for token, name in (entry.get("masks") or {}).items():
            if token not in concepts:
                raise DataError(f"{where}: mask for {token!r}, which is not among its concepts {list(concepts)}")
            masks[token] = root / name
            if not masks[token].is_file():
                raise DataError(f"{where}: mask {masks[token]} not found")
        background = entry.get("background")
        if background is not None and background not in concepts:
            raise DataError(f"{where}: background {background!r} is not among its concepts {list(concepts)}")
        records.append(SceneRecord(image, concepts, masks, background))
    return records


def concept_tokens(records: list[SceneRecord]) -> list[str]:
    """Every concept of the scenes, in order of first appearance."""
    return list(dict.fromkeys(t for r in records for t in r.concepts))


class SceneSet:
    """Scenes held in memory: images [3, r, r] in [-1, 1] and ground-truth masks {token: [r, r]}."""

    def __init__(self, records: list[SceneRecord], resolution: int, flip_p: float = 0.5, seed: int = 0):
        self.records, self.flip_p, self.seed = records, flip_p, seed
        self.images = [load_image(r.image, resolution) for r in records]
        self.masks = [{t: load_mask(p, resolution)[0] for t, p in r.masks.items()} for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, k: int) -> dict:
        i = pass_order_index(self.seed, k, len(self.records))
        flip = bool(torch.rand((), generator=item_generator(self.seed, k)) < self.flip_p)
        image = self.images[i].flip(-1) if flip else self.images[i]
        return {"pixel_values": image, "index": i, "flip": flip}


class SceneDataModule(L.LightningDataModule):
    def __init__(self, scenes_dir: str, resolution: int, flip_p: float = 0.5, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.scenes: SceneSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.scenes is None:
            hp = self.hparams
            records = scan_scenes(hp.scenes_dir)
            self.scenes = SceneSet(records, hp.resolution, hp.flip_p, hp.seed)
            log.info("scenes: %d images, concepts %s, from %s", len(records), concept_tokens(records), hp.scenes_dir)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = stream_position(self.trainer)
        stream = IndexedStream(self.scenes, 1, start, rank, world)  # one scene per step, as Break-a-Scene
        return DataLoader(stream, batch_size=1, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, collate_fn=collate)
