"""Edit one real image: `python edit.py edit_method=<name> image=<png> source='<prompt>' target='<prompt>'`.

Loads the backbone, encodes the image (resized and centre-cropped to model.resolution), runs the edit method that
conf/edit_method/<name>.yaml builds (diffusion/editing.py; its settings are edit_method.<key>=...) and writes, in
the run folder: source.png (the input as the model takes it), reconstruction.png, edited.png and edit.json
(method, prompts, settings, seconds per step). A folder that already holds these files is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from utils.config import register_resolvers  # noqa: E402
from utils.checks import check_generation_settings  # noqa: E402
from utils.task import hydra_entry, refuse_to_overwrite, task  # noqa: E402

log = logging.getLogger("edit")
register_resolvers()


def check(cfg: DictConfig):
    """Everything bad input can break, checked before a model loads; returns (the image's path, the method)."""
    from diffusion.editing import build_method
    from utils.errors import ConfigError, DataError

    for key in ("source", "target"):
        value = cfg.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key} is empty; give {key}='<prompt>' (the {key} prompt of the edit)")
    if not cfg.image:
        raise ConfigError("image is not set; give image=<path to a png or jpg>")
    image = Path(str(cfg.image)).expanduser()
    if not image.is_file():
        raise DataError(f"image={image} does not exist; give the path of the image to edit")
    check_generation_settings(cfg)
    method = build_method(cfg.edit_method)  # its settings are checked as it is built
    method.check_prompts(cfg.source, cfg.target)
    return image, method


def check_prompt_lengths(cfg: DictConfig, tokenizer) -> None:
    """Source and target must fit the text encoder's window (longer prompts would be cut, and their attention
    maps misaligned)."""
    from utils.errors import ConfigError

    limit = tokenizer.model_max_length - 2  # the start and end tokens
    for key in ("source", "target"):
        count = len(tokenizer(cfg[key], add_special_tokens=False).input_ids)
        if count > limit:
            raise ConfigError(f"{key} is {count} tokens, more than the {limit} the text encoder reads; shorten it")


@task
def edit(cfg: DictConfig) -> dict:
    import torch

    from datamodules.image_set import load_image
    from diffusion.backbone import load_backbone
    from utils.images import save_png
    from utils.io import write_json

    image, method = check(cfg)
    out = Path(cfg.paths.output_dir)
    refuse_to_overwrite(out, resuming=False, artifacts=tuple(cfg.run_dir_taken_by))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    backbone = load_backbone(**{k: v for k, v in model.items() if k != "dtype"}, dtype=cfg.dtype).to(device)
    check_prompt_lengths(cfg, backbone.tokenizers[0])
    pixels = load_image(image, int(cfg.model.resolution))[None].to(device)
    generator = torch.Generator(device).manual_seed(int(cfg.seed))
    with torch.no_grad():
        z0 = backbone.encode_images(pixels, generator).float().to(backbone.dtype)
    num_steps = int(cfg.num_steps)
    log.info("%s: %r -> %r, %d steps, w %.3g", cfg.method_name, cfg.source, cfg.target, num_steps, cfg.guidance_scale)
    start = time.perf_counter()
    latents = method(backbone, z0, cfg.source, cfg.target, num_steps, float(cfg.guidance_scale), seed=int(cfg.seed),
                     pixels=pixels.float())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = backbone.decode_latents(latents)
    save_png((pixels[0].float().cpu() + 1) / 2, out / "source.png")
    save_png(images[0].cpu(), out / "reconstruction.png")
    save_png(images[1].cpu(), out / "edited.png")
    summary = {"method": cfg.method_name, "image": str(image), "source": cfg.source, "target": cfg.target,
               "model": cfg.model.name, "num_steps": num_steps, "guidance_scale": float(cfg.guidance_scale),
               "seed": int(cfg.seed), "settings": dataclasses.asdict(method), "device": device, "seconds": seconds,
               "seconds_per_step": seconds / num_steps,
               "reconstruction_latent_mse": float((latents[:1].float() - z0.float()).pow(2).mean()),
               "files": {"source": "source.png", "reconstruction": "reconstruction.png", "edited": "edited.png"}}
    write_json(out / "edit.json", summary)
    log.info("%.3g s per step; wrote source.png, reconstruction.png, edited.png and edit.json to %s",
             summary["seconds_per_step"], out)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="edit")
def main(cfg: DictConfig) -> None:
    edit(cfg)


if __name__ == "__main__":
    hydra_entry(main)
