"""Shapes-world measures as torchmetrics Metrics: attribute accuracy, concept identity, size slope, the
read object area and background brightness, mask IoU.

Each keeps sums (or, for the size slope, the raw readings) as metric states, so under DDP every
rank updates with its share of the images and `compute` returns the value of the whole set. The
probe that reads images is held outside the metric's state_dict: a metric never carries weights
into a checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from datamodules.shapes.world import Badge, Scene
from metrics.base import PerImageMean
from metrics.shapes_probes import ShapesProbe, default_probe, estimate_background, score_readings

ATTRIBUTES = ("background", "count", "shape", "colour", "texture", "size")


class _ProbeMetric(Metric):
    full_state_update = False

    def __init__(self, probe: ShapesProbe | None = None, **kwargs):
        super().__init__(**kwargs)
        # a plain attribute, not a submodule: the probe's weights stay out of state_dict and checkpoints
        self.__dict__["probe"] = probe

    @property
    def reader(self) -> ShapesProbe:
        return self.__dict__["probe"] or default_probe()

    @staticmethod
    def _pixels(images: torch.Tensor) -> torch.Tensor:
        return images.detach().float().cpu().clamp(0, 1)


class ShapesAttributeAccuracy(_ProbeMetric):
    """Share of images (background, count) and of stated objects (shape, colour, texture, size word)
    that the probes read as the scenes' captions say; see `score_readings(caption_only=True)`."""

    def __init__(self, probe: ShapesProbe | None = None, **kwargs):
        super().__init__(probe, **kwargs)
        for name in ATTRIBUTES:
            self.add_state(f"{name}_right", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, scenes: Sequence[Scene]) -> None:
        scores = score_readings(self.reader.read(self._pixels(images)), scenes, caption_only=True)
        for name in ATTRIBUTES:
            stated = scores[name][~scores[name].isnan()].double()
            setattr(self, f"{name}_right", getattr(self, f"{name}_right") + stated.sum().to(self.device))
            setattr(self, f"{name}_total", getattr(self, f"{name}_total") + float(len(stated)))

    def compute(self) -> dict[str, torch.Tensor]:
        return {name: (getattr(self, f"{name}_right") / getattr(self, f"{name}_total")).float()
                for name in ATTRIBUTES}


class ConceptIdentity(_ProbeMetric):
    """Mean graded similarity of each image's concept object to a concept, and the strict match rate
    (`ShapesProbe.concept_scores`)."""

    def __init__(self, concept: Badge | str, probe: ShapesProbe | None = None, **kwargs):
        super().__init__(probe, **kwargs)
        self.concept = concept
        self.add_state("similarity", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("matches", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor) -> None:
        pixels = self._pixels(images)
        similarity, match = self.reader.concept_scores(pixels, self.concept)  # one segmentation for both
        self.similarity += similarity.double().sum().to(self.device)
        self.matches += match.double().sum().to(self.device)
        self.total += float(len(pixels))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"identity": (self.similarity / self.total).float(),
                "identity_match": (self.matches / self.total).float()}


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties); 0 when either is constant."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = v.argsort()
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum() / denominator if denominator > 0 else torch.zeros((), dtype=torch.float64)


class SizeSlope(_ProbeMetric):
    """How the read area of an image's first object follows a swept parameter (a size slider's alpha).

    update(images, scenes, values, groups): `groups` ties the images of one sweep (the same prompt
    and seed); compute returns the mean over groups of the Spearman correlation between value and
    read area (a missing object reads as area 0), and the mean area per distinct value.
    """

    def __init__(self, probe: ShapesProbe | None = None, **kwargs):
        super().__init__(probe, **kwargs)
        for name in ("groups", "values", "areas"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, scenes: Sequence[Scene], values: Sequence[float],
               groups: Sequence[int]) -> None:
        if not len(images) == len(scenes) == len(values) == len(groups):
            raise ValueError(f"{len(images)} images, {len(scenes)} scenes, {len(values)} values and "
                             f"{len(groups)} groups: give one of each per image")
        readings = self.reader.read(self._pixels(images))
        areas = [r.objects[0].area if r.objects else 0.0 for r in readings]
        self.groups.append(torch.as_tensor(groups, dtype=torch.float64, device=self.device))
        self.values.append(torch.as_tensor(values, dtype=torch.float64, device=self.device))
        self.areas.append(torch.as_tensor(areas, dtype=torch.float64, device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        groups, values, areas = (torch.cat(s) if isinstance(s, list) else s
                                 for s in (self.groups, self.values, self.areas))
        correlations = [spearman(values[groups == g], areas[groups == g]) for g in groups.unique()]
        out = {"spearman": torch.stack(correlations).mean().float()}
        for v in values.unique().tolist():
            out[f"area@{v:g}"] = areas[values == v].mean().float()
        return out


class ShapesReadout(_ProbeMetric):
    """What a slider moves, read without a prompt to judge against: the mean read area of each image's
    first object (0 when none is read) and the mean background brightness (the border's median colour,
    averaged over RGB, in [0, 1]). Composing sliders compares these between their settings."""

    def __init__(self, probe: ShapesProbe | None = None, **kwargs):
        super().__init__(probe, **kwargs)
        for name in ("area", "background_brightness", "total"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor) -> None:
        pixels = self._pixels(images)
        areas = [r.objects[0].area if r.objects else 0.0 for r in self.reader.read(pixels)]
        self.area += torch.tensor(areas, dtype=torch.float64).sum().to(self.device)
        self.background_brightness += estimate_background(pixels).double().mean(1).sum().to(self.device)
        self.total += float(len(pixels))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"area": (self.area / self.total).float(),
                "background_brightness": (self.background_brightness / self.total).float()}


class MaskIoU(PerImageMean):
    """Mean per-image intersection over union of binary masks [B, H, W] (two empty masks: IoU 1)."""

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, masks: torch.Tensor, targets: torch.Tensor) -> None:
        if masks.shape != targets.shape:
            raise ValueError(f"masks {tuple(masks.shape)} and targets {tuple(targets.shape)} differ in shape")
        a, b = (m.flatten(1) > self.threshold for m in (masks.float(), targets.float()))
        inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
        self.add(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
