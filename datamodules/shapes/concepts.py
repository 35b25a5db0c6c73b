"""Reference sets of the held-out concepts: the few images a personalization method learns from.

    python -m datamodules.shapes.concepts --out assets/shapes_concepts

writes, for each concept of `world.CONCEPTS`, `<name>/images/NN.png` (renders in varied pose, size
and background), `<name>/masks/NN.png` (white = the concept) and `<name>/images/captions.json`
(each image's caption in the world's language with '{}' where the concept's token goes, for
`data.templates=captions`). The renders are a function of the concept name and `seed` alone.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from datamodules.image_set import save_mask
from datamodules.shapes.render import render_scene
from datamodules.shapes.world import CONCEPTS, Scene, concept_scene, contrasting_backgrounds
from utils.images import to_pil
from utils.io import atomic_dir, write_json

REFERENCE_RENDERS = 5  # "a reference set of 4-5 renders" per concept


def reference_scenes(name: str, count: int = REFERENCE_RENDERS, seed: int = 0) -> list[Scene]:
    """`count` poses of concept `name`, on as many different backgrounds as its colours allow."""
    rng = random.Random(f"{name}/{seed}")
    backgrounds = contrasting_backgrounds(CONCEPTS[name].outer_colour)
    rng.shuffle(backgrounds)
    return [concept_scene(name, rng, backgrounds[i % len(backgrounds)]) for i in range(count)]


def reference_caption(scene: Scene) -> str:
    """The scene's caption with the class word left open for the concept's token."""
    obj = scene.objects[0]
    return f"a {obj.size_word} {{}} on a {scene.background} background"


def write_reference_set(name: str, out_dir: str | Path, resolution: int = 64, seed: int = 0) -> Path:
    """Write one concept's set under out_dir/name (replaced whole, through a temporary folder)."""
    if name not in CONCEPTS:
        raise KeyError(f"unknown concept {name!r}; the world's concepts are {sorted(CONCEPTS)}")
    final = Path(out_dir) / name
    with atomic_dir(final) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        captions = {}
        for i, scene in enumerate(reference_scenes(name, seed=seed)):
            image, masks = render_scene(scene, resolution)
            stem = f"{i:02d}"
            to_pil(image).save(staging / "images" / f"{stem}.png")
            save_mask(masks[0], staging / "masks" / f"{stem}.png")
            captions[stem] = reference_caption(scene)
        write_json(staging / "images" / "captions.json", captions)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/shapes_concepts")
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    for name in CONCEPTS:
        print(write_reference_set(name, args.out, args.resolution))


if __name__ == "__main__":
    main()
