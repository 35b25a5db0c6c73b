"""A diffusers pipeline's model_index.json (a hub id's), and the rectified-flow kind its class names: what both
backbone loaders (diffusion/backbone.py, diffusion/flow.py) read to tell SD3 and FLUX from Stable Diffusion."""

from __future__ import annotations

import json
from pathlib import Path

from utils.errors import ModelLoadError


def hub_model_index(repo: str, revision: str | None, key: str = "model.path") -> dict:
    """The hub id's model_index.json (from the local Hugging Face cache when offline); one line when unreachable."""
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(repo, "model_index.json", revision=revision)).read_text())
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
        raise ModelLoadError(f"{key}={repo} is neither a local folder nor a reachable hub id "
                             f"({type(e).__name__}); download the model and point {key} at its folder") from e


def flow_kind(index: dict) -> str | None:
    """sd3 or flux when the pipeline class is StableDiffusion3* / Flux*, else None."""
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    return None
