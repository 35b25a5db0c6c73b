"""Edit one real image: `python edit.py image=<png> source='<prompt>' target='<prompt>' method=<name>`.

Loads the backbone, encodes the image (resized and centre-cropped to model.resolution), runs one method
of diffusion/editing.py (ddim_word_swap, sdedit, null_text_p2p, null_text_p2plus, negative_prompt_p2p,
style_diffusion; `method=` is read as the config's `edit_method`) and writes, in the run folder:
source.png (the input as the model takes it), reconstruction.png, edited.png and edit.json (method,
prompts, settings, seconds per step). A folder that already holds these files is refused.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from utils.config import register_resolvers  # noqa: E402
from utils.checks import check_generation_settings, is_number  # noqa: E402
from utils.task import hydra_entry, refuse_to_overwrite, task  # noqa: E402

log = logging.getLogger("edit")
register_resolvers()
# the methods whose target row is steered by a prompt-to-prompt controller (`controller`)
CONTROLLED = ("null_text_p2p", "null_text_p2plus", "negative_prompt_p2p", "style_diffusion")
FRACTIONS = ("tau_c", "tau_s", "tau_u", "blend_threshold", "style_diffusion.editing.tau_v",
             "style_diffusion.editing.tau_c", "style_diffusion.editing.tau_s", "style_diffusion.editing.tau_u")


def check(cfg: DictConfig) -> Path:
    """Everything bad input can break, checked before a model loads; returns the image's path."""
    from diffusion.editing import BLEND_METHODS, METHODS
    from utils.errors import ConfigError, DataError

    if cfg.edit_method not in METHODS:
        raise ConfigError(f"method={cfg.edit_method} is unknown; use one of {', '.join(METHODS)}")
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
    if cfg.edit_method in ("sdedit", "style_diffusion_sdedit") and not (
            is_number(cfg.strength) and 0 <= cfg.strength <= 1):
        raise ConfigError(f"strength={cfg.strength!r} must be a number in [0, 1]; 0 keeps the image, 1 ignores it")
    for key in FRACTIONS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (is_number(value) and 0 <= value <= 1):
            raise ConfigError(f"{key}={value!r} must be a number in [0, 1] (a share of the steps, or a mask threshold)")
    check_controller(cfg)
    if cfg.blend_words is not None:
        from diffusion.prompt_to_prompt import check_blend_words

        if cfg.edit_method not in BLEND_METHODS:
            raise ConfigError(f"blend_words applies to the prompt-to-prompt methods ({', '.join(BLEND_METHODS)}), "
                              f"not {cfg.edit_method}; drop it or pick one of those")
        check_blend_words([cfg.source, cfg.target], blend_words_of(cfg))
    encoder = cfg.image_encoder
    if cfg.edit_method.startswith("style_diffusion") and not encoder.build and (
            not encoder.path or not Path(str(encoder.path)).expanduser().exists()):
        raise ConfigError(f"image_encoder.path={encoder.path} does not exist; give a local CLIP vision model folder "
                          f"or image_encoder.build=base|tiny to build a random one there")
    return image


def check_controller(cfg: DictConfig) -> None:
    """A known prompt-to-prompt controller; replace swaps words one for one, so its prompts have as many words."""
    from utils.errors import ConfigError

    if cfg.controller not in ("auto", "replace", "refine"):
        raise ConfigError(f"controller={cfg.controller!r} is unknown; use auto (replace for equal word counts, else "
                          f"refine), replace or refine")
    words = [len(str(cfg[key]).split()) for key in ("source", "target")]
    if cfg.edit_method in CONTROLLED and cfg.controller == "replace" and words[0] != words[1]:
        raise ConfigError(f"controller=replace swaps words one for one, but source has {words[0]} words and target "
                          f"{words[1]}; use controller=refine (or auto) when words are added or removed")


def check_prompt_lengths(cfg: DictConfig, tokenizer) -> None:
    """Source and target must fit the text encoder's window (longer prompts would be cut, and their attention
    maps misaligned)."""
    from utils.errors import ConfigError

    limit = tokenizer.model_max_length - 2  # the start and end tokens
    for key in ("source", "target"):
        count = len(tokenizer(cfg[key], add_special_tokens=False).input_ids)
        if count > limit:
            raise ConfigError(f"{key} is {count} tokens, more than the {limit} the text encoder reads; shorten it")


def blend_words_of(cfg: DictConfig):
    """cfg.blend_words as plain Python (None, a string, or lists of words)."""
    words = cfg.blend_words
    return OmegaConf.to_container(words) if OmegaConf.is_config(words) else words


def settings_of(cfg: DictConfig) -> dict:
    """The EditSettings fields of the config (plain containers)."""
    style = OmegaConf.to_container(cfg.style_diffusion, resolve=True)
    style["image_encoder"] = OmegaConf.to_container(cfg.image_encoder, resolve=True)
    return {"controller": cfg.controller, "tau_c": float(cfg.tau_c), "tau_s": float(cfg.tau_s),
            "tau_u": float(cfg.tau_u), "blend_words": blend_words_of(cfg),
            "blend_threshold": float(cfg.blend_threshold), "strength": float(cfg.strength), "seed": int(cfg.seed),
            "null_text": OmegaConf.to_container(cfg.null_text, resolve=True), "style_diffusion": style}


@task
def edit(cfg: DictConfig) -> dict:
    import torch

    from datamodules.image_set import load_image
    from diffusion.backbone import load_backbone
    from diffusion.editing import DEFAULT_STEPS, METHODS, EditSettings
    from utils.images import save_png
    from utils.io import write_json

    image = check(cfg)
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
    num_steps = int(cfg.num_steps) if cfg.num_steps is not None else DEFAULT_STEPS[cfg.edit_method]
    plain = settings_of(cfg)
    settings = EditSettings(**plain, pixels=pixels.float())
    log.info("%s: %r -> %r, %d steps, w %.3g", cfg.edit_method, cfg.source, cfg.target, num_steps, cfg.guidance_scale)
    start = time.perf_counter()
    latents = METHODS[cfg.edit_method](backbone, z0, cfg.source, cfg.target, num_steps, float(cfg.guidance_scale),
                                  settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = backbone.decode_latents(latents)
    save_png((pixels[0].float().cpu() + 1) / 2, out / "source.png")
    save_png(images[0].cpu(), out / "reconstruction.png")
    save_png(images[1].cpu(), out / "edited.png")
    summary = {"method": cfg.edit_method, "image": str(image), "source": cfg.source, "target": cfg.target,
               "model": cfg.model.name, "num_steps": num_steps, "guidance_scale": float(cfg.guidance_scale),
               "settings": plain, "device": device, "seconds": seconds, "seconds_per_step": seconds / num_steps,
               "reconstruction_latent_mse": float((latents[:1].float() - z0.float()).pow(2).mean()),
               "files": {"source": "source.png", "reconstruction": "reconstruction.png", "edited": "edited.png"}}
    write_json(out / "edit.json", summary)
    log.info("%.3g s per step; wrote source.png, reconstruction.png, edited.png and edit.json to %s",
             summary["seconds_per_step"], out)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="edit")
def main(cfg: DictConfig) -> None:
    edit(cfg)


def method_override(argv: list[str]) -> list[str]:
    """`method=<name>` as `edit_method=<name>`: conf/method/ is train.py's config group, so Hydra would
    read a plain `method=` override as a choice of that group."""
    return ["edit_method=" + a[len("method="):] if a.startswith("method=") else a for a in argv]


if __name__ == "__main__":
    import sys

    sys.argv[1:] = method_override(sys.argv[1:])
    hydra_entry(main)
