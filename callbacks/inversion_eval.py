"""Evaluation of an inversion run (StyleDiffusion): every inverted image reconstructed and edited, beside
baseline edit methods on the same images, scored against the source image and the captions.

At the end of training, for each image of the run's data (its caption from prompts.json, its edit from the
edits file: {image stem: target prompt}), the module replays its inversion and edits it (P2Plus), and every
baseline (an edit method of conf/edit_method/, e.g. null-text inversion + prompt-to-prompt) inverts and edits
the same image from scratch. Each (method, output) pair is a row of <dirpath>/inversion_metrics.json and .csv:
reconstructions scored against the source image and caption (PSNR, SSIM: StyleDiffusion Table 3), edits
against the source image and the target caption (the probes read whether the edit took and what it kept:
Table 2 on the shapes world). inversion_grid.png shows, per image, the source then each method's
reconstruction and edit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

import lightning as L
import torch
from torchmetrics import Metric

from diffusion.editing import EditMethod, build_method
from metrics.suite import MetricSuite
from utils.errors import ConfigError, DataError
from utils.images import make_grid, save_png
from utils.io import write_json, write_table
from utils.loggers import log_wandb_table

log = logging.getLogger(__name__)
OURS = "style_diffusion"
FIELDS = {"images", "sources", "texts", "scenes"}


def read_edits(path: str | Path | None, stems: list[str]) -> dict[str, str]:
    """{image stem: target prompt} for the given images (an absent file: no edits)."""
    if path is None or not Path(path).is_file():
        return {}
    edits = json.loads(Path(path).read_text())
    if not isinstance(edits, dict) or not all(isinstance(v, str) for v in edits.values()):
        raise DataError(f"{path} must map image names to target prompts, e.g. {{\"00\": \"a blue circle ...\"}}")
    missing = [s for s in stems if s not in edits]
    if missing:
        raise DataError(f"{path} has no target prompt for image {missing[0]!r}; add one per image")
    return {s: edits[s] for s in stems}


class InversionEvaluation(L.Callback):
    def __init__(self, dirpath: str, metrics: Mapping[str, Metric], edits_file: str | None = None,
                 baselines: Mapping[str, EditMethod] | None = None, guidance_scale: float = 7.5, encode_seed: int = 0):
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if not metrics:
            raise ConfigError("the inversion evaluation has no metrics; pick a set, e.g. metrics=shapes_editing")
        self.suite = MetricSuite(metrics)
        self.suite.check(FIELDS)
        self.dirpath, self.edits_file = Path(dirpath), edits_file
        self.baselines = {name: method if isinstance(method, EditMethod) else build_method(method)
                          for name, method in (baselines or {}).items()}
        if OURS in self.baselines:
            raise ConfigError(f"callbacks.inversion_evaluation.baselines.{OURS} is the run's own method; "
                              f"name baselines other than it")
        self.guidance_scale, self.encode_seed = guidance_scale, encode_seed

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        stems = [record.image.stem for record in datamodule.records]
        edits = read_edits(self.edits_file, stems)
        outputs = {name: [] for name in (OURS, *self.baselines)}  # per image: [reconstruction, edit?] in [0, 1]
        for k, stem in enumerate(stems):
            source, target = datamodule.prompts[k], edits.get(stem)
            pixels = datamodule.images[k][None].to(pl_module.device)
            outputs[OURS].append(self.ours(pl_module, stem, target))
            for name, method in self.baselines.items():
                outputs[name].append(self.baseline(pl_module.backbone, method, pixels, source, target, seed=k))
            log.info("inversion evaluation: image %s done (%d methods)", stem, len(outputs))
        sources = torch.stack([(image + 1) / 2 for image in datamodule.images]).clamp(0, 1)
        rows = self.score(outputs, sources.to(pl_module.device), datamodule.prompts, [edits.get(s) for s in stems])
        self.write(trainer, rows, outputs, sources)

    def ours(self, pl_module, stem: str, target: str | None) -> torch.Tensor:
        inversion = self.dirpath / OURS / stem
        with torch.no_grad():
            if target is None:
                return pl_module.reconstruct(inversion).float()
            return pl_module.edit([target], inversion).float()

    @torch.no_grad()
    def baseline(self, backbone, method, pixels: torch.Tensor, source: str, target: str | None,
                 seed: int) -> torch.Tensor:
        generator = torch.Generator(pixels.device).manual_seed(self.encode_seed)
        z0 = backbone.encode_images(pixels.to(backbone.dtype), generator).float()
        with torch.enable_grad():  # null-text inversion optimises embeddings
            latents = method(backbone, z0, source, target or source, guidance_scale=self.guidance_scale,
                             seed=seed, pixels=pixels)
        decoded = backbone.decode_latents(latents).float().clamp(0, 1)
        return decoded if target is not None else decoded[:1]

    def score(self, outputs: dict[str, list[torch.Tensor]], sources: torch.Tensor, captions: list[str],
              targets: list[str | None]) -> list[dict]:
        rows = []
        for method, per_image in outputs.items():
            recons = torch.stack([o[0] for o in per_image]).to(sources.device)
            rows.append({"method": method, "output": "reconstruction", **self.row(recons, sources, captions)})
            if all(t is not None for t in targets):
                edited = torch.stack([o[1] for o in per_image]).to(sources.device)
                rows.append({"method": method, "output": "edit", **self.row(edited, sources, list(targets))})
        return rows

    def row(self, images: torch.Tensor, sources: torch.Tensor, texts: list[str]) -> dict[str, float]:
        """The metrics of one method's outputs: against the source images, and read by the probes against
        `texts` when they are shapes-world captions."""
        from datamodules.shapes.world import parse_caption

        try:
            scenes = [parse_caption(t) for t in texts]
        except DataError:  # not the shapes world: the probes have nothing to judge by
            scenes = None
        names = self.suite.active(FIELDS if scenes else FIELDS - {"scenes"})
        self.suite.reset()
        self.suite.update({"images": images, "sources": sources, "texts": texts, "scenes": scenes}, names)
        return self.suite.compute(names)

    def write(self, trainer, rows: list[dict], outputs: dict[str, list[torch.Tensor]], sources: torch.Tensor) -> None:
        write_json(self.dirpath / "inversion_metrics.json", {"step": trainer.global_step, "rows": rows})
        write_table(self.dirpath / "inversion_metrics.csv", rows)
        columns = [[src] + [image for name in outputs for image in outputs[name][k]] for k, src in enumerate(sources)]
        grid = make_grid(torch.stack([image.cpu() for row in columns for image in row]), rows=len(columns))
        save_png(grid, self.dirpath / "inversion_grid.png")
        values = {f"eval/{r['method']}/{r['output']}/{k}": v for r in rows for k, v in r.items()
                  if k not in ("method", "output")}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in values.items()})
        log_wandb_table(trainer, "eval/inversion_table", rows)
        for r in rows:
            log.info("%s %s: %s", r["method"], r["output"],
                     ", ".join(f"{k}={v:.4g}" for k, v in r.items() if k not in ("method", "output")))
