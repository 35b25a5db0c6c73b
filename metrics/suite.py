"""A named set of metrics fed from one batch of samples.

Every metric reads some of a batch's fields; `INPUTS` says which, in the order of its `update`:

    images          generated images [B, 3, H, W] in [0, 1]
    texts           each sample's prompt in plain words (a learned token replaced by its class word)
    references      the concept's reference images [R, 3, H, W] (personalization)
    reference_masks their object masks [R, 1, H, W] (optional; DINO then blacks out the background)
    sources         the image each sample is compared with, [B, 3, H, W] (editing, reconstruction)
    edit_masks      the edited word's region per sample, [B, 1, h, w] (NS-LPIPS)
    scenes          the shapes-world scene each sample's text states
    values, groups  the swept value of each sample and the sweep it belongs to (size slope)
    masks, target_masks  predicted and ground-truth masks (mask IoU)

A batch feeds the metrics whose fields it has (per-value rows of a sweep carry no `values`);
`check` refuses, at the start, a metric that no batch will ever feed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import Metric

from metrics.clip import CLIPImageSimilarity, CLIPTextScore
from metrics.dino import DINOSimilarity, StructureDistance
from metrics.image_quality import NSLPIPS, PSNR, SSIM
from metrics.lpips import LPIPS
from metrics.shapes_metrics import ConceptIdentity, MaskIoU, ShapesAttributeAccuracy, ShapesReadout, SizeSlope
from utils.errors import ConfigError

# most specific class first: NSLPIPS is an LPIPS
INPUTS: list[tuple[type, tuple[str, ...]]] = [
    (CLIPTextScore, ("images", "texts")),
    (CLIPImageSimilarity, ("images", "references")),
    (DINOSimilarity, ("images", "references")),
    (StructureDistance, ("images", "sources")),
    (NSLPIPS, ("images", "sources", "edit_masks")),
    (LPIPS, ("images", "sources")),
    (PSNR, ("images", "sources")),
    (SSIM, ("images", "sources")),
    (ShapesAttributeAccuracy, ("images", "scenes")),
    (ConceptIdentity, ("images",)),
    (ShapesReadout, ("images",)),
    (SizeSlope, ("images", "scenes", "values", "groups")),
    (MaskIoU, ("masks", "target_masks")),
]
OPTIONAL = {DINOSimilarity: {"reference_masks": "reference_masks"}}  # field -> update keyword


def inputs_of(metric: Metric) -> tuple[str, ...]:
    for cls, fields in INPUTS:
        if isinstance(metric, cls):
            return fields
    raise ConfigError(f"{type(metric).__name__} is not an evaluation metric; use one of "
                      f"{', '.join(cls.__name__ for cls, _ in INPUTS)}")


class MetricSuite(nn.Module):
    """Metrics by name. `update(batch, names)` feeds each the fields it reads; `compute(names)` gives flat
    floats ("clip_t", "shapes/background", ...), synced over DDP ranks by torchmetrics. Which metrics
    a batch feeds is decided by its fields (`active`), the same on every rank, so every rank joins
    every sync even when it scored no images."""

    def __init__(self, metrics: Mapping[str, Metric], autocast_bf16: bool = True):
        super().__init__()
        self.metrics = nn.ModuleDict(dict(metrics))
        self.autocast_bf16 = autocast_bf16  # backbones run in bf16 on a GPU; scores are kept in fp32
        for metric in self.metrics.values():
            inputs_of(metric)

    def active(self, fields: set[str]) -> list[str]:
        """The metrics a batch with these fields feeds."""
        return [name for name, metric in self.metrics.items() if set(inputs_of(metric)) <= set(fields)]

    def check(self, fields: set[str]) -> None:
        """Refuse a metric whose fields the evaluation cannot provide, naming what is missing."""
        for name, metric in self.metrics.items():
            missing = [f for f in inputs_of(metric) if f not in fields]
            if missing:
                raise ConfigError(f"metric {name!r} ({type(metric).__name__}) needs {', '.join(missing)}, which this "
                                  f"evaluation does not provide; {HOW_TO_PROVIDE.get(missing[0], 'remove it')}")

    def update(self, batch: Mapping[str, Any], names: list[str]) -> None:
        images = batch.get("images")
        on_gpu = images is not None and images.is_cuda
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and self.autocast_bf16 \
            else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            for name in names:
                metric = self.metrics[name]
                extra = {kw: batch[f] for f, kw in OPTIONAL.get(type(metric), {}).items() if batch.get(f) is not None}
                metric.update(*(batch[f] for f in inputs_of(metric)), **extra)

    def compute(self, names: list[str]) -> dict[str, float]:
        """The named metrics' values (dict-valued ones flattened as name/key). Every rank must call it."""
        out: dict[str, float] = {}
        for name in names:
            with warnings.catch_warnings():  # a rank that scored nothing still syncs; its warning is noise
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                value = self.metrics[name].compute()
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for key, v in items:
                if not math.isnan(v):  # NaN: nothing to score (no prompt stated a colour, say)
                    out[name if key is None else f"{name}/{key}"] = float(f"{float(v):.6g}")  # fp32 noise off
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


HOW_TO_PROVIDE = {
    "references": "give references=<folder of the concept's images>",
    "sources": "give pairs=class_word (compare with the class word's image) or pairs=first_value (with the "
               "sweep's first value)",
    "edit_masks": "NS-LPIPS needs the edited word's attention mask, which editing runs provide",
    "values": "give a sweep (e.g. sweep={guidance_scale:[1,3,7.5]})",
    "groups": "give a sweep",
    "scenes": "use shapes-world prompts (model=shapes)",
    "masks": "mask IoU scores learned masks (EM-mask runs)",
    "target_masks": "mask IoU needs ground-truth masks",
}
