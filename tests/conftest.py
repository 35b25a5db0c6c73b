"""Shared fixtures: tiny models built once per session, loaded through the same loader users take."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of the tiny SD, SD2-layout and SDXL-layout pipelines (built once)."""
    from diffusion.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: build_tiny_pipeline(root / kind, kind) for kind in ("sd", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> Path:
    return tiny_dirs["sd"]


@pytest.fixture(scope="session")
def flow_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of the tiny SD3 and FLUX pipelines (built once)."""
    from diffusion.tiny_flow import FLOW_KINDS, build_tiny_flow_pipeline

    root = tmp_path_factory.mktemp("tiny_flow_models")
    return {kind: build_tiny_flow_pipeline(root / kind, kind) for kind in FLOW_KINDS}


@pytest.fixture
def tiny(tiny_dir):
    """A fresh tiny SD backbone (fp32, CPU)."""
    from diffusion.backbone import load_backbone

    return load_backbone(str(tiny_dir))


@pytest.fixture
def tiny_sdxl(tiny_dirs):
    from diffusion.backbone import load_backbone

    return load_backbone(str(tiny_dirs["sdxl"]))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Four 80x80 RGB images of a red disc on different backgrounds, with masks."""
    from PIL import Image, ImageDraw

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, bg in enumerate([(200, 200, 200), (40, 90, 160), (230, 220, 170), (60, 140, 70)]):
        im = Image.new("RGB", (80, 80), bg)
        mk = Image.new("L", (80, 80), 0)
        box = (10 + 5 * i, 12, 50 + 5 * i, 52)
        ImageDraw.Draw(im).ellipse(box, fill=(210, 30, 30))
        ImageDraw.Draw(mk).ellipse(box, fill=255)
        im.save(images / f"{i:02d}.png")
        mk.save(masks / f"{i:02d}.png")
    return tmp_path
