"""Render shapes-world scenes: exact inside tests on a supersampled grid, averaged to the output size.

Everything is torch, so the same code renders a test image on the CPU and a training batch on
the GPU. Masks are the objects' visible coverage (later objects occlude earlier ones).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from datamodules.shapes.world import BACKGROUNDS, COLOURS, ObjectSpec, Scene

TEXTURE_PERIOD = 0.1  # of the image side


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
    """Texture shade: darker for light colours, lighter for dark ones."""
    luminance = float((rgb * torch.tensor([0.299, 0.587, 0.114], device=rgb.device)).sum())
    target = torch.zeros_like(rgb) if luminance > 0.3 else torch.ones_like(rgb)
    return rgb + 0.55 * (target - rgb)


def _object_layers(obj: ObjectSpec, xs: torch.Tensor, ys: torch.Tensor, side: float):
    """(coverage, colour image) layers of one object on the supersampled grid, back to front."""
    a = math.radians(obj.angle)
    radius = obj.size * side
    dx, dy = xs - obj.x * side, ys - obj.y * side
    pu, pv = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
    u, v = pu / radius, pv / radius
    device = xs.device
    if obj.badge is not None:
        outer = inside_shape(obj.badge.outer, u, v)
        inner = inside_shape(obj.badge.inner, u / 0.5, v / 0.5)
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
