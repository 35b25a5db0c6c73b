"""Generate with a trained artifact and score it: `python evaluate.py artifact=<run>` (a run folder, or a file in it).

Loads the backbone, adds the artifact(s), renders every prompt x seed (x swept value) with DDIM + CFG,
scores the samples with the chosen metrics (conf/metrics/) and writes, in the run folder:
images/*.png, grid.png (+ grid.json legend), samples.json, metrics.json and metrics.csv (one row per
swept value). Under -m every job also adds its rows to <sweep dir>/table.csv, so several artifacts
or settings compare side by side. devices=N splits the work over N processes (GPUs).

Every training method's run loads through diffusion.artifacts, which knows it by its info file:
- a textual inversion (learned_embeds.json, or a bare .safetensors) fills '{}' with its token;
- sliders (prompt / visual / concept_slider runs, slider.json) are appended to every prompt instead;
  `strength` sets their strength (one number, or one per artifact to compose several), and
  `sweep={strength: [...]}` sweeps it;
- a residuals run (residuals.json) fills '{}' with "V* <class>" and adds its residuals; `strength` scales
  them, `lag=true` samples with LAG, and both can be swept (`sweep={lag: [false, true]}`);
- an EM run (em_mask, concepts.json) adds every concept token and its joint-stage weights (the UNet or a
  LoRA); prompts name the tokens ("a <s00_c0> left of a <s00_c1>"), and `token=s00_c0` (brackets optional)
  picks the one that fills '{}'.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from utils.config import register_resolvers  # noqa: E402
from utils.checks import check_generation_settings  # noqa: E402
from utils.task import hydra_entry, refuse_to_overwrite, task  # noqa: E402

log = logging.getLogger("evaluate")
register_resolvers()


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompt set: cfg.prompts, or a file (.txt: one prompt per line; .json: a list)."""
    from datamodules.prompts import read_prompt_file

    return read_prompt_file(cfg.prompts_file) if cfg.prompts_file else list(cfg.prompts or [])


def artifact_infos(artifact) -> list:
    """Each artifact (a run folder or a file in it) read and checked, before any model loads."""
    from diffusion.artifacts import read_artifact

    paths = [] if not artifact else [artifact] if isinstance(artifact, str) else list(artifact)
    return [read_artifact(path) for path in paths]


def strength_setting(cfg: DictConfig, setting: dict):
    """The artifacts' strength for a render: the swept value, else cfg.strength (a number or one per slider)."""
    value = setting.get("strength", cfg.strength)
    return list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else value


def prepare(cfg: DictConfig):
    """Everything a bad config can break, checked before a model is loaded or a process spawned:
    the metric set (backbone paths), the sweep, the references, the prompts and the artifact."""
    from datamodules.image_set import load_reference_set
    from diffusion.tokens import fill_template
    from diffusion.artifacts import accepted_settings, check_settings
    from metrics.evaluation import GENERATION_KEYS, Sweep, available_fields, check_texts
    from metrics.suite import MetricSuite
    from utils.errors import ConfigError

    suite = MetricSuite({k: hydra.utils.instantiate(v) for k, v in (cfg.metrics or {}).items() if v is not None})
    sweep = Sweep.from_config(cfg.sweep)
    artifacts = artifact_infos(cfg.artifact)
    settings = GENERATION_KEYS + accepted_settings(artifacts)
    if sweep.name and sweep.name not in settings:
        raise ConfigError(f"sweep.{sweep.name} is not a sampling setting here; sweep one of {', '.join(settings)} "
                          f"(strength needs a slider or residuals artifact, lag a residuals artifact)")
    check_settings(artifacts, strength_setting(cfg, {}), bool(cfg.lag))
    references = masks = None
    if cfg.references:
        references, masks = load_reference_set(cfg.references, cfg.reference_masks, resolution=cfg.model.resolution)
    fields = available_fields(suite, references, masks, cfg.pairs, sweep)
    suite.check(fields)
    templates = read_prompts(cfg)
    key = f"prompts_file={cfg.prompts_file}" if cfg.prompts_file else "prompts"
    for info in artifacts:
        info.kind.check_prompts(info.info, templates, key, cfg.token)
    texts = [fill_template(t, cfg.class_word) for t in templates]  # what CLIP-T and the probes read
    check_texts(suite, texts, cfg.model.name)
    return suite, sweep, references, masks, fields, templates, texts, artifacts


def run(cfg: DictConfig, fabric) -> dict:
    """One process's share: every rank renders and scores its jobs; rank 0 writes the files."""
    import torch

    from diffusion.artifacts import ArtifactSet, load_artifact
    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate
    from metrics.evaluation import gather_images, plan, render_jobs, sample_grid, score, shard, source_images
    from utils.images import save_png
    from utils.io import write_json, write_table

    main = fabric.global_rank == 0
    device = fabric.device
    suite, sweep, references, masks, fields, templates, texts, artifacts = prepare(cfg)
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    backbone = load_backbone(**{k: v for k, v in cfg.model.items() if k != "dtype"}, dtype=dtype).to(device)
    loaded = ArtifactSet([load_artifact(backbone, info, token=cfg.token) for info in artifacts])
    for artifact in loaded.artifacts:
        log.info("loaded %s", artifact)
    prompts = [loaded.fill(t, cfg.class_word) for t in templates]
    generation = {"num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale,
                  "negative_prompt": cfg.negative_prompt}
    encode = loaded.encoder(backbone)

    def render(batch_prompts: list[str], seeds: list[int], setting: dict) -> torch.Tensor:
        setting = dict(setting)
        strength = strength_setting(cfg, setting)
        setting.pop("strength", None)
        lag = bool(setting.pop("lag", cfg.lag))
        with loaded.applied(batch_prompts, strength=strength, lag=lag) as hub:
            return generate(backbone, batch_prompts, seed=seeds, encode=encode, hub=hub, **{**generation, **setting})

    jobs = plan(prompts, texts, cfg.seeds, sweep)
    mine = shard(jobs, fabric.global_rank, fabric.world_size)
    images = render_jobs(mine, render, sweep, cfg.batch_size, progress=main)
    sources = source_images(mine, images, cfg.pairs, render, sweep, cfg.batch_size, progress=main)
    suite.to(device)
    rows = score(mine, images, suite, sweep, fields, sources=sources,
                 references=None if references is None else references.to(device),
                 reference_masks=None if masks is None else masks.to(device), batch_size=cfg.batch_size, device=device)
    images = gather_images(images)
    if not main:
        return {}

    out = Path(cfg.paths.output_dir)
    records = []
    for job in sorted(images, key=lambda j: (j.prompt_index, j.seed, j.value_index)):
        suffix = f"_v{job.value_index}" if sweep.name else ""
        path = save_png(images[job].float() / 255, out / "images" / f"p{job.prompt_index:02d}_s{job.seed}{suffix}.png")
        records.append({"prompt": job.prompt, "text": job.text, "seed": job.seed,
                        **({sweep.name: job.value} if sweep.name else {}), "file": str(path.relative_to(out))})
    grid, legend = sample_grid(images, sweep)
    save_png(grid, out / "grid.png")
    write_json(out / "grid.json", legend)
    names = [str(info.file) for info in artifacts]
    write_json(out / "samples.json", {"artifact": names, "model": cfg.model.name, "samples": records})
    summary = {"artifact": names, "model": cfg.model.name, "metrics": sorted(suite.metrics),
               "samples": len(records), "world_size": fabric.world_size, "rows": rows}
    write_json(out / "metrics.json", summary)
    write_table(out / "metrics.csv", rows)
    add_to_sweep_table(cfg, rows)
    for row in rows:
        log.info("%s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    log.info("wrote %d samples, grid.png and metrics.csv to %s", len(records), out)
    return summary


def add_to_sweep_table(cfg: DictConfig, rows: list[dict]) -> None:
    """Under -m, add this job's rows (tagged with its overrides) to <sweep dir>/table.csv and table.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from utils.io import write_json, write_table

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    table_json = Path(hc.sweep.dir) / "table.json"
    table = json.loads(table_json.read_text()) if table_json.is_file() else []
    job = {"job": hc.job.num, "overrides": hc.job.override_dirname}
    table.extend({**job, **row} for row in rows)
    write_json(table_json, table)
    write_table(table_json.with_suffix(".csv"), table)


def _spawned(fabric, cfg_dict: dict) -> dict:
    """The body of a spawned process (devices > 1): Hydra's logging is not set up there."""
    logging.basicConfig(level=logging.INFO if fabric.global_rank == 0 else logging.WARNING,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return run(OmegaConf.create(cfg_dict), fabric)


@task
def evaluate(cfg: DictConfig) -> dict:
    import lightning as L
    import torch

    check_generation_settings(cfg)
    accelerator = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_to_overwrite(cfg.paths.output_dir, resuming=False, artifacts=tuple(cfg.run_dir_taken_by))
    if int(cfg.devices) == 1:
        fabric = L.Fabric(accelerator=accelerator, devices=1)
        return run(cfg, fabric)
    # spawned workers (not a re-launched script), so -m sweeps stay one job per folder
    prepare(cfg)  # config errors are one line here, not a traceback from a worker
    fabric = L.Fabric(accelerator=accelerator, devices=int(cfg.devices), strategy="ddp_spawn")
    summary = fabric.launch(_spawned, OmegaConf.to_container(cfg, resolve=True))
    if summary:  # the sweep table is written here, where Hydra's state is known
        add_to_sweep_table(cfg, summary["rows"])
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    hydra_entry(main)
