"""How well a shapes-world model follows its prompts, read back by the probes.

    python benchmarks/shapes_quality.py --model models/shapes --prompts 500 --triples 100 --steps 25

Samples held-out random captions (DDIM + CFG), reads the images with metrics/shapes_probes.py and
prints per-attribute accuracy of what the captions state (a badge is named only by class and size),
the rate at which both objects of two-object prompts are right (shape and colour in the stated
relation; and with texture too), the share of size triples (the same prompt and seed with
small / medium / large) whose read areas are ordered, and, with --parts N, how often part-by-part
prompts of the held-out concepts' compositions (which no training caption holds: "a medium purple
hexagon badge with a yellow star on a gray background") are drawn with all four parts right, over N
seeds and every background the concept's colours allow. --parts-p: the share of sampled badges
captioned part by part, as in training (0 for a model that does not know the form).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from datamodules.shapes.world import CONCEPTS, SIZES, ObjectSpec, Scene, SceneSampler, contrasting_backgrounds
from diffusion.backbone import load_backbone
from diffusion.sampling import generate
from metrics.shapes_probes import ShapesProbe, score_readings


def sample_in_batches(backbone, prompts, seeds, args) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(prompts), args.batch), desc="sampling"):
        out.append(generate(backbone, prompts[i:i + args.batch], seed=seeds[i:i + args.batch],
                            num_steps=args.steps, guidance_scale=args.guidance).cpu())
    return torch.cat(out)


def concept_part_prompts(seeds: int) -> list[tuple[str, str, int]]:
    """(concept, part-by-part prompt, seed) for every held-out concept on each background it contrasts with."""
    jobs = []
    for name, badge in CONCEPTS.items():
        obj = ObjectSpec("badge", badge.outer_colour, sum(SIZES["medium"]) / 2, 0.5, 0.5, badge=badge,
                         parts_named=True)
        for background in contrasting_backgrounds(badge.outer_colour):
            jobs += [(name, Scene(background, [obj]).caption(), seed) for seed in range(seeds)]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--triples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--parts", type=int, default=0, help="seeds per held-out concept and background")
    parser.add_argument("--parts-p", type=float, default=0.5, help="share of sampled badges named part by part")
    parser.add_argument("--seed", type=int, default=10_007)  # scene seeds apart from the training stream's
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    backbone = load_backbone(args.model, dtype="bfloat16" if args.device == "cuda" else "float32").to(args.device)
    probe = ShapesProbe.load(device="cpu")
    sampler = SceneSampler(parts_p=args.parts_p)
    scenes = [sampler.sample(random.Random(args.seed + i)) for i in range(args.prompts)]
    results = {}
    if scenes:  # --prompts 0: only the size triples and part-by-part prompts
        images = sample_in_batches(backbone, [s.caption() for s in scenes], list(range(args.prompts)), args)
        scores = score_readings(probe.read(images), scenes, caption_only=True)
        results = {key: float(scores[key].nanmean()) for key in ("background", "shape", "colour", "texture", "size")}
    two = [i for i, s in enumerate(scenes) if len(s.objects) == 2]
    if two:
        per_object = score_readings(probe.read(images[two]), [scenes[i] for i in two], caption_only=True)
        stated = {key: per_object[key].nan_to_num(1.0).view(-1, 2) for key in ("shape", "colour", "texture")}
        results["two_objects_both_right"] = float((stated["shape"] * stated["colour"]).prod(1).mean())
        results["two_objects_all_stated_right"] = float(
            (stated["shape"] * stated["colour"] * stated["texture"]).prod(1).mean())

    single = SceneSampler(two_object_p=0.0, badge_p=0.0)
    triples, ordered = [], 0
    for i in range(args.triples):
        base = single.sample(random.Random(args.seed + 10 ** 6 + i))
        triples += [Scene(base.background, [replace(base.objects[0], size=sum(SIZES[w]) / 2)]) for w in SIZES]
    if triples:
        seeds = [i // 3 for i in range(len(triples))]
        areas = score_readings(probe.read(sample_in_batches(backbone, [s.caption() for s in triples], seeds, args)),
                               triples)["area"].view(-1, 3)
        ordered = float(((areas[:, 0] < areas[:, 1]) & (areas[:, 1] < areas[:, 2])).float().mean())
        results["size_triples_ordered"] = ordered
    if args.parts:
        jobs = concept_part_prompts(args.parts)
        images = sample_in_batches(backbone, [p for _, p, _ in jobs], [s for _, _, s in jobs], args)
        right = {}
        for name in CONCEPTS:
            mine = [i for i, (n, _, _) in enumerate(jobs) if n == name]
            right[name] = probe.identity_match(images[mine], name).float()
        results.update({f"parts_{name}": float(r.mean()) for name, r in right.items()})
        results["parts_all_right"] = float(torch.cat(list(right.values())).mean())
    results.update(model=args.model, prompts=args.prompts, triples=args.triples, steps=args.steps,
                   guidance=args.guidance, device=args.device)
    print("| " + " | ".join(results) + " |")
    print("| " + " | ".join("---" for _ in results) + " |")
    print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in results.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
