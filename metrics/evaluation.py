"""Generate a prompt set and score it: the loop the evaluation callbacks and evaluate.py share.

A job is one (prompt, seed, swept value). Jobs are split across DDP ranks by (prompt, seed) group,
so a rank holds every swept value of its groups (a sweep's first value can serve as the others'
source image). Each rank renders and scores its share; the metrics' states are summed over ranks
by torchmetrics, and rank 0 gathers the images for the grid. The table has one row per swept
value, plus a row over the whole sweep for the metrics that read `values` (size slope).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from metrics.suite import MetricSuite, inputs_of
from utils.errors import ConfigError
from utils.images import make_grid

GENERATION_KEYS = ("num_steps", "guidance_scale", "negative_prompt")
PAIRS = (None, "class_word", "first_value")
Render = Callable[[list[str], list[int], dict], torch.Tensor]  # (prompts, seeds, setting) -> [B, 3, H, W] in [0, 1]


@dataclass(frozen=True)
class Sweep:
    """One swept sampling setting (a slider's strength, LAG on/off, guidance), or none."""

    name: str | None = None
    values: tuple = (None,)

    @classmethod
    def from_config(cls, sweep: Mapping | None) -> "Sweep":
        if not sweep:
            return cls()
        if len(sweep) != 1:
            raise ConfigError(f"sweep takes one setting and its values, e.g. sweep={{guidance_scale:[1,3,7.5]}}; "
                              f"got {sorted(sweep)}")
        (name, values), = sweep.items()
        values = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
        values = [tuple(OmegaConf.to_container(v)) if OmegaConf.is_list(v) else v for v in values]  # one per slider:
        #   a plain, hashable (0, 2) that the table and metrics.json write as [0, 2]
        if not values:
            raise ConfigError(f"sweep.{name} has no values")
        return cls(str(name), tuple(values))

    def setting(self, value: Any) -> dict:
        return {} if self.name is None else {self.name: value}


@dataclass(frozen=True)
class Job:
    prompt_index: int
    seed: int
    value_index: int
    prompt: str        # as the model reads it (with a learned token)
    text: str          # in plain words (the token replaced by its class word): CLIP-T and the probes
    value: Any = None

    @property
    def group(self) -> tuple[int, int]:
        return self.prompt_index, self.seed


def plan(prompts: Sequence[str], texts: Sequence[str], seeds: Sequence[int], sweep: Sweep) -> list[Job]:
    if not prompts or not seeds:
        raise ConfigError("prompts and seeds must be non-empty lists")
    return [Job(i, int(s), k, p, t, v) for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
            for s in seeds for k, v in enumerate(sweep.values)]


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This rank's jobs: every world-th (prompt, seed) group, with all its swept values."""
    groups = sorted({job.group for job in jobs})
    if len(groups) < world:
        raise ConfigError(f"{len(groups)} prompt x seed pairs cannot be split over {world} processes; give more "
                          f"prompts or seeds, or fewer devices")
    mine = set(groups[rank::world])
    return [job for job in jobs if job.group in mine]


def _batches(jobs: list[Job], batch_size: int):
    for k in sorted({job.value_index for job in jobs}):
        same = [job for job in jobs if job.value_index == k]
        for start in range(0, len(same), batch_size):
            yield same[start:start + batch_size]


def render_jobs(jobs: list[Job], render: Render, sweep: Sweep, batch_size: int, texts: bool = False,
                progress: bool = True, desc: str = "generating") -> dict[Job, torch.Tensor]:
    """Images of the jobs (uint8, CPU, so a large set fits in memory); texts=True renders each job's
    plain-words text instead of its prompt (the class-word pairs)."""
    out: dict[Job, torch.Tensor] = {}
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    for chunk in _batches(jobs, batch_size):
        images = render([j.text if texts else j.prompt for j in chunk], [j.seed for j in chunk],
                        sweep.setting(chunk[0].value))
        for job, image in zip(chunk, images):
            out[job] = to_uint8(image)
        bar.update(len(chunk))
    bar.close()
    return out


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def to_float(images: list[torch.Tensor], device) -> torch.Tensor:
    return torch.stack(images).to(device).float() / 255


def source_images(jobs: list[Job], images: dict[Job, torch.Tensor], pairs: str | None, render: Render, sweep: Sweep,
                  batch_size: int, progress: bool = True) -> dict[Job, torch.Tensor] | None:
    """Each job's comparison image: the class word's sample (same seed and setting), or its group's
    sample at the sweep's first value."""
    if pairs not in PAIRS:
        raise ConfigError(f"pairs={pairs!r} is unknown; use null, class_word or first_value")
    if pairs is None:
        return None
    if pairs == "first_value":
        if sweep.name is None:
            raise ConfigError("pairs=first_value compares with the sweep's first value; give a sweep")
        first = {job.group: images[job] for job in jobs if job.value_index == 0}
        return {job: first[job.group] for job in jobs}
    return render_jobs(jobs, render, sweep, batch_size, texts=True, progress=progress, desc="class-word pairs")


def available_fields(suite: MetricSuite, references: torch.Tensor | None, reference_masks: torch.Tensor | None,
                     pairs: str | None, sweep: Sweep) -> set[str]:
    fields = {"images", "texts"}
    if references is not None:
        fields.add("references")
    if reference_masks is not None:
        fields.add("reference_masks")
    if pairs is not None:
        fields.add("sources")
    if any("scenes" in inputs_of(m) for m in suite.metrics.values()):
        fields.add("scenes")  # parsed from the texts; a text outside the shapes world is an error then
    if sweep.name is not None:
        fields |= {"values", "groups"}
    return fields


def check_texts(suite: MetricSuite, texts: Sequence[str], model: str) -> None:
    """Metrics that judge samples by their prompts (the probes) need shapes-world captions: refuse
    others before any work."""
    from datamodules.shapes.world import parse_caption
    from utils.errors import DataError

    readers = [name for name, metric in suite.metrics.items() if "scenes" in inputs_of(metric)]
    for text in texts if readers else ():
        try:
            parse_caption(text)
        except DataError:
            raise ConfigError(f"metrics {', '.join(readers)} judge shapes-world captions and {text!r} is not one; "
                              f"with model={model} use metrics=personalization or metrics=none") from None


def score(jobs: list[Job], images: dict[Job, torch.Tensor], suite: MetricSuite, sweep: Sweep, fields: set[str],
          sources: dict[Job, torch.Tensor] | None = None, references: torch.Tensor | None = None,
          reference_masks: torch.Tensor | None = None, batch_size: int = 16, device="cpu") -> list[dict]:
    """The table: one row per swept value (and one over the sweep). Every rank calls it with its own jobs."""
    from datamodules.shapes.world import parse_caption

    scenes = {j.text: parse_caption(j.text) for j in jobs} if "scenes" in fields else {}
    row_fields = fields - {"values", "groups"}
    per_value = suite.active(row_fields)
    over_sweep = [name for name in suite.active(fields) if name not in per_value]

    def feed(subset: list[Job], names: list[str], with_values: bool) -> None:
        for start in range(0, len(subset), batch_size):
            chunk = subset[start:start + batch_size]
            batch = {"images": to_float([images[j] for j in chunk], device), "texts": [j.text for j in chunk],
                     "references": references, "reference_masks": reference_masks,
                     "scenes": [scenes[j.text] for j in chunk] if scenes else None,
                     "sources": to_float([sources[j] for j in chunk], device) if sources is not None else None}
            if with_values:
                batch["values"] = [float(j.value) for j in chunk]
                batch["groups"] = [j.prompt_index * 1_000_003 + j.seed for j in chunk]  # the same id on every rank
            suite.update(batch, names)

    rows = []
    for k, value in enumerate(sweep.values):
        suite.reset()
        feed([j for j in jobs if j.value_index == k], per_value, with_values=False)
        rows.append({**({sweep.name: value} if sweep.name else {}), **suite.compute(per_value)})
    if over_sweep:
        suite.reset()
        feed(jobs, over_sweep, with_values=True)
        rows.append({sweep.name: "all", **suite.compute(over_sweep)})
    return rows


def gather_images(images: dict[Job, torch.Tensor]) -> dict[Job, torch.Tensor]:
    """Every rank's images, on every rank (small uint8 tensors; used for grids and files on rank 0)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(images)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(images.items()))
    return {job: image for part in parts for job, image in part}


def sample_grid(images: dict[Job, torch.Tensor], sweep: Sweep) -> tuple[torch.Tensor, dict]:
    """The grid image [3, H', W'] in [0, 1] and its legend. Without a sweep: a row per prompt, a column
    per seed. With one: a row per (prompt, seed), a column per swept value."""
    jobs = sorted(images, key=lambda j: (j.prompt_index, j.seed, j.value_index))
    prompt_of = {j.prompt_index: j.prompt for j in jobs}
    if len(sweep.values) > 1:
        groups = sorted({j.group for j in jobs})
        legend = {"rows": [{"prompt": prompt_of[p], "seed": s} for p, s in groups],
                  "columns": {sweep.name: list(sweep.values)}}
        rows = len(groups)
    else:
        legend = {"rows": [{"prompt": prompt_of[p]} for p in sorted(prompt_of)],
                  "columns": {"seed": sorted({j.seed for j in jobs})}}
        rows = len(prompt_of)
    grid = make_grid(torch.stack([images[j] for j in jobs]).float() / 255, rows=rows)
    return grid, legend
