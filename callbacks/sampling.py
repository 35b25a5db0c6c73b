"""Callbacks that sample the model being trained: a sample grid, and evaluation with metrics.

Both render a prompt set (a list, or a prompts_file) x seeds x an optional swept setting through the
module's `sample` (so a method's own settings, a slider's strength or LAG, can be swept), split across DDP ranks
(`metrics.evaluation`). They run every N steps and when training ends, on every rank at once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Mapping, Sequence

import lightning as L
import torch
from torchmetrics import Metric

from metrics.evaluation import (Job, Sweep, available_fields, check_texts, gather_images, plan, render_jobs,
                                sample_grid, score, shard, source_images)
from metrics.suite import MetricSuite
from datamodules.image_set import load_reference_set, scan_image_set
from datamodules.prompts import read_prompt_file
from diffusion.tokens import fill_template
from utils.errors import ConfigError
from utils.images import save_png
from utils.io import write_json
from utils.loggers import log_wandb_table

log = logging.getLogger(__name__)


class SamplingCallback(L.Callback):
    def __init__(self, dirpath: str, prompts: Sequence[str], seeds: Sequence[int] = (0, 1),
                 sweep: Mapping[str, Sequence] | None = None, class_word: str = "", every_n_steps: int = 0,
                 at_end: bool = True, num_steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str = "",
                 batch_size: int = 8, prompts_file: str | None = None):
        self.dirpath = Path(dirpath)
        self.templates = read_prompt_file(prompts_file, "callbacks.*.prompts_file") if prompts_file else list(prompts)
        self.seeds = [int(s) for s in seeds]
        self.texts = [fill_template(t, class_word) for t in self.templates]  # what CLIP-T and the probes read
        self.sweep = Sweep.from_config(sweep)
        self.class_word = class_word
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self.generation = {"num_steps": num_steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
        self.batch_size = batch_size

    def jobs(self, pl_module) -> list[Job]:
        prompts = [pl_module.sampling_prompt(t, self.class_word) for t in self.templates]
        return plan(prompts, self.texts, self.seeds, self.sweep)

    def render_fn(self, trainer, pl_module):
        def render(prompts: list[str], seeds: list[int], setting: dict) -> torch.Tensor:
            with trainer.precision_plugin.forward_context():  # the trained parts are fp32, the backbone bf16
                return pl_module.sample(prompts, seeds, setting, **self.generation).float()
        return render

    def render_share(self, trainer, pl_module) -> tuple[list[Job], dict[Job, torch.Tensor]]:
        """This rank's jobs and their images (call inside `evaluating`)."""
        mine = shard(self.jobs(pl_module), trainer.global_rank, trainer.world_size)
        images = render_jobs(mine, self.render_fn(trainer, pl_module), self.sweep, self.batch_size,
                             progress=trainer.is_global_zero, desc=f"{type(self).__name__} samples")
        return mine, images

    def run(self, trainer, pl_module) -> None:
        raise NotImplementedError

    @staticmethod
    @contextlib.contextmanager
    def evaluating(pl_module):
        """The module in eval mode while sampling, back in its own mode afterwards."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            yield
        finally:
            pl_module.train(was_training)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and not trainer.fast_dev_run:
            self._run_once(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and not trainer.fast_dev_run:  # a smoke run writes nothing
            self._run_once(trainer, pl_module)

    def _run_once(self, trainer, pl_module) -> None:
        """Run at most once per step (the last periodic run may fall on the final step)."""
        if getattr(self, "_last_step", None) != trainer.global_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module)


class SampleGrid(SamplingCallback):
    """Saves <dirpath>/samples/step_NNNNNN.png (+ .json legend) and logs it to wandb / TensorBoard."""

    def run(self, trainer, pl_module) -> None:
        with self.evaluating(pl_module):
            _, images = self.render_share(trainer, pl_module)
        images = gather_images(images)
        if not trainer.is_global_zero:
            return
        grid, legend = sample_grid(images, self.sweep)
        name = f"step_{trainer.global_step:06d}"
        path = save_png(grid, self.dirpath / "samples" / f"{name}.png")
        write_json(path.with_suffix(".json"), {"step": trainer.global_step, **legend})
        log_image(trainer, "samples", grid, caption=grid_caption(trainer.global_step, legend))
        log.info("sample grid: %s", path)


class Evaluation(SamplingCallback):
    """Scores the samples with `metrics` and writes <dirpath>/metrics.json (every evaluation so far);
    the values go to every attached logger and to trainer.callback_metrics as eval/<metric>
    (eval/<metric>@<setting>=<value> in a sweep).

    pairs: what paired metrics (LPIPS, PSNR, SSIM, Structure-dist) compare with: null, class_word
    (the same prompt with the class word) or first_value (the sweep's first value).
    references / reference_masks: folders of the concept's images and masks (CLIP-I, DINO).
    """

    def __init__(self, metrics: Mapping[str, Metric], pairs: str | None = None, references: str | None = None,
                 reference_masks: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not any(v is not None for v in metrics.values()):
            raise ConfigError("the evaluation callback has no metrics; pick a set, e.g. metrics=shapes_concept "
                              "(conf/metrics/)")
        self.suite = MetricSuite({k: v for k, v in metrics.items() if v is not None})
        self.pairs = pairs
        self.reference_dirs = (references, reference_masks)
        self.references = self.reference_masks = None
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        references, masks = self.reference_dirs
        if references:
            scan_image_set(references, masks, key="references")  # a bad folder fails before training
        present = torch.zeros(1) if references else None
        self.fields = available_fields(self.suite, present, present if masks else None, self.pairs, self.sweep)
        self.suite.check(self.fields)  # a metric nothing feeds is refused before training starts
        check_texts(self.suite, self.texts, str(getattr(pl_module, "backbone_config", {}).get("name")))

    def load_references(self, resolution: int) -> None:
        if self.reference_dirs[0] and self.references is None:
            self.references, self.reference_masks = load_reference_set(*self.reference_dirs, resolution=resolution)

    def run(self, trainer, pl_module) -> None:
        device = pl_module.device
        self.suite.to(device)
        self.load_references(pl_module.backbone.resolution)
        with self.evaluating(pl_module):
            mine, images = self.render_share(trainer, pl_module)
            sources = source_images(mine, images, self.pairs, self.render_fn(trainer, pl_module), self.sweep,
                                    self.batch_size, progress=trainer.is_global_zero)
        rows = score(mine, images, self.suite, self.sweep, self.fields, sources=sources,
                     references=_to(self.references, device), reference_masks=_to(self.reference_masks, device),
                     batch_size=self.batch_size, device=device)
        if trainer.is_global_zero:
            self.history.append({"step": trainer.global_step, "rows": rows})
            write_json(self.dirpath / "metrics.json", {"evaluations": self.history})
            values = flatten_rows(rows, self.sweep)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            # beside the logged training metrics, where train.py reads `optimized_metric` for a sweeper
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in values.items()})
            log_wandb_table(trainer, "eval/table", [{"step": trainer.global_step, **row} for row in rows])
            log.info("evaluation at step %d: %s", trainer.global_step,
                     ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


def flatten_rows(rows: list[dict], sweep: Sweep, prefix: str = "eval/") -> dict[str, float]:
    out = {}
    for row in rows:
        tag = f"@{sweep.name}={row[sweep.name]}" if sweep.name else ""
        out.update({f"{prefix}{k}{tag}": v for k, v in row.items() if k != sweep.name})
    return out


def _to(x: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


def grid_caption(step: int, legend: dict) -> str:
    """What the grid shows: its rows (prompts) and columns (the swept setting's values), for the logger."""
    rows = "; ".join(f"{i}: " + ", ".join(f"{k}={v}" for k, v in row.items()) for i, row in enumerate(legend["rows"]))
    columns = "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in legend["columns"].items())
    return f"step {step}. rows: {rows}. columns: {columns}"


def log_image(trainer, key: str, image: torch.Tensor, caption: str) -> None:
    """Send an image to the loggers that take images (wandb, TensorBoard)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from utils.images import to_pil
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[to_pil(image)], caption=[caption], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image.clamp(0, 1), trainer.global_step)
