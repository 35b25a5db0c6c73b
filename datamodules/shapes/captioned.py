"""Captioned scenes: the shapes world's "real images" with their source prompts, for inversion and editing.

    python -m datamodules.shapes.captioned --out assets/shapes_captioned --count 3

writes `NN.png` (a scene of one or two plain objects), `prompts.json` ({stem: caption}, the layout of
datamodules/trajectories.py: `method=style_diffusion`'s default images) and `edits.json` ({stem: the caption
with the first object's colour changed}, a word swap of equal length: `edit.py`'s default edit). The set is a
function of `seed` alone.
"""

from __future__ import annotations

import argparse
import copy
import random
from pathlib import Path

from datamodules.shapes.render import render_scene
from datamodules.shapes.world import COLOURS, Scene, SceneSampler, contrasting_backgrounds
from utils.images import to_pil
from utils.io import atomic_dir, write_json


def captioned_scenes(count: int, seed: int = 0) -> list[tuple[Scene, Scene]]:
    """`count` (scene, the scene with its first object recoloured) pairs, plain objects only."""
    rng = random.Random(f"captioned-scenes/{seed}")
    sampler = SceneSampler(badge_p=0.0)
    pairs = []
    for _ in range(count):
        scene = sampler.sample(rng)
        edited = copy.deepcopy(scene)
        obj = edited.objects[0]
        obj.colour = rng.choice([c for c in COLOURS if c != obj.colour and
                                 scene.background in contrasting_backgrounds(c)])
        pairs.append((scene, edited))
    return pairs


def write_captioned_set(out_dir: str | Path, count: int = 3, resolution: int = 64, seed: int = 0) -> Path:
    """Write the set into out_dir (replaced whole, through a temporary folder); return out_dir."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        prompts, edits = {}, {}
        for i, (scene, edited) in enumerate(captioned_scenes(count, seed)):
            image, _ = render_scene(scene, resolution)
            stem = f"{i:02d}"
            to_pil(image).save(staging / f"{stem}.png")
            prompts[stem], edits[stem] = scene.caption(), edited.caption()
        write_json(staging / "prompts.json", prompts)
        write_json(staging / "edits.json", edits)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/shapes_captioned")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_captioned_set(args.out, args.count, args.resolution, args.seed))


if __name__ == "__main__":
    main()
