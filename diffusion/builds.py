"""Models that are built on first use instead of loaded: the tiny test models and random full-size ones."""

from __future__ import annotations

from pathlib import Path

from diffusion.random_flow_models import build_random_flow_pipeline
from diffusion.random_models import build_random_pipeline
from diffusion.tiny import build_tiny_pipeline
from diffusion.tiny_flow import FLOW_KINDS, build_tiny_flow_pipeline
from utils.errors import ConfigError

BUILDS = {"tiny": "sd", "tiny_sd2": "sd2", "tiny_sdxl": "sdxl", "tiny_sd3": "sd3", "tiny_flux": "flux",
          "random_sd15": "sd15", "random_sdxl": "sdxl", "random_sd3": "sd3", "random_flux": "flux"}


def ensure_built_pipeline(path: str | Path, build: str) -> Path:
    """Build the model named `build` at `path` unless a folder is already there."""
    if build not in BUILDS:
        raise ConfigError(f"model.build={build!r} is unknown; use one of {list(BUILDS)} or null")
    path = Path(path)
    if not path.exists():
        if build.startswith("random_"):
            builder = build_random_flow_pipeline if BUILDS[build] in FLOW_KINDS else build_random_pipeline
            builder(path, BUILDS[build])
        elif BUILDS[build] in FLOW_KINDS:
            build_tiny_flow_pipeline(path, BUILDS[build])
        else:
            build_tiny_pipeline(path, BUILDS[build])
    return path
