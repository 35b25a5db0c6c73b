"""The shipped shapes-world models (models/shapes, models/shapes_b) and concept reference sets."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shapes.concepts import REFERENCE_RENDERS, reference_scenes, write_reference_set
from datamodules.shapes.world import CONCEPTS, SceneSampler
from diffusion.backbone import load_backbone
from diffusion.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"shapes": ROOT / "models" / "shapes", "shapes_b": ROOT / "models" / "shapes_b"}
CONCEPT_SETS = ROOT / "assets" / "shapes_concepts"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def test_shipped_models_fit_the_size_budget():
    total = sum(p.stat().st_size for folder in MODELS.values() for p in _files(folder))
    assert total <= 60 * 2 ** 20, f"{total / 2 ** 20:.1f} MB"


def test_shapes_b_shares_the_text_encoder_and_has_its_own_unet():
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert (MODELS["shapes_b"] / part).resolve() == (MODELS["shapes"] / part).resolve()
    configs = [json.loads((MODELS[m] / "unet" / "config.json").read_text()) for m in MODELS]
    assert configs[0]["block_out_channels"] != configs[1]["block_out_channels"]
    assert configs[0]["cross_attention_dim"] == configs[1]["cross_attention_dim"]


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_model_loads_in_diffusers(name):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODELS[name]), safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert "_name_or_path" not in json.loads((MODELS[name] / "unet" / "config.json").read_text())


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "models").iterdir() if p.is_dir()))
def test_stock_diffusers_samples_every_shipped_folder_without_a_dtype(folder):
    """As the README shows it: from_pretrained(path) with no dtype argument, then a call, on the CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "models" / folder))
    images = pipe("a large red circle on a gray background", num_inference_steps=2, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_model_samples_through_our_loader(name):
    backbone = load_backbone(str(MODELS[name]), dtype="float32")
    assert backbone.resolution == 64
    images = generate(backbone, ["a large red circle on a gray background"], num_steps=4, guidance_scale=5.0)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_default_model_follows_single_object_prompts():
    """Eight held-out single-object captions, 25 DDIM steps: the probes read the background, shape and
    colour asked for in most of them (the full measurement is benchmarks/shapes_quality.py)."""
    from metrics.shapes_probes import ShapesProbe, score_readings

    sampler = SceneSampler(two_object_p=0.0, badge_p=0.0)
    scenes = [sampler.sample(random.Random(50_000 + i)) for i in range(8)]
    backbone = load_backbone(str(MODELS["shapes"]), dtype="float32")
    images = generate(backbone, [s.caption() for s in scenes], seed=0, num_steps=25, guidance_scale=5.0)
    scores = score_readings(ShapesProbe.load().read(images), scenes, caption_only=True)
    assert scores["background"].mean() >= 0.85
    assert scores["shape"].mean() >= 0.75 and scores["colour"].mean() >= 0.75


# ----- concept reference sets ---------------------------------------------------------------------
def test_reference_sets_are_shipped_and_reproducible(tmp_path):
    for name in CONCEPTS:
        shipped = CONCEPT_SETS / name
        fresh = write_reference_set(name, tmp_path)
        for sub in ("images", "masks"):
            names = sorted(p.name for p in (shipped / sub).glob("*.png"))
            assert names == [f"{i:02d}.png" for i in range(REFERENCE_RENDERS)]
            for n in names:
                assert np.array_equal(np.asarray(Image.open(shipped / sub / n)), np.asarray(Image.open(fresh / sub / n)))
        assert json.loads((shipped / "images" / "captions.json").read_text()) == \
            json.loads((fresh / "images" / "captions.json").read_text())


def test_reference_renders_vary_and_masks_cover_the_badge():
    for name in CONCEPTS:
        scenes = reference_scenes(name)
        assert len({s.background for s in scenes}) >= 4           # varied backgrounds
        assert len({round(s.objects[0].size, 3) for s in scenes}) == len(scenes)
        captions = json.loads((CONCEPT_SETS / name / "images" / "captions.json").read_text())
        for i, scene in enumerate(scenes):
            assert captions[f"{i:02d}"] == f"a {scene.objects[0].size_word} {{}} on a {scene.background} background"
            image = np.asarray(Image.open(CONCEPT_SETS / name / "images" / f"{i:02d}.png")).astype(int)
            mask = np.asarray(Image.open(CONCEPT_SETS / name / "masks" / f"{i:02d}.png")) > 127
            assert 0.02 < mask.mean() < 0.6
            corner = image[0, 0]
            assert (np.abs(image[~mask] - corner).sum(-1) < 30).mean() > 0.97  # outside the mask: background
            assert (np.abs(image[mask] - corner).sum(-1) < 30).mean() < 0.05   # inside: the badge


def test_unknown_concept_is_an_error(tmp_path):
    with pytest.raises(KeyError, match="unknown concept"):
        write_reference_set("my_dog", tmp_path)
