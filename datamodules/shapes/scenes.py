"""Two-object scenes with exact masks: the shapes world's test bed for learning concepts and masks jointly.

    python -m datamodules.shapes.scenes --out assets/shapes_scenes --count 10

writes `NN.png` (a two-object scene), `NN_c0.png`, `NN_c1.png`, `NN_bg.png` (exact masks: the left or
upper object, the other, the background) and `scenes.json` in the layout of datamodules/scenes.py.
Each scene's concepts are its own tokens `<sNN_c0>`, `<sNN_c1>`, `<sNN_bg>`, and each entry's
`attributes` say what they are (shape, colour, texture; the background colour), which the probes
check in generations. The scenes are a function of `seed` alone.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from datamodules.image_set import save_mask
from datamodules.shapes.render import render_scene
from datamodules.shapes.world import Scene, SceneSampler
from utils.images import to_pil
from utils.io import atomic_dir, write_json


def two_object_scenes(count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes of two plain objects that differ in shape and colour."""
    rng = random.Random(f"two-object-scenes/{seed}")
    sampler = SceneSampler(two_object_p=1.0, badge_p=0.0)
    scenes = []
    while len(scenes) < count:
        scene = sampler.sample(rng)
        a, b = scene.objects
        if a.shape != b.shape and a.colour != b.colour:
            scene.objects.sort(key=lambda o: (o.x, o.y) if scene.relation in ("left of", "right of") else (o.y, o.x))
            scenes.append(scene)
    return scenes


def write_scene_set(out_dir: str | Path, count: int = 10, resolution: int = 64, seed: int = 0) -> Path:
    """Write the set into out_dir (replaced whole, through a temporary folder); return out_dir."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        entries = []
        for i, scene in enumerate(two_object_scenes(count, seed)):
            image, masks = render_scene(scene, resolution)
            stem = f"{i:02d}"
            to_pil(image).save(staging / f"{stem}.png")
            tokens = [f"<s{stem}_c0>", f"<s{stem}_c1>", f"<s{stem}_bg>"]
            background = 1 - masks.sum(0).clamp(max=1)
            for suffix, mask in zip(("c0", "c1", "bg"), (masks[0], masks[1], background)):
                save_mask(mask, staging / f"{stem}_{suffix}.png")
            attributes = {tok: {"shape": o.shape, "colour": o.colour, "texture": o.texture}
                          for tok, o in zip(tokens, scene.objects)}
            attributes[tokens[2]] = {"background": scene.background}
            entries.append({"image": f"{stem}.png", "concepts": tokens, "background": tokens[2],
                            "masks": {t: f"{stem}_{s}.png" for t, s in zip(tokens, ("c0", "c1", "bg"))},
                            "attributes": attributes})
        write_json(staging / "scenes.json", entries)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/shapes_scenes")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_scene_set(args.out, args.count, args.resolution, args.seed))


if __name__ == "__main__":
    main()
