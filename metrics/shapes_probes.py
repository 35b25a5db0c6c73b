"""Read shapes-world images back: background, objects, their attributes and badge identities.

Benchmarks ask whether a generated image shows the scene it was prompted with ("a red star left of a
blue square", "the badge kept its identity"). These probes turn an image into the vocabulary of
`datamodules.shapes.world`, so the answer is a comparison with the ground-truth `Scene`:

1. background: the median border pixel, snapped to the nearest BACKGROUNDS colour;
2. objects (no weights): pixels far from the background or coloured like a texture shade between
   strong pixels, holes filled, split into objects by a distance-transform watershed so that touching
   objects stay apart; a mask keeps the pixels at least half covered, as the renderer's coverage masks do;
3. attributes: a small multi-head CNN on a 32x32 crop around each object (other objects painted out),
   trained on fresh renders under blur, noise and a colour cast so that it also reads generated images.

    python -m metrics.shapes_probes train --out metrics/weights/shapes_probe.safetensors --steps 2000
    python -m metrics.shapes_probes evaluate

Everything is batched torch on the images' device; images are [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from datamodules.shapes.render import inside_shape, render_scene
from datamodules.shapes.world import (BACKGROUNDS, BADGE_SHAPES, COLOURS, CONCEPTS, RELATIONS, SHAPES, SIZES,
                                      TEXTURES, Badge, ObjectSpec, Scene, SceneSampler, concept_scene)
from utils.errors import ArtifactError
from utils.io import write_json, write_safetensors
from utils.morphology import dilate, erode, fill_holes, reconstruct, until_stable

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_probe.safetensors"
TRAIN_COMMAND = "python -m metrics.shapes_probes train --out {path} --steps 2000"

# Segmentation. Colour distances are Euclidean in RGB [0, 1]; an object differs from its background by
# at least MIN_CONTRAST / 255 = 0.35.
FOREGROUND = 0.1         # distance, after a 3x3 mean that tames noise, above which a pixel is foreground
STRONG = 0.25            # a pixel this far from the background surely belongs to an object
SHADE_TOLERANCE = 0.08   # how close a pixel must be to the texture shade of a strong neighbour
MARKER_DEPTH = 2         # distance-transform dip (px) that separates two touching objects
MIN_AREA = 0.004         # objects smaller than this fraction of the image are specks
# Classification.
CROP = 32                # crop side fed to the CNN
CROP_MARGIN = 1.3        # crop side / longest bbox side: some context around the object
HEADS = {
    "shape": SHAPES + ("badge",), "colour": tuple(COLOURS), "texture": TEXTURES,
    "outer": BADGE_SHAPES, "outer_colour": tuple(COLOURS), "inner": SHAPES, "inner_colour": tuple(COLOURS),
}
BADGE_HEADS = ("outer", "outer_colour", "inner", "inner_colour")  # the fields of a `Badge`
# Training: what separates a generated image from a render, and how the crop may be off.
MAX_BLUR, MAX_NOISE, MAX_CAST = 1.0, 0.05, 0.05  # gaussian sigma (px), noise std, per-channel colour offset
SCALE_JITTER, SHIFT_JITTER = 0.1, 0.05            # crop side x (1 +- 0.1), centre +- 0.05 side
CONCEPT_P = 0.08                                   # share of training scenes that show a held-out concept


# ----- results --------------------------------------------------------------------------------------
@dataclass
class ObjectReading:
    shape: str                # one of SHAPES, or "badge"
    colour: str               # main colour (a badge's outer colour)
    texture: str
    area: float               # fraction of the image the object covers (pixels at least half covered)
    x: float                  # centroid, as a fraction of the width (0 = left)
    y: float                  # centroid, as a fraction of the height (0 = top)
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions
    size: float               # radius / image side of a whole `shape` (a badge's outer shape) of this area
    badge: Badge | None = None

    @property
    def size_word(self) -> str:
        """The SIZES bin nearest the read size (the bins have gaps; a size in a gap goes to the closer bin)."""
        return min(SIZES, key=lambda w: max(SIZES[w][0] - self.size, self.size - SIZES[w][1], 0.0))


@dataclass
class SceneReading:
    background: str
    objects: list[ObjectReading]  # largest first


@dataclass
class Segmentation:
    background: torch.Tensor  # [B, 3] estimated background colour
    masks: torch.Tensor       # [B, K, H, W] bool, objects largest first; empty slots are all False


# ----- background and objects -----------------------------------------------------------------------
def estimate_background(images: torch.Tensor, border: int = 2) -> torch.Tensor:
    """[B, 3] median of the border pixels: objects seldom reach the border, and the median ignores them."""
    ring = torch.ones(images.shape[-2:], dtype=torch.bool, device=images.device)
    ring[border:-border, border:-border] = False
    return images[:, :, ring].median(dim=2).values


def _nearest(colours: torch.Tensor, table: dict[str, tuple[int, int, int]]) -> list[str]:
    reference = torch.tensor(list(table.values()), dtype=colours.dtype, device=colours.device) / 255
    return [list(table)[i] for i in torch.cdist(colours, reference).argmin(1).tolist()]


def background_colour(images: torch.Tensor) -> list[str]:
    """The BACKGROUNDS entry nearest each image's estimated background colour."""
    return _nearest(estimate_background(images), BACKGROUNDS)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] Euclidean RGB distance (spelled out: much faster than Tensor.norm over dim 1 on the CPU)."""
    return (a - b).square().sum(1, keepdim=True).sqrt()


def _shade(rgb: torch.Tensor) -> torch.Tensor:
    """render.secondary_shade per pixel ([B, 3, H, W]): darker for light colours, lighter for dark ones."""
    luminance = (rgb * rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return rgb + 0.55 * ((luminance <= 0.3).to(rgb.dtype) - rgb)


def _between(strong: torch.Tensor, reach: int = 3) -> torch.Tensor:
    """Pixels with a strong pixel within `reach` px on both sides along a row, column or diagonal: inside a
    texture gap, not on the background beside an object."""
    h, w = strong.shape[-2:]
    padded = F.pad(strong.float(), (reach,) * 4)

    def ray(dy: int, dx: int) -> torch.Tensor:
        shifted = [padded[..., reach + k * dy: reach + k * dy + h, reach + k * dx: reach + k * dx + w]
                   for k in range(1, reach + 1)]
        return torch.stack(shifted).amax(0) > 0

    directions = ((0, 1), (1, 0), (1, 1), (1, -1))
    return functools.reduce(torch.logical_or, (ray(dy, dx) & ray(-dy, -dx) for dy, dx in directions))


def _texture_shade(images: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Pixels coloured like the texture shade of a strong pixel within 3 px, between strong pixels. Some
    shades are nearly the background (blue stripes on navy, white ones on gray): without this their stripes
    would cut the object apart and leave its area short."""
    _, at = F.max_pool2d(distance, 7, 1, 3, return_indices=True)
    main = images.flatten(2).gather(2, at.flatten(2).expand(-1, 3, -1)).view_as(images)
    return _between(distance > STRONG) & (_distance(images, _shade(main)) < SHADE_TOLERANCE)


def _watershed(region: torch.Tensor) -> torch.Tensor:
    """Label map [B, 1, H, W] (0 = background) with touching objects split.

    One marker per dome of the distance transform rising MARKER_DEPTH above the saddle to any higher dome
    (h-maxima), grown back over the region: a single shape (star, cross, heart) has one such dome, two
    touching shapes have one each, joined by a narrow neck.
    """
    inside = region > 0
    depth, layer = torch.zeros_like(region), region
    while layer.any():
        depth, layer = depth + layer, erode(layer)
    domes = torch.where(inside, reconstruct(depth - MARKER_DEPTH, depth), -1.0)
    markers = inside & (domes > reconstruct(domes - 1, domes))  # regional maxima of the flattened domes
    h, w = region.shape[-2:]
    ids = torch.arange(1, h * w + 1, dtype=region.dtype, device=region.device).view(1, 1, h, w).expand_as(region)
    labels = until_stable(lambda x: torch.where(markers, dilate(x), x), torch.where(markers, ids, 0.0))
    return until_stable(lambda x: torch.where(inside & (x == 0), dilate(x), x), labels)


def _half_covered(distance: torch.Tensor, region: torch.Tensor, shade: torch.Tensor) -> torch.Tensor:
    """Pixels at least half-way from the background to the object colour next to them, as a renderer mask
    >= 0.5 would hold; the region's core (emblems, texture shades) and texture shades always count."""
    core = erode(region)
    nearby = F.max_pool2d(distance * core, 5, 1, 2)
    return (core > 0) | shade | ((nearby > 0) & (distance >= 0.5 * nearby))


def segment(images: torch.Tensor) -> Segmentation:
    """Background colour and object masks of a batch (see the module docstring)."""
    background = estimate_background(images)
    bg = background[:, :, None, None]
    distance = _distance(images, bg)
    smooth = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    shade = _texture_shade(images, distance)
    region = fill_holes(((_distance(smooth, bg) > FOREGROUND) | shade).to(images.dtype))
    labels = _watershed(region)
    labels = torch.where(labels == 0, dilate(labels), labels)  # the anti-aliased rim joins its object
    labels = labels * _half_covered(distance, region, shade)
    return Segmentation(background, _split_labels(labels[:, 0]))


def _split_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, H, W] label maps -> [B, K >= 1, H, W] masks, largest first, specks dropped."""
    per_image = []
    for label in labels:
        ids, counts = label.unique(return_counts=True)
        keep = (ids > 0) & (counts >= MIN_AREA * label.numel())
        order = torch.sort(counts[keep], descending=True, stable=True).indices
        per_image.append(label[None] == ids[keep][order][:, None, None])
    slots = max(1, *(len(m) for m in per_image))
    masks = labels.new_zeros((len(labels), slots, *labels.shape[1:]), dtype=torch.bool)
    for b, m in enumerate(per_image):
        masks[b, : len(m)] = m
    return masks


def object_masks(images: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] bool masks of the objects (pixels at least half covered), largest first, empty slots False."""
    return segment(images).masks


def _geometry(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Area, centroid and bbox ([..., 4]: x0, y0, x1, y1) of masks [..., H, W], all as fractions of the image."""
    h, w = masks.shape[-2:]
    m = masks.float()
    area = m.sum((-2, -1))
    xs = (torch.arange(w, device=m.device) + 0.5) / w
    ys = (torch.arange(h, device=m.device) + 0.5) / h
    rows, cols = masks.any(-1), masks.any(-2)
    bbox = torch.stack([cols.float().argmax(-1) / w, rows.float().argmax(-1) / h,
                        1 - cols.flip(-1).float().argmax(-1) / w, 1 - rows.flip(-1).float().argmax(-1) / h], -1)
    return {"area": area / (h * w), "x": (m.sum(-2) * xs).sum(-1) / area.clamp(min=1),
            "y": (m.sum(-1) * ys).sum(-1) / area.clamp(min=1), "bbox": bbox}


@functools.cache
def unit_area(shape: str) -> float:
    """Area of a unit-radius shape in the renderer's geometry: turns a read area back into a size."""
    t = (torch.arange(1024) + 0.5) / 256 - 2  # [-2, 2]
    v, u = torch.meshgrid(t, t, indexing="ij")
    return inside_shape(shape, u, v).float().mean().item() * 16


# ----- crops ----------------------------------------------------------------------------------------
def crop_objects(images: torch.Tensor, own: torch.Tensor, others: torch.Tensor, background: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, 3, CROP, CROP] square crops around each object.

    images [N, 3, H, W] hold one object each (own [N, H, W]); the pixels of other objects (others [N, H, W],
    grown by a pixel) are painted with the background [N, 3] so that a neighbour cannot be read instead.
    The crop is sampled at twice CROP and averaged down, so large objects do not alias their textures.
    With a generator, the crop's scale and centre are jittered (training).
    """
    n, _, h, w = images.shape
    spill = dilate(others[:, None].float())[:, 0].bool() & ~own
    painted = torch.where(spill[:, None], background[:, :, None, None], images)
    box = _geometry(own)["bbox"] * torch.tensor([w, h, w, h], device=images.device)
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    side = torch.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) * CROP_MARGIN + 2
    if generator is not None:
        jitter = (torch.rand(3, n, generator=generator) * 2 - 1).to(images.device)
        side = side * (1 + SCALE_JITTER * jitter[0])
        cx, cy = cx + SHIFT_JITTER * side * jitter[1], cy + SHIFT_JITTER * side * jitter[2]
    t = (torch.arange(2 * CROP, device=images.device) + 0.5) / (2 * CROP) - 0.5
    gx = ((cx[:, None] + side[:, None] * t) / w * 2 - 1)[:, None, :].expand(-1, 2 * CROP, -1)
    gy = ((cy[:, None] + side[:, None] * t) / h * 2 - 1)[:, :, None].expand(-1, -1, 2 * CROP)
    crops = F.grid_sample(painted, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                          align_corners=False)
    return F.avg_pool2d(crops, 2)


# ----- the classifier -------------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ShapesProbe(nn.Module):
    """A small CNN on object crops with one linear head per attribute in HEADS, and the readers built on it."""

    def __init__(self, widths: Sequence[int] = (24, 48, 96)):
        super().__init__()
        a, b, c = widths
        self.widths = tuple(widths)
        self.features = nn.Sequential(
            *_conv(3, a), *_conv(a, a), nn.MaxPool2d(2), *_conv(a, b), *_conv(b, b), nn.MaxPool2d(2),
            *_conv(b, c), nn.MaxPool2d(2), *_conv(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(c, len(classes)) for name, classes in HEADS.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for crops [N, 3, CROP, CROP] in [0, 1]."""
        features = self.features(crops - 0.5)
        return {name: head(features) for name, head in self.heads.items()}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- files
    def save(self, path: str | Path, info: dict) -> None:
        """Weights (fp16: half the size, no measurable accuracy cost) and a JSON of classes and `info`."""
        write_safetensors(path, {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()})
        write_json(Path(path).with_suffix(".json"), {"classes": HEADS, "widths": self.widths, **info})

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesProbe:
        """The probe saved at `path` (default: the weights shipped in metrics/weights/), in eval mode."""
        path = Path(path or DEFAULT_WEIGHTS)
        if not path.is_file():
            raise ArtifactError(f"shapes probe weights not found at {path}; train them with: "
                                f"{TRAIN_COMMAND.format(path=path)}")
        info = json.loads(path.with_suffix(".json").read_text())
        if {k: tuple(v) for k, v in info["classes"].items()} != HEADS:
            raise ArtifactError(f"{path} was trained for other classes than the shapes world's; retrain it with: "
                                f"{TRAIN_COMMAND.format(path=path)}")
        probe = cls(info["widths"])
        probe.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
        return probe.to(device).eval()

    # --- readers
    @torch.no_grad()
    def classify(self, images: torch.Tensor, masks: torch.Tensor, background: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per head, [B, K, classes], of each object in masks [B, K, H, W] (zeros: empty slot)."""
        images, masks, background = images.to(self.device), masks.to(self.device), background.to(self.device)
        b, k = masks.any((-2, -1)).nonzero(as_tuple=True)
        out = {name: images.new_zeros(*masks.shape[:2], len(classes)) for name, classes in HEADS.items()}
        if len(b):
            crops = crop_objects(images[b], masks[b, k], masks[b].any(1) & ~masks[b, k], background[b])
            for name, logits in self(crops).items():
                out[name][b, k] = logits.float().softmax(-1)
        return out

    def read(self, images: torch.Tensor) -> list[SceneReading]:
        """What each image shows, in the world's vocabulary."""
        seg = segment(images)
        probs = {name: p.argmax(-1).tolist() for name, p in self.classify(images, seg.masks, seg.background).items()}
        geometry = {name: g.tolist() for name, g in _geometry(seg.masks).items()}
        readings = []
        for b, background in enumerate(_nearest(seg.background, BACKGROUNDS)):
            objects = []
            for k in range(int(seg.masks[b].any((-2, -1)).sum())):
                label = {name: HEADS[name][probs[name][b][k]] for name in HEADS}
                badge = Badge(*(label[name] for name in BADGE_HEADS)) if label["shape"] == "badge" else None
                area = geometry["area"][b][k]
                outline = badge.outer if badge else label["shape"]
                objects.append(ObjectReading(label["shape"], label["colour"], label["texture"], area,
                                             geometry["x"][b][k], geometry["y"][b][k], tuple(geometry["bbox"][b][k]),
                                             (area / unit_area(outline)) ** 0.5, badge))
            readings.append(SceneReading(background, objects))
        return readings

    def concept_scores(self, images: torch.Tensor, concept: Badge | str) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] graded identity, [B] strict match) of each image's concept object, read once: among the objects
        read as badges, the one most like the concept (a prompt may put it beside other objects, larger ones too:
        "a small <concept> right of a large pink cross"); the largest object when none reads as a badge.

        The graded identity is the mean, over the four badge attributes (outer, outer_colour, inner,
        inner_colour), of the probability the classifier gives the reference value: 1 for a clean render of that
        badge, about 0.75 with one attribute surely wrong, 0.5 with two, and 0 for an image with no object; graded
        rather than all-or-nothing, so that partial identity loss shows. The strict match: all four read as the
        reference's.
        """
        badge = CONCEPTS[concept] if isinstance(concept, str) else concept
        seg = segment(images)
        probs = self.classify(images, seg.masks, seg.background)  # [B, K, classes]; the others get painted out
        reference = {name: HEADS[name].index(getattr(badge, name)) for name in BADGE_HEADS}
        scores = torch.stack([probs[name][..., index] for name, index in reference.items()]).mean(0)
        exists = seg.masks.flatten(2).any(-1).to(self.device)
        badges = exists & (probs["shape"].argmax(-1) == HEADS["shape"].index("badge"))
        best = scores.masked_fill(~badges, -1.0).argmax(1)
        chosen = torch.where(badges.any(1), best, torch.zeros_like(best))  # slot 0: the largest object
        rows = torch.arange(len(chosen), device=chosen.device)
        present = exists[:, 0]
        match = present.clone()
        for name, index in reference.items():
            match &= probs[name][rows, chosen].argmax(-1) == index
        return scores[rows, chosen] * present, match

    def concept_identity(self, images: torch.Tensor, concept: Badge | str) -> torch.Tensor:
        """[B] graded identity in [0, 1] of each image's concept object to a badge (`concept_scores`)."""
        return self.concept_scores(images, concept)[0]

    def identity_match(self, images: torch.Tensor, concept: Badge | str) -> torch.Tensor:
        """[B] bool: the concept object's four badge attributes all read as the reference's (`concept_scores`)."""
        return self.concept_scores(images, concept)[1]

    def attribute_accuracy(self, images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        """Per-attribute correctness of images against the scenes they should show (see `score_readings`)."""
        return score_readings(self.read(images), scenes)


# ----- scoring against ground truth -----------------------------------------------------------------
def match_objects(reading: SceneReading, scene: Scene) -> list[int | None]:
    """For each object of `scene`, the index of the read object standing for it (None: missing).

    The largest len(scene.objects) read objects count. Two objects pair up by their order along the
    relation's axis (x for left/right, y for above/below), so a swapped pair reads as wrong attributes;
    a lone read object stands for the scene object nearest it along that axis.
    """
    found = list(range(min(len(reading.objects), len(scene.objects))))
    if len(scene.objects) == 1:
        return found or [None]
    axis = "y" if scene.relation and RELATIONS[scene.relation][0] == 0 else "x"
    wanted = sorted(range(len(scene.objects)), key=lambda i: getattr(scene.objects[i], axis))
    found.sort(key=lambda j: getattr(reading.objects[j], axis))
    if len(found) == len(scene.objects):
        by_order = dict(zip(wanted, found))
        return [by_order[i] for i in range(len(scene.objects))]
    pairs: list[int | None] = [None] * len(scene.objects)
    for j in found:
        at = getattr(reading.objects[j], axis)
        pairs[min(wanted, key=lambda i: abs(getattr(scene.objects[i], axis) - at))] = j
    return pairs


def expected_area(spec: ObjectSpec) -> float:
    """Area fraction of a whole object of this shape and size (occlusion and the image border can cut it)."""
    return unit_area(spec.badge.outer if spec.badge else spec.shape) * spec.size ** 2


def score_readings(readings: Sequence[SceneReading], scenes: Sequence[Scene],
                   caption_only: bool = False) -> dict[str, torch.Tensor]:
    """Correctness (1/0) of readings against ground-truth scenes, and the read sizes.

    Per image: "background", "count". Per scene object (objects matched by `match_objects`; a missing one
    is wrong): "shape", "colour", "texture", "size" (the read size's SIZES bin), "area" (read area, 0 when
    missing) and "expected_area" (`expected_area`). Per badge object: "outer", "outer_colour", "inner",
    "inner_colour" (wrong unless the object reads as a badge).

    An attribute a parsed caption leaves unstated (None, see `parse_caption`) scores NaN.
    caption_only: judge a generated image by what its caption states. A plain caption names a badge only by
    its class word and size, so a badge's colour and texture score NaN and its badge attributes are left
    out (use nanmean); a badge named part by part (`parts_named`) is scored on all of them. The renders'
    full ground truth is for judging the probes themselves.
    """
    keys = ("background", "count", "shape", "colour", "texture", "size", "area", "expected_area", *BADGE_HEADS)
    out: dict[str, list[float]] = {key: [] for key in keys}
    for reading, scene in zip(readings, scenes, strict=True):
        out["background"].append(reading.background == scene.background)
        out["count"].append(len(reading.objects) == len(scene.objects))
        for spec, j in zip(scene.objects, match_objects(reading, scene)):
            got = reading.objects[j] if j is not None else None
            unstated = caption_only and spec.badge is not None and not spec.parts_named
            for name in ("shape", "colour", "texture"):
                wanted = getattr(spec, name)
                right = got is not None and getattr(got, name) == wanted
                out[name].append(math.nan if (unstated and name != "shape") or wanted is None else right)
            out["size"].append(math.nan if spec.size is None else got is not None and got.size_word == spec.size_word)
            out["area"].append(got.area if got is not None else 0.0)
            known = spec.size is not None and (spec.badge is not None or spec.shape != "badge")
            out["expected_area"].append(expected_area(spec) if known else math.nan)
            if spec.badge is not None and not unstated:
                for name in BADGE_HEADS:
                    read = got.badge if got is not None else None
                    out[name].append(read is not None and getattr(read, name) == getattr(spec.badge, name))
    return {key: torch.tensor(values, dtype=torch.float32) for key, values in out.items()}


# ----- module-level readers with the shipped probe --------------------------------------------------
@functools.lru_cache(maxsize=4)
def default_probe(device: str = "cpu") -> ShapesProbe:
    """The shipped probe, loaded once per device."""
    return ShapesProbe.load(device=device)


def read_scene(images: torch.Tensor, probe: ShapesProbe | None = None) -> list[dict]:
    """Per image {"background", "objects": [{"shape", "colour", "texture", "area", "x", "y", "bbox", "size",
    "badge": {outer, outer_colour, inner, inner_colour} or None}, ...]}, objects largest first."""
    return [asdict(r) for r in (probe or default_probe(str(images.device))).read(images)]


def concept_identity(images: torch.Tensor, concept: Badge | str, probe: ShapesProbe | None = None) -> torch.Tensor:
    """[B] graded identity of the concept object (the badge most like it) to a badge or concept name
    (ShapesProbe.concept_identity)."""
    return (probe or default_probe(str(images.device))).concept_identity(images, concept)


def identity_match(images: torch.Tensor, concept: Badge | str, probe: ShapesProbe | None = None) -> torch.Tensor:
    """[B] bool: the concept object reads as exactly that badge (ShapesProbe.identity_match)."""
    return (probe or default_probe(str(images.device))).identity_match(images, concept)


def attribute_accuracy(images: torch.Tensor, scenes: Sequence[Scene],
                       probe: ShapesProbe | None = None) -> dict[str, torch.Tensor]:
    """Per-attribute correctness of images against their ground-truth scenes (see `score_readings`)."""
    return (probe or default_probe(str(images.device))).attribute_accuracy(images, scenes)


# ----- training -------------------------------------------------------------------------------------
def probe_sampler() -> SceneSampler:
    """Training and evaluation scenes: more badges and textures than the diffusion training data, and the
    held-out concepts allowed, so that every head sees plenty of its classes."""
    return SceneSampler(two_object_p=0.4, badge_p=0.35, texture_p=0.5, held_out=())


def sample_scenes(count: int, seed: int) -> list[Scene]:
    rng, sampler = random.Random(seed), probe_sampler()
    return [concept_scene(rng.choice(list(CONCEPTS)), rng) if rng.random() < CONCEPT_P else sampler.sample(rng)
            for _ in range(count)]


def targets(spec: ObjectSpec) -> list[int]:
    """Class indices per head (HEADS order) of a scene object; -1 for the badge heads of a plain shape."""
    label = {"shape": spec.shape, "colour": spec.colour, "texture": spec.texture}
    if spec.badge is not None:
        label.update(asdict(spec.badge))
    return [HEADS[name].index(label[name]) if name in label else -1 for name in HEADS]


@dataclass
class Pool:
    """Pre-rendered training objects: augmentation and cropping happen per batch."""

    images: torch.Tensor   # [S, 3, H, W] uint8
    owners: torch.Tensor   # [S, H, W] uint8: 0 background, k + 1 where object k is at least half covered
    objects: torch.Tensor  # [N, 2] (scene index, owner value)
    targets: torch.Tensor  # [N, len(HEADS)]


def build_pool(scenes: int, seed: int) -> Pool:
    """Render `scenes` scenes once (rendering is the slow part); masks at half coverage, as `segment` finds them."""
    images, owners, objects, labels = [], [], [], []
    for s, scene in enumerate(sample_scenes(scenes, seed)):
        image, masks = render_scene(scene)
        images.append((image * 255).round().to(torch.uint8))
        owners.append(torch.stack([(m >= 0.5) * (k + 1) for k, m in enumerate(masks)]).amax(0))
        for k, spec in enumerate(scene.objects):
            if (masks[k] >= 0.5).float().mean() >= MIN_AREA:  # skip objects hidden behind the other one
                objects.append((s, k + 1))
                labels.append(targets(spec))
    return Pool(torch.stack(images), torch.stack(owners).to(torch.uint8), torch.tensor(objects), torch.tensor(labels))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What separates a generated image from a render: blur, a colour cast, noise (up to the MAX_* constants)."""
    n, c, h, w = images.shape
    sigma = (torch.rand(n, generator=generator) * MAX_BLUR).clamp(min=1e-3)
    kernel = torch.exp(-0.5 * (torch.arange(-2.0, 3.0) / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 1, 1, 5)
    x = F.pad(images, (2, 2, 2, 2), mode="replicate")
    x = sum(kernel[..., i] * x[..., i:i + w] for i in range(5))  # per-image separable gaussian
    x = sum(kernel[..., i] * x[..., i:i + h, :] for i in range(5))
    cast = (torch.rand(n, c, 1, 1, generator=generator) * 2 - 1) * MAX_CAST
    noise = torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * MAX_NOISE
    return (x + cast + noise).clamp(0, 1)


def pool_batch(pool: Pool, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented crops [N, 3, CROP, CROP] and targets [N, heads] of the pool objects at `index`."""
    scene, owner = pool.objects[index].unbind(1)
    images = augment(pool.images[scene].float() / 255, generator)
    owners = pool.owners[scene]
    own = owners == owner[:, None, None]
    crops = crop_objects(images, own, (owners > 0) & ~own, estimate_background(images), generator)
    return crops, pool.targets[index]


def train(steps: int, scenes: int = 14000, seed: int = 0, batch_size: int = 128, lr: float = 3e-3,
          log: Callable[[str], None] = print) -> ShapesProbe:
    """Train a probe from scratch on a fresh pool of renders; deterministic for a seed and thread count."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    pool = build_pool(scenes, seed)
    log(f"pool: {len(pool.objects)} objects from {scenes} scenes in {time.time() - start:.0f}s")
    probe = ShapesProbe().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        index = torch.randint(len(pool.objects), (batch_size,), generator=generator)
        crops, target = pool_batch(pool, index, generator)
        logits = probe(crops.contiguous(memory_format=torch.channels_last))
        loss = sum(F.cross_entropy(logits[name], target[:, i], ignore_index=-1)
                   for i, name in enumerate(HEADS) if (target[:, i] >= 0).any())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    return probe.eval()


# ----- evaluation -----------------------------------------------------------------------------------
def evaluate(probe: ShapesProbe, scenes: int = 2000, seed: int = 1000, degrade: bool = False,
             batch_size: int = 250) -> dict[str, float]:
    """Accuracy per attribute on fresh renders (objects matched as in `score_readings`), plus the mean absolute
    error of area and centroid against the renderer's own coverage masks. `degrade` applies the training
    augmentation to the renders first (blur, colour cast, noise)."""
    generator = torch.Generator().manual_seed(seed)
    specs = sample_scenes(scenes, seed)
    scores: dict[str, list[torch.Tensor]] = {}
    area_errors, centroid_errors = [], []
    for start in range(0, scenes, batch_size):
        batch = specs[start:start + batch_size]
        rendered = [render_scene(scene) for scene in batch]
        images = torch.stack([image for image, _ in rendered])
        if degrade:
            images = augment(images, generator)
        readings = probe.read(images)
        for name, value in score_readings(readings, batch).items():
            scores.setdefault(name, []).append(value)
        for reading, scene, (_, masks) in zip(readings, batch, rendered):
            truth = _geometry(masks >= 0.5)
            coverage = masks.sum((-2, -1)) / masks[0].numel()
            for k, j in enumerate(match_objects(reading, scene)):
                if j is not None and coverage[k] > 0:
                    got = reading.objects[j]
                    area_errors.append(abs(got.area - coverage[k].item()))
                    centroid_errors.append(torch.hypot(got.x - truth["x"][k], got.y - truth["y"][k]).item())
    merged = {name: torch.cat(values) for name, values in scores.items()}
    names = ("background", "count", "shape", "colour", "texture", *BADGE_HEADS, "size")
    return {**{name: merged[name].mean().item() for name in names}, "scenes": scenes, "objects": len(merged["shape"]),
            "badges": len(merged["outer"]), "area_mae": sum(area_errors) / len(area_errors),
            "centroid_mae": sum(centroid_errors) / len(centroid_errors)}


def _format(result: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a probe and save it with its measured accuracy")
    p_train.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    p_train.add_argument("--steps", type=int, default=2000)
    p_train.add_argument("--scenes", type=int, default=14000, help="pre-rendered training scenes")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--eval-scenes", type=int, default=2000)
    p_eval = sub.add_parser("evaluate", help="accuracy of saved weights on fresh renders")
    p_eval.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p_eval.add_argument("--scenes", type=int, default=2000)
    p_eval.add_argument("--seed", type=int, default=1000, help="training used 0; train reports seed + 1000")
    for p in (p_train, p_eval):
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (more stall on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "train":
        start = time.time()
        probe = train(args.steps, args.scenes, args.seed)
        probe.save(args.out, {"train": {"steps": args.steps, "scenes": args.scenes, "seed": args.seed,
                                        "threads": args.threads, "seconds": round(time.time() - start)}})
        # measure what was saved (fp16 weights) on scenes drawn with another seed than training's
        path, seed = Path(args.out), args.seed + 1000
        probe = ShapesProbe.load(path)
        accuracy = {"seed": seed, **{name: evaluate(probe, args.eval_scenes, seed, degrade)
                                     for name, degrade in (("clean", False), ("degraded", True))}}
        info = json.loads(path.with_suffix(".json").read_text())
        write_json(path.with_suffix(".json"), {**info, "accuracy": accuracy})
    else:
        probe = ShapesProbe.load(args.weights)
        accuracy = {name: evaluate(probe, args.scenes, args.seed, degrade)
                    for name, degrade in (("clean", False), ("degraded", True))}
    for name in ("clean", "degraded"):
        print(f"{name}: {_format(accuracy[name])}")


if __name__ == "__main__":
    main()
