"""Image sets: folder validation, items (masks, pairs, flips, determinism), the indexed stream, the data module."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from datamodules.image_set import ImageSet, ImageSetDataModule, scan_image_set
from datamodules.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES, resolve_templates
from datamodules.stream import IndexedStream, item_generator
from utils.errors import ConfigError, DataError

TEMPLATES = ("a photo of {}", "a painting of {}")


# ----- helpers ------------------------------------------------------------------------------------
def index_item(k: int) -> dict:
    """A picklable make_item for stream tests."""
    return {"k": k}


def stream_batches(stream: IndexedStream, n: int, workers: int = 0) -> list[list[int]]:
    """The sample indices of the first n batches a DataLoader draws from the stream."""
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)
    it = iter(loader)
    out = [batch["k"].tolist() for batch in itertools.islice(it, n)]
    del it  # shuts the workers down
    return out


def add_pairs(folder: Path) -> Path:
    """A paired folder holding the colour-inverted image of every image."""
    pairs = folder / "pairs"
    pairs.mkdir()
    for p in sorted((folder / "images").glob("*.png")):
        with Image.open(p) as im:
            ImageOps.invert(im.convert("RGB")).save(pairs / p.name)
    return pairs


def make_set(folder: Path, flip_p: float = 0.5, seed: int = 0, resolution: int = 64, pairs: bool = False) -> ImageSet:
    pair_dirs = [add_pairs(folder)] if pairs else []
    records = scan_image_set(folder / "images", folder / "masks", pair_dirs, min_size=resolution)
    return ImageSet(records, resolution, TEMPLATES, "<t>", flip_p=flip_p, seed=seed)


def same_item(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a)


def scan_error(*args, **kwargs) -> str:
    """The one-line message of the DataError scan_image_set raises."""
    with pytest.raises(DataError) as info:
        scan_image_set(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----- scanning -----------------------------------------------------------------------------------
def test_scan_lists_images_masks_and_pairs(image_folder):
    """Images are sorted; hidden and non-image files are skipped; masks may use any image suffix."""
    (image_folder / "images" / "notes.txt").write_text("not an image")
    shutil.copy(image_folder / "images" / "00.png", image_folder / "images" / ".hidden.png")
    with Image.open(image_folder / "masks" / "03.png") as m:
        m.convert("RGB").save(image_folder / "masks" / "03.jpg")
    (image_folder / "masks" / "03.png").unlink()
    pairs = add_pairs(image_folder)
    records = scan_image_set(image_folder / "images", image_folder / "masks", [pairs], min_size=64)
    assert [r.image.name for r in records] == ["00.png", "01.png", "02.png", "03.png"]
    assert [r.mask.name for r in records] == ["00.png", "01.png", "02.png", "03.jpg"]
    assert [r.pairs for r in records] == [(pairs / f"{i:02d}.png",) for i in range(4)]
    assert all(r.mask is None and r.pairs == () for r in scan_image_set(image_folder / "images"))


@pytest.mark.parametrize("images_dir", [None, ""])
def test_scan_unset_dir(images_dir):
    """An unset images_dir names the key."""
    assert scan_error(images_dir) == "data.images_dir is not set; point it at a folder of images"


def test_scan_missing_dir_and_file(tmp_path):
    """A missing folder and a file both say 'is not a folder', with the key and path."""
    missing = tmp_path / "nope"
    assert scan_error(missing) == f"data.images_dir={missing} is not a folder; point it at a folder of images"
    file = tmp_path / "a.png"
    file.write_bytes(b"")
    assert scan_error(file, key="concept.images") == (
        f"concept.images={file} is not a folder; point it at a folder of images")


def test_scan_empty_folder(tmp_path):
    """A folder without images (only other files) is refused."""
    (tmp_path / "readme.txt").write_text("x")
    assert scan_error(tmp_path).startswith(f"data.images_dir={tmp_path} has no images (.png, .jpg")


def test_scan_unreadable_image(image_folder):
    """Garbage bytes in x.png: 'cannot read image' with the file."""
    bad = image_folder / "images" / "x.png"
    bad.write_bytes(b"\x89PNG garbage bytes")
    assert scan_error(image_folder / "images") == (
        f"cannot read image {bad} (UnidentifiedImageError); remove or replace the file")


def test_scan_too_small(image_folder):
    """An image below min_size names both sizes."""
    message = scan_error(image_folder / "images", min_size=100)
    assert message == (f"image {image_folder / 'images' / '00.png'} is 80x80, smaller than the model resolution 100; "
                       f"use images of at least 100px on the short side")


def test_scan_missing_mask(image_folder):
    """An image without a mask names the image and the masks folder."""
    (image_folder / "masks" / "02.png").unlink()
    masks = image_folder / "masks"
    assert scan_error(image_folder / "images", masks) == (
        f"no mask for 02.png in {masks}; masks need the image's file name (any image suffix)")


def test_scan_missing_masks_dir(image_folder):
    """A missing masks folder names data.masks_dir."""
    missing = image_folder / "no_masks"
    assert scan_error(image_folder / "images", missing).startswith(f"data.masks_dir={missing} is not a folder")


def test_scan_pair_missing_file(image_folder):
    """A paired folder lacking one image's file names both; a missing paired folder names its index."""
    pairs = add_pairs(image_folder)
    (pairs / "01.png").unlink()
    assert scan_error(image_folder / "images", None, [pairs]) == (
        f"{pairs} has no 01.png; paired folders need a file of the same name for every image")
    assert scan_error(image_folder / "images", None, [pairs, image_folder / "gone"]).startswith(
        f"data.pair_dirs[1]={image_folder / 'gone'} is not a folder")


# ----- items --------------------------------------------------------------------------------------
def test_item_contents(image_folder):
    """Items hold [3,64,64] pixels in [-1,1], a binary [1,64,64] mask, pair_0, the formatted prompt."""
    images = make_set(image_folder, flip_p=0.0, pairs=True)
    prompts = set()
    for k in range(8):
        item = images(k)
        assert item.keys() == {"pixel_values", "prompt", "index", "image_key", "mask", "pair_0"}
        assert item["image_key"] == str(item["index"])  # flip_p 0: never flipped
        px, mask = item["pixel_values"], item["mask"]
        assert px.shape == (3, 64, 64) and px.dtype == torch.float32
        assert px.min() >= -1 and px.max() <= 1
        assert mask.shape == (1, 64, 64)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert item["pair_0"].shape == (3, 64, 64)
        assert torch.allclose(item["pair_0"], -px, atol=2 / 127.5)  # the inverted image of the same index
        assert torch.equal(px, images.images[item["index"]])
        prompts.add(item["prompt"])
    assert prompts == {"a photo of <t>", "a painting of <t>"}


def red(px: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: pixels of the red disc (red high, green low)."""
    return (px[0] > 0.4) & (px[1] < -0.5)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_mask_aligned_with_image(image_folder, flip_p):
    """The disc's red pixels lie inside the mask, and the mask is mostly disc, flipped or not."""
    images = make_set(image_folder, flip_p=flip_p)
    for k in range(4):
        item = images(k)
        disc, mask = red(item["pixel_values"]), item["mask"][0].bool()
        assert disc.sum() > 500
        assert mask[disc].all()
        assert (disc & mask).sum() >= 0.9 * mask.sum()


def test_flip_applies_to_image_mask_and_pairs(image_folder):
    """A flipped item is the unflipped one mirrored, for image, mask and pair alike."""
    plain = make_set(image_folder, flip_p=0.0, pairs=True)
    shutil.rmtree(image_folder / "pairs")
    flipped = make_set(image_folder, flip_p=1.0, pairs=True)
    for k in range(4):
        a, b = plain(k), flipped(k)
        assert a["index"] == b["index"] and a["prompt"] == b["prompt"]
        assert b["image_key"] == a["image_key"] + "f"  # the key names the pixels: a flip is other pixels
        for key in ("pixel_values", "mask", "pair_0"):
            assert torch.equal(b[key], a[key].flip(-1))
            assert not torch.equal(b[key], a[key])  # the discs are off-centre, so a flip shows


def test_flip_probability(image_folder):
    """flip_p=0.5 flips about half of the items."""
    images = make_set(image_folder, flip_p=0.5)
    flips = sum(not torch.equal(images(k)["pixel_values"], images.images[images(k)["index"]]) for k in range(200))
    assert 70 < flips < 130


def test_items_are_deterministic(image_folder):
    """Item k is a pure function of (seed, k): same on repeat and on a fresh set; another seed differs."""
    a = make_set(image_folder)
    b = make_set(image_folder)
    assert all(same_item(a(k), a(k)) and same_item(a(k), b(k)) for k in range(12))
    other = make_set(image_folder, seed=1)
    assert [a(k)["index"] for k in range(12)] != [other(k)["index"] for k in range(12)]


def test_each_pass_visits_every_image_once(image_folder):
    """Any n consecutive items starting at a pass boundary hold each image once, in a fresh order per pass."""
    images = make_set(image_folder)
    n = len(images)
    orders = [[images(k)["index"] for k in range(p * n, (p + 1) * n)] for p in range(6)]
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert len({tuple(o) for o in orders}) > 1


# ----- the stream ---------------------------------------------------------------------------------
def test_stream_batches_are_consecutive():
    """Batch s of a single-rank stream holds samples s*B .. s*B+B-1."""
    assert stream_batches(IndexedStream(index_item, 3), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_stream_resume():
    """A stream started at batch s yields exactly the tail of one started at 0."""
    full = stream_batches(IndexedStream(index_item, 4), 10)
    for s in (1, 3, 7):
        assert stream_batches(IndexedStream(index_item, 4, start_batch=s), 10 - s) == full[s:]


def test_stream_ranks_split_the_global_batch():
    """Two ranks get disjoint samples that together cover each global batch."""
    b = 3
    r0 = stream_batches(IndexedStream(index_item, b, rank=0, world_size=2), 5)
    r1 = stream_batches(IndexedStream(index_item, b, rank=1, world_size=2), 5)
    for step, (x, y) in enumerate(zip(r0, r1)):
        assert not set(x) & set(y)
        assert sorted(x + y) == list(range(step * 2 * b, (step + 1) * 2 * b))
    resumed = stream_batches(IndexedStream(index_item, b, start_batch=2, rank=1, world_size=2), 3)
    assert resumed == r1[2:]


@pytest.mark.parametrize("start, rank, world", [(0, 0, 1), (5, 1, 2)])
def test_stream_workers_keep_the_order(start, rank, world):
    """With two DataLoader workers the batches come in the same order as without workers."""
    single = stream_batches(IndexedStream(index_item, 2, start, rank, world), 7)
    multi = stream_batches(IndexedStream(index_item, 2, start, rank, world), 7, workers=2)
    assert multi == single


def test_item_generator():
    """Generators are seeded by (seed, index): equal inputs agree, different ones differ."""
    def draw(seed, index):
        return torch.rand(4, generator=item_generator(seed, index))
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    assert draw(3, -1).shape == (4,)  # negative indices (per-pass orders) are valid seeds


# ----- the data module ----------------------------------------------------------------------------
def data_module(folder: Path, **kwargs) -> ImageSetDataModule:
    args = dict(images_dir=str(folder / "images"), token="<t>", resolution=64, templates=list(TEMPLATES),
                masks_dir=str(folder / "masks"), batch_size=2)
    return ImageSetDataModule(**{**args, **kwargs})


def test_data_module_batches(image_folder):
    """setup + train_dataloader give batches of batch_size with pixels, masks and prompts."""
    dm = data_module(image_folder, batch_size=3)
    dm.setup("fit")
    image_set = dm.image_set
    dm.setup("fit")
    assert dm.image_set is image_set and len(image_set) == 4
    loader = dm.train_dataloader()
    batches = list(itertools.islice(iter(loader), 3))
    for batch in batches:
        assert batch["pixel_values"].shape == (3, 3, 64, 64)
        assert batch["mask"].shape == (3, 1, 64, 64)
        assert len(batch["prompt"]) == 3 and all(p.endswith("<t>") for p in batch["prompt"])
        # host lists: as tensors they would go to the GPU with the batch, and reading them back makes the host wait
        assert len(batch["index"]) == 3 and all(type(i) is int for i in batch["index"])
    assert torch.equal(batches[1]["pixel_values"][0], image_set(3)["pixel_values"])


def test_data_module_resumes_from_trainer_step(image_folder):
    """Under a trainer the stream starts at global_step * accumulate_grad_batches, on this rank's slice."""
    dm = data_module(image_folder)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, global_rank=1, world_size=2)
    stream = dm.train_dataloader().dataset
    assert (stream.start_batch, stream.rank, stream.world_size, stream.batch_size) == (6, 1, 2, 2)
    first = next(iter(dm.train_dataloader()))
    assert first["index"] == [dm.image_set(k)["index"] for k in (26, 27)]  # (6*2+1)*2


def test_data_module_setup_checks_the_folder(image_folder):
    """setup fails at once on images smaller than the resolution."""
    dm = data_module(image_folder, resolution=96)
    with pytest.raises(DataError, match="is 80x80, smaller than the model resolution 96"):
        dm.setup("fit")


def test_data_module_named_templates(image_folder):
    """A template set name resolves at construction."""
    assert data_module(image_folder, templates="style").templates == STYLE_TEMPLATES


# ----- templates ----------------------------------------------------------------------------------
def test_named_templates():
    """'object' and 'style' resolve to their sets, each template with one '{}'."""
    assert resolve_templates("object") == OBJECT_TEMPLATES
    assert resolve_templates("style") == STYLE_TEMPLATES
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert resolve_templates(["x {}"]) == ("x {}",)


@pytest.mark.parametrize("templates, message", [
    ("objects", r"data\.templates='objects' is unknown; use one of \['object', 'style'\], 'captions'"),
    ([], r"data\.templates is empty; give at least one template with '\{\}'"),
    (["a photo of it"], r"template 'a photo of it' must contain exactly one '\{\}' where the token goes"),
    (["{} and {}"], r"template '\{\} and \{\}' must contain exactly one '\{\}'"),
])
def test_template_errors(templates, message):
    """Unknown names, empty lists and templates without exactly one '{}' are ConfigErrors."""
    with pytest.raises(ConfigError, match=message):
        resolve_templates(templates)


def test_data_module_rejects_bad_templates(image_folder):
    """A bad template fails when the data module is built."""
    with pytest.raises(ConfigError, match="must contain exactly one"):
        data_module(image_folder, templates=["no slot"])


# ----- per-image captions -------------------------------------------------------------------------
def test_captions_give_each_image_its_own_prompt(image_folder):
    """templates=captions: every image is always paired with its own caption from captions.json."""
    folder = image_folder / "images"
    stems = sorted(p.stem for p in folder.glob("*.png"))
    (folder / "captions.json").write_text(json.dumps({s: f"a {{}} numbered {s}" for s in stems}))
    dm = data_module(image_folder, templates="captions", flip_p=0.0)
    dm.setup("fit")
    for k in range(12):
        item = dm.image_set(k)
        assert item["prompt"] == f"a <t> numbered {stems[item['index']]}"


@pytest.mark.parametrize("content, message", [
    (None, "data.templates=captions needs .*captions.json"),
    ("{not json", "is not valid JSON"),
    ('{"00": "no slot here"}', "needs a caption with exactly one '\\{\\}' for image"),
])
def test_caption_errors(image_folder, content, message):
    """A missing, unreadable or incomplete captions.json fails at setup with the file and image named."""
    if content is not None:
        (image_folder / "images" / "captions.json").write_text(content)
    dm = data_module(image_folder, templates="captions")
    with pytest.raises(DataError, match=message):
        dm.setup("fit")
