"""Generate with a trained artifact: `python evaluate.py artifact=<run>/learned_embeds.safetensors`.

Loads the backbone, adds the artifact's token, renders every prompt x seed with DDIM + CFG and
writes one PNG per sample, a grid (rows = prompts, columns = seeds) and samples.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from utils.config import register_resolvers  # noqa: E402
from utils.task import task  # noqa: E402

log = logging.getLogger("evaluate")
register_resolvers()


@task
def evaluate(cfg: DictConfig) -> dict:
    import torch
    from tqdm.auto import tqdm

    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate
    from diffusion.tokens import load_embeddings
    from utils.errors import ConfigError
    from utils.images import make_grid, save_png
    from utils.io import write_json

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device == "cuda" else "float32")
    model = {k: v for k, v in cfg.model.items() if k != "dtype"}
    backbone = load_backbone(**model, dtype=dtype).to(device)
    token = "{}"
    if cfg.artifact:
        names = load_embeddings(backbone, cfg.artifact, token=cfg.token)
        token = names[0] if len(names) == 1 else " ".join(names)
        log.info("loaded %s from %s", ", ".join(names), cfg.artifact)
    if not cfg.prompts or not cfg.seeds:
        raise ConfigError("prompts and seeds must be non-empty lists")
    prompts = [p.replace("{}", token) if cfg.artifact else p.replace("{}", "").strip() for p in cfg.prompts]
    out = Path(cfg.paths.output_dir)
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in cfg.seeds]
    images, records = [], []
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="generating"):
        chunk = jobs[start:start + cfg.batch_size]
        batch = generate(backbone, [p for _, p, _ in chunk], seed=[s for _, _, s in chunk], num_steps=cfg.num_steps,
                         guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt)
        for (i, prompt, seed), image in zip(chunk, batch):
            path = save_png(image, out / "images" / f"p{i:02d}_s{seed}.png")
            images.append(image.cpu())
            records.append({"prompt": prompt, "seed": seed, "file": str(path.relative_to(out))})
    save_png(make_grid(torch.stack(images), rows=len(prompts)), out / "grid.png")
    write_json(out / "samples.json", {"artifact": cfg.artifact, "model": cfg.model.name, "samples": records})
    log.info("wrote %d samples and grid.png to %s", len(records), out)
    return {"samples": len(records)}


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
