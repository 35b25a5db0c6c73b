"""OmegaConf resolvers the configs use, and instantiation helpers."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def auto_precision() -> str:
    """bf16 autocast on a GPU, fp32 on the CPU."""
    import torch
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("sum"):  # ${sum:${a},${b}}: a run's length from its stages
        OmegaConf.register_new_resolver("sum", lambda *values: sum(int(v) for v in values))
    if not OmegaConf.has_resolver("image_encoder_dir"):  # StyleDiffusion's E: see image_encoder_dir
        OmegaConf.register_new_resolver("image_encoder_dir", image_encoder_dir)


def image_encoder_dir(build: str | None, cache_dir: str, metric_models_dir: str) -> str:
    """Where StyleDiffusion's image encoder lives: a random one of architecture `build` in the cache (each size its
    own folder), or, with no build, the paper's CLIP ViT-B/16 among the metric models."""
    if build:
        return f"{cache_dir}/models/clip-vision-{build}-random"
    return f"{metric_models_dir}/clip-vit-base-patch16"


def entry_config(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml as its entry point composes it (paths resolved against the project root), for
    scripts that build a part of it (a backbone, an edit method) without the entry point."""
    import os
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("PROJECT_ROOT", str(root))
    register_resolvers()
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def model_config(name: str) -> DictConfig:
    """conf/model/<name>.yaml as train.py composes it."""
    return entry_config("train", [f"model={name}"]).model


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a _target_ of a config group like callbacks/ or logger/."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]
