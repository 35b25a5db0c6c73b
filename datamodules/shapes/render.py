"""Render shapes-world scenes: exact inside tests on a supersampled grid, averaged to the output size.

Everything is torch, so the same code renders a test image on the CPU and a training batch on
the GPU. Masks are the objects' visible coverage (later objects occlude earlier ones).
`render_scene` draws one scene; `render_tensors` draws a batch of `scene_tensor` rows at once, with the
same shape and texture definitions and the same float32 arithmetic.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from datamodules.shapes.world import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, ObjectSpec, Scene

TEXTURE_PERIOD = 0.1  # of the image side
EMBLEM_SCALE = 0.5  # a badge's inner emblem, relative to its outer shape


def _polygon(u, v, sides: int, circumradius: float, first_normal_deg: float) -> torch.Tensor:
    inside = torch.ones_like(u, dtype=torch.bool)
    for k in range(sides):
        a = math.radians(first_normal_deg + 360.0 * k / sides)
        inside &= u * math.cos(a) + v * math.sin(a) <= circumradius * math.cos(math.pi / sides)
    return inside


def _star(u, v, points: int = 5, outer: float = 1.15, inner: float = 0.5) -> torch.Tensor:
    """A straight-edged star: fold the angle into half a sector and test against one edge."""
    r = torch.sqrt(u * u + v * v)
    sector = 2 * math.pi / points
    t = torch.remainder(torch.atan2(v, u) + math.pi / 2, sector)  # 0 at a point, which faces up
    phi = torch.minimum(t, sector - t)
    qx, qy = r * torch.cos(phi), r * torch.sin(phi)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    side = (bx - ax) * (qy - ay) - (by - ay) * (qx - ax)
    origin_side = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return side * origin_side >= 0


def inside_shape(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of a unit-radius shape at object coordinates (u right, v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.82
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.15
    if shape == "triangle":  # pointing up
        return _polygon(u, v + 0.2, 3, 1.25, 90.0)
    if shape == "hexagon":
        return _polygon(u, v, 6, 1.0, 0.0)
    if shape == "star":
        return _star(u, v)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "cross":
        return ((u.abs() <= 0.36) & (v.abs() <= 1.0)) | ((v.abs() <= 0.36) & (u.abs() <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, pu: torch.Tensor, pv: torch.Tensor, period: float) -> torch.Tensor:
    """Where the secondary shade shows; pu, pv are object-frame offsets in pixels."""
    if texture == "plain":
        return torch.zeros_like(pu, dtype=torch.bool)
    a, b = pu / period, pv / period
    if texture == "striped":
        return torch.remainder(a, 1.0) < 0.5
    if texture == "dotted":
        da, db = torch.remainder(a, 1.0) - 0.5, torch.remainder(b, 1.0) - 0.5
        return da * da + db * db < 0.3 ** 2
    if texture == "checkered":
        return torch.remainder(torch.floor(a) + torch.floor(b), 2) == 0
    raise ValueError(f"unknown texture {texture!r}")


def colour_tensor(name: str, table: dict, device) -> torch.Tensor:
    return torch.tensor(table[name], dtype=torch.float32, device=device) / 255.0


def secondary_shade(rgb: torch.Tensor) -> torch.Tensor:
    """Texture shade of [..., 3] colours: darker for light colours, lighter for dark ones."""
    luminance = (rgb * rgb.new_tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    target = (luminance <= 0.3).to(rgb.dtype)  # black above 0.3, white at or below
    return rgb + 0.55 * (target - rgb)


def _object_frame(xs, ys, cx, cy, cos_a, sin_a):
    """Pixel offsets (pu right, pv down) in an object's rotated frame. The centre and angle are floats
    (one object) or [N, 1, 1] tensors (a batch): the float32 arithmetic is the same either way."""
    dx, dy = xs - cx, ys - cy
    return dx * cos_a + dy * sin_a, -dx * sin_a + dy * cos_a


def _object_layers(obj: ObjectSpec, xs: torch.Tensor, ys: torch.Tensor, side: float):
    """(coverage, colour image) layers of one object on the supersampled grid, back to front."""
    a = math.radians(obj.angle)
    radius = obj.size * side
    pu, pv = _object_frame(xs, ys, obj.x * side, obj.y * side, math.cos(a), math.sin(a))
    u, v = pu / radius, pv / radius
    device = xs.device
    if obj.badge is not None:
        outer = inside_shape(obj.badge.outer, u, v)
        inner = inside_shape(obj.badge.inner, u / EMBLEM_SCALE, v / EMBLEM_SCALE)
        return [(outer, colour_tensor(obj.badge.outer_colour, COLOURS, device).view(3, 1, 1).expand(3, *u.shape)),
                (inner & outer, colour_tensor(obj.badge.inner_colour, COLOURS, device).view(3, 1, 1).expand(3, *u.shape))]
    main = colour_tensor(obj.colour, COLOURS, device)
    pattern = _texture(obj.texture, pu, pv, TEXTURE_PERIOD * side)
    colours = torch.where(pattern, secondary_shade(main).view(3, 1, 1), main.view(3, 1, 1))
    return [(inside_shape(obj.shape, u, v), colours)]


@torch.no_grad()
def render_scene(scene: Scene, resolution: int = 64, supersample: int = 4, device="cpu"):
    """(image [3, H, W] in [0, 1], masks [n_objects, H, W] of visible coverage in [0, 1])."""
    side = resolution * supersample
    coords = (torch.arange(side, device=device, dtype=torch.float32) + 0.5)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    image = colour_tensor(scene.background, BACKGROUNDS, device).view(3, 1, 1).expand(3, side, side).clone()
    owner = torch.full((side, side), -1, dtype=torch.long, device=device)
    for i, obj in enumerate(scene.objects):
        layers = _object_layers(obj, xs, ys, side)
        for inside, colours in layers:
            image = torch.where(inside, colours, image)
        owner = torch.where(layers[0][0], i, owner)  # the first layer is the object's outline
    image = F.avg_pool2d(image[None], supersample)[0]
    masks = torch.stack([(owner == i).float() for i in range(len(scene.objects))])
    masks = F.avg_pool2d(masks[:, None], supersample)[:, 0]
    return image.clamp(0, 1), masks


def pad_masks(masks: torch.Tensor, slots: int = 2) -> torch.Tensor:
    """[n, H, W] object masks -> [slots, H, W], zeros for absent objects (so batches stack)."""
    padded = masks.new_zeros(slots, *masks.shape[1:])
    padded[: len(masks)] = masks
    return padded


def render_batch(scenes: Sequence[Scene], resolution: int = 64, supersample: int = 4, device="cpu"):
    """Stacked images [B, 3, H, W] and masks [B, 2, H, W] (zeros where a scene has one object)."""
    rendered = [render_scene(scene, resolution, supersample, device) for scene in scenes]
    return torch.stack([image for image, _ in rendered]), torch.stack([pad_masks(m) for _, m in rendered])


# A scene as a fixed-size float32 row: the background index, then SLOTS objects of LAYERS layers (a badge's
# outer shape and inner emblem; a plain object fills only the first), each of LAYER_FIELDS. Indices are into
# SHAPES, COLOURS, TEXTURES and BACKGROUNDS; x, y and radius are fractions of the image side. The angle is
# kept as the cosine and sine `render_scene` rounds to float32, so both renderers agree to the bit.
SLOTS, LAYERS = 2, 2
LAYER_FIELDS = ("valid", "shape", "x", "y", "radius", "cos", "sin", "scale", "colour", "texture")
VALID, SHAPE, X, Y, RADIUS, COS, SIN, SCALE, COLOUR, TEXTURE = range(len(LAYER_FIELDS))
SCENE_TENSOR_SIZE = 1 + SLOTS * LAYERS * len(LAYER_FIELDS)


def _layer_row(obj: ObjectSpec, shape: str, colour: str, texture: str, scale: float) -> list[float]:
    a = math.radians(obj.angle)  # as _object_layers
    return [1.0, SHAPES.index(shape), obj.x, obj.y, obj.size, math.cos(a), math.sin(a), scale,
            list(COLOURS).index(colour), TEXTURES.index(texture)]


def scene_tensor(scene: Scene) -> torch.Tensor:
    """[SCENE_TENSOR_SIZE] float32 description of a scene for `render_tensors` (DataLoaders stack them)."""
    if len(scene.objects) > SLOTS:
        raise ValueError(f"a scene tensor holds at most {SLOTS} objects, this scene has {len(scene.objects)}")
    layers = [[0.0] * len(LAYER_FIELDS) for _ in range(SLOTS * LAYERS)]  # absent: valid = 0
    for i, obj in enumerate(scene.objects):
        b = obj.badge
        if b is None:
            layers[i * LAYERS] = _layer_row(obj, obj.shape, obj.colour, obj.texture, 1.0)
        else:  # badges are solid: render_scene ignores their texture
            layers[i * LAYERS] = _layer_row(obj, b.outer, b.outer_colour, "plain", 1.0)
            layers[i * LAYERS + 1] = _layer_row(obj, b.inner, b.inner_colour, "plain", EMBLEM_SCALE)
    row = [list(BACKGROUNDS).index(scene.background)] + [value for layer in layers for value in layer]
    return torch.tensor(row, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _palette(device: torch.device) -> torch.Tensor:
    """[len(BACKGROUNDS) + 2 * len(COLOURS), 3]: backgrounds, colours, then their texture shades; built once per
    device. Compositing picks palette entries, so the batch's pixels are exactly render_scene's."""
    colours = torch.stack([colour_tensor(name, COLOURS, device) for name in COLOURS])
    backgrounds = torch.stack([colour_tensor(name, BACKGROUNDS, device) for name in BACKGROUNDS])
    return torch.cat([backgrounds, colours, secondary_shade(colours)])


def _runs(keys: torch.Tensor, names: Sequence[str]):
    """(name, start, end) of each name's run in sorted CPU keys, for the names that occur."""
    counts = torch.bincount(keys, minlength=len(names)).tolist()
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [(name, end - count, end) for name, count, end in zip(names, counts, ends) if count]


def _layer_masks(layers: torch.Tensor, keys: torch.Tensor, coords: torch.Tensor, side: int):
    """(coverage, texture pattern), both [N, S, S] bool, of N present layers sorted by shape, whose (shape,
    texture) indices are the CPU `keys` [N, 2]: each shape's and texture's one definition runs once, on the
    layers that have it."""
    n = len(layers)
    cx, cy, radius, cos_a, sin_a, scale = layers[:, [X, Y, RADIUS, COS, SIN, SCALE]].T.reshape(6, n, 1, 1)
    # a row of xs and a column of ys: dx * cos etc. are [N, 1, S] or [N, S, 1], only the sums are [N, S, S]
    pu, pv = _object_frame(coords.view(1, side), coords.view(side, 1), cx * side, cy * side, cos_a, sin_a)
    u, v = pu / (radius * side * scale), pv / (radius * side * scale)  # scale is 1 or 0.5: exactly u / 0.5
    inside = torch.cat([inside_shape(name, u[a:b], v[a:b]) for name, a, b in _runs(keys[:, 0], SHAPES)])
    pattern = torch.zeros_like(inside)
    for k, name in enumerate(TEXTURES):
        rows = (keys[:, 1] == k).nonzero().flatten().to(coords.device, non_blocking=True)
        if len(rows):  # index_select: far faster than pu[rows] on the CPU
            pus, pvs = pu.index_select(0, rows), pv.index_select(0, rows)
            pattern.index_copy_(0, rows, _texture(name, pus, pvs, TEXTURE_PERIOD * side))
    return inside, pattern


@torch.no_grad()
def render_tensors(params: torch.Tensor, resolution: int = 64, supersample: int = 2):
    """`render_batch` of `scene_tensor` rows [B, SCENE_TENSOR_SIZE] on their device: (images [B, 3, H, W] in
    [0, 1], masks [B, SLOTS, H, W] of visible coverage, zeros for absent objects)."""
    device, side, b = params.device, resolution * supersample, len(params)
    layers = params.float()[:, 1:].reshape(b * SLOTS * LAYERS, len(LAYER_FIELDS))
    keys = layers[:, [VALID, SHAPE, TEXTURE]].long().cpu()  # the one synchronisation: what to draw where
    order = keys[:, 1].argsort(stable=True)  # present layers grouped by shape
    order = order[keys[order, 0] > 0]
    present = order.to(device, non_blocking=True)
    inside = torch.zeros(len(layers), side, side, dtype=torch.bool, device=device)
    pattern = torch.zeros_like(inside)
    if len(order):  # absent layers cover nothing
        coords = torch.arange(side, device=device, dtype=torch.float32) + 0.5
        covered, textured = _layer_masks(layers[present], keys[order, 1:], coords, side)
        inside.index_copy_(0, present, covered)
        pattern.index_copy_(0, present, textured)
    inside, pattern = inside.view(b, SLOTS, LAYERS, side, side), pattern.view(b, SLOTS, LAYERS, side, side)
    # palette entry of every pixel, in uint8 (26 entries) to keep the compositing's memory traffic low
    colour = (len(BACKGROUNDS) + layers[:, COLOUR]).to(torch.uint8).view(b, SLOTS, LAYERS, 1, 1)
    shade = colour + len(COLOURS)
    index = params[:, 0].to(torch.uint8).view(b, 1, 1).expand(b, side, side)
    owner = torch.full((b, side, side), -1, dtype=torch.int8, device=device)
    drawn = keys[:, 0].view(b, SLOTS, LAYERS).any(0).tolist()  # skip layers no scene of the batch has
    for slot in range(SLOTS):  # back to front, every scene in lockstep
        outline = inside[:, slot, 0]
        for k in range(LAYERS):
            if drawn[slot][k]:
                entry = torch.where(pattern[:, slot, k], shade[:, slot, k], colour[:, slot, k])
                index = torch.where(inside[:, slot, k] & outline, entry, index)  # emblems stay inside the outline
        owner = torch.where(outline, slot, owner)  # the first layer is the object's outline
    pixels = _palette(device).index_select(0, index.flatten().long()).view(b, side, side, 3)
    image = F.avg_pool2d(pixels.permute(0, 3, 1, 2), supersample).contiguous()
    masks = torch.stack([owner == slot for slot in range(SLOTS)], 1).float()
    return image.clamp(0, 1), F.avg_pool2d(masks, supersample)
