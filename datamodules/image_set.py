"""A folder of concept images (optional masks and paired folders) streamed with prompt templates.

Layout: `images_dir/*.png|jpg|...`; optional `masks_dir/<same stem>.png` (white = concept) and
`pair_dirs` (each holding a file of the same name per image, e.g. the B side of visual-slider
pairs); with `templates: captions`, `images_dir/captions.json` maps each image's stem to its own
caption, '{}' marking the concept (the shapes world's reference sets describe each render so).
Everything is checked when the data module is set up, so a bad folder fails at once with the
file's name instead of mid-run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from datamodules.prompts import resolve_templates
from datamodules.stream import IndexedStream, collate, item_generator, pass_order_index, stream_position
from utils.errors import DataError
from utils.io import read_json

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageRecord:
    image: Path
    mask: Path | None
    pairs: tuple[Path, ...]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from e


def _check_dir(path: str | Path | None, key: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{key} is not set; point it at a folder of images")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{key}={path} is not a folder; point it at a folder of images")
    return path


def scan_image_set(images_dir, masks_dir=None, pair_dirs: Sequence[str] = (), min_size: int = 0,
                   key: str = "data.images_dir") -> list[ImageRecord]:
    """List and validate the images (and masks, pairs) of a set; raise DataError on any problem."""
    root = _check_dir(images_dir, key)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{key}={root} has no images ({', '.join(IMAGE_SUFFIXES)}); add some or fix the path")
    masks = _check_dir(masks_dir, "data.masks_dir") if masks_dir else None
    pairs = [_check_dir(d, f"data.pair_dirs[{i}]") for i, d in enumerate(pair_dirs or ())]
    records = []
    for f in files:
        size = _open_rgb(f).size
        if min(size) < min_size:
            raise DataError(f"image {f} is {size[0]}x{size[1]}, smaller than the model resolution {min_size}; "
                            f"use images of at least {min_size}px on the short side")
        mask = None
        if masks is not None:
            found = [p for p in masks.glob(f.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise DataError(f"no mask for {f.name} in {masks}; masks need the image's file name (any image suffix)")
            mask = found[0]
            _open_rgb(mask)
        paired = []
        for d in pairs:
            p = d / f.name
            if not p.is_file():
                raise DataError(f"{d} has no {f.name}; paired folders need a file of the same name for every image")
            _open_rgb(p)
            paired.append(p)
        records.append(ImageRecord(f, mask, tuple(paired)))
    return records


def read_captions(images_dir, records: Sequence[ImageRecord]) -> list[str]:
    """Each image's caption template from images_dir/captions.json (stem -> text with one '{}')."""
    path = Path(images_dir) / "captions.json"
    if not path.is_file():
        raise DataError(f"data.templates=captions needs {path} (image stem -> caption with '{{}}'); "
                        f"add it or use a template set such as 'object'")
    captions = read_json(path, DataError)
    out = []
    for r in records:
        text = captions.get(r.image.stem) if isinstance(captions, dict) else None
        if not isinstance(text, str) or text.count("{}") != 1:
            raise DataError(f"{path} needs a caption with exactly one '{{}}' for image {r.image.name}")
        out.append(text)
    return out


def _square(im: Image.Image, resolution: int, resample) -> Image.Image:
    """Resize the short side to `resolution` and center-crop to a square."""
    w, h = im.size
    s = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """[3, r, r] in [-1, 1]: short side resized (bicubic), centre-cropped."""
    return to_tensor(_square(_open_rgb(path), resolution, Image.BICUBIC))


def load_mask(path: Path, resolution: int) -> torch.Tensor:
    """[1, r, r] of 0/1 (1 = object): resized like its image (nearest), thresholded at mid-grey."""
    return (to_tensor(_square(_open_rgb(path), resolution, Image.NEAREST))[:1] > 0).float()


def save_mask(mask: torch.Tensor, path: str | Path) -> None:
    """[H, W] mask (bool, or coverage in [0, 1] taken at 0.5) -> a black/white PNG that `load_mask` reads."""
    Image.fromarray(((mask.float() >= 0.5).cpu().numpy() * 255).astype(np.uint8)).save(path)


def load_reference_set(images_dir, masks_dir=None, resolution: int = 512, key: str = "references"
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A concept's reference images [R, 3, r, r] in [0, 1] (short side resized, centre-cropped) and their
    masks [R, 1, r, r] (1 = object) when a masks folder is given: what CLIP-I and DINO compare with."""
    records = scan_image_set(images_dir, masks_dir, key=key)
    images = (torch.stack([load_image(r.image, resolution) for r in records]) + 1) / 2
    masks = torch.stack([load_mask(r.mask, resolution) for r in records]) if masks_dir is not None else None
    return images, masks


class ImageSet:
    """Decoded, resized images (and masks, pairs) held in memory; items are drawn by index."""

    def __init__(self, records: list[ImageRecord], resolution: int, templates: Sequence[str], token: str,
                 flip_p: float = 0.5, seed: int = 0, captions: Sequence[str] | None = None):
        self.records = records
        self.templates = tuple(templates)
        self.captions = captions  # per-image templates; when given they replace `templates`
        self.token = token
        self.flip_p, self.seed = flip_p, seed
        self.images = [load_image(r.image, resolution) for r in records]
        self.masks = [None if r.mask is None else load_mask(r.mask, resolution) for r in records]
        self.pairs = [[load_image(p, resolution) for p in r.pairs] for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, k: int) -> dict:
        """Sample k: images visited in a fresh random order each pass, a random template and flip."""
        i = pass_order_index(self.seed, k, len(self.records))
        g = item_generator(self.seed, k)
        template = self.templates[int(torch.randint(len(self.templates), (1,), generator=g))]
        if self.captions is not None:
            template = self.captions[i]
        flip = bool(torch.rand((), generator=g) < self.flip_p)
        # image_key names the pixels (image i, flipped or not): trainers keep each one's VAE posterior
        item = {"pixel_values": self.images[i], "prompt": template.format(self.token), "index": i,
                "image_key": f"{i}{'f' if flip else ''}"}
        if self.masks[i] is not None:
            item["mask"] = self.masks[i]
        for j, p in enumerate(self.pairs[i]):
            item[f"pair_{j}"] = p
        if flip:
            item = {k2: v.flip(-1) if torch.is_tensor(v) and v.ndim == 3 else v for k2, v in item.items()}
        return item


class ImageSetDataModule(L.LightningDataModule):
    """Streams (image, prompt) samples of one concept for as many steps as the trainer runs."""

    def __init__(self, images_dir: str, token: str, resolution: int, templates: str | Sequence[str] = "object",
                 masks_dir: str | None = None, pair_dirs: Sequence[str] = (), batch_size: int = 1,
                 num_workers: int = 0, flip_p: float = 0.5, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.templates = ("{}",) if templates == "captions" else resolve_templates(templates)
        self.image_set: ImageSet | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.image_set is None:
            hp = self.hparams
            records = scan_image_set(hp.images_dir, hp.masks_dir, hp.pair_dirs, min_size=hp.resolution)
            captions = read_captions(hp.images_dir, records) if hp.templates == "captions" else None
            self.image_set = ImageSet(records, hp.resolution, self.templates, hp.token, hp.flip_p, hp.seed, captions)
            log.info("image set: %d images from %s", len(records), hp.images_dir)

    def train_dataloader(self) -> DataLoader:
        start, rank, world = stream_position(self.trainer)
        stream = IndexedStream(self.image_set, self.hparams.batch_size, start, rank, world)
        return DataLoader(stream, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0, collate_fn=collate)
