"""Concepts and masks learned jointly on the shapes world: mask IoU over EM rounds and concept fidelity,
for EM vs fixed initial masks vs ground-truth masks (the paper's Fig. 3 and its generation comparison).

    python benchmarks/em_shapes.py train --out runs/em [--only em,fixed] [overrides ...]
    python benchmarks/em_shapes.py evaluate --out runs/em          # -> runs/em/results.json
    python benchmarks/em_shapes.py localisation --out runs/em      # does the model's attention find objects?

`train` runs train.py method=em_mask for each variant on the 10 two-object scenes of
assets/shapes_scenes (two subject tokens and a background token each). `evaluate` reads each run's
masks/iou.json (IoU with the true masks per token type and round: the masks training used, and those
estimated from the tokens' attention) and generates with the learnt tokens and weights:
- each subject token in new prompts ("a medium <c> on a <bg> background" on two backgrounds other than
  its scene's, "a small <c> left of a large <other> on a <bg> background"), 5 seeds: shape, colour and
  texture accuracy of the probes' reading against the concept's attributes;
- each background token ("a medium <colour> <shape> on a <bg-token> background"), 5 seeds: background
  accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

VARIANTS = ("em", "fixed", "ground_truth")
SEEDS = (0, 1, 2, 3, 4)
SCENES = ROOT / "assets" / "shapes_scenes"


def train(out: Path, only: list[str], extra: list[str], trainer: str) -> None:
    procs = {}
    for variant in VARIANTS:
        if only and variant not in only:
            continue
        args = [sys.executable, "train.py", "method=em_mask", f"module.masks={variant}", f"trainer={trainer}",
                "logger=csv", f"hydra.run.dir={out / variant}", "callbacks.progress_bar.refresh_rate=0", *extra]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{variant}.log", "w")
        procs[variant] = (subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.time())
    for variant, (proc, start) in procs.items():
        print(f"{variant}: exit {proc.wait()}, {time.time() - start:.0f} s", flush=True)


def iou_curves(run: Path) -> dict:
    """{kind: {role: [mean IoU per round]}} from the run's masks/iou.json."""
    rows = json.loads((run / "masks" / "iou.json").read_text())
    curves: dict = {}
    for kind in ("used", "estimated"):
        for role in ("subject", "background"):
            rounds = sorted({r["round"] for r in rows})
            curves.setdefault(kind, {})[role] = [
                statistics.fmean(r["iou"] for r in rows if r["round"] == k and r["kind"] == kind and r["role"] == role)
                for k in rounds]
    return curves


def fidelity_jobs(entries: list[dict]) -> list[tuple[str, "object", str]]:
    """(prompt, the scene the probes should read, what it measures) for every learnt concept."""
    from datamodules.shapes.world import COLOURS, SHAPES, ObjectSpec, Scene, contrasting_backgrounds

    jobs = []
    for entry in entries:
        attrs = entry["attributes"]
        for token in entry["concepts"]:
            a = attrs[token]
            if token == entry.get("background"):
                shape = "circle"
                colour = next(c for c in ("red", "yellow", "blue", "white")
                              if a["background"] in contrasting_backgrounds(c))
                scene = Scene(a["background"], [ObjectSpec(shape, colour, 0.235, 0.5, 0.5)])
                jobs.append((f"a medium {colour} {shape} on a {token} background", scene, "background"))
                continue
            others = [b for b in contrasting_backgrounds(a["colour"]) if b != attrs[entry["background"]]["background"]]
            for bg in others[:2]:
                scene = Scene(bg, [ObjectSpec(a["shape"], a["colour"], 0.235, 0.5, 0.5, a["texture"])])
                jobs.append((f"a medium {token} on a {bg} background", scene, "subject"))
            other_shape = next(s for s in SHAPES if s != a["shape"])
            other_colour = next(c for c in COLOURS if c != a["colour"] and others[0] in contrasting_backgrounds(c))
            scene = Scene(others[0], [ObjectSpec(a["shape"], a["colour"], 0.155, 0.3, 0.5, a["texture"]),
                                      ObjectSpec(other_shape, other_colour, 0.33, 0.7, 0.5)], "left of")
            jobs.append((f"a small {token} left of a large {other_colour} {other_shape} on a {others[0]} background",
                         scene, "subject"))
    return jobs


def fidelity(run: Path, device: str, num_steps: int, entries: list[dict]) -> dict:
    from diffusion.artifacts import load_artifact
    from diffusion.backbone import load_backbone
    from diffusion.sampling import generate
    from metrics.shapes_probes import default_probe, score_readings

    backbone = load_backbone(str(ROOT / "models" / "shapes"), dtype="bfloat16" if device == "cuda" else None)
    load_artifact(backbone, run)  # every concept token and the joint stage's weights; prompts name the tokens
    backbone.to(device)
    jobs = [(p, scene, kind, s) for p, scene, kind in fidelity_jobs(entries) for s in SEEDS]
    start = time.time()
    images = []
    for i in range(0, len(jobs), 250):
        chunk = jobs[i:i + 250]
        images.append(generate(backbone, [j[0] for j in chunk], seed=[j[3] for j in chunk],
                               num_steps=num_steps).float().cpu())
    print(f"{run.name}: {len(jobs)} images in {time.time() - start:.0f} s", flush=True)
    readings = default_probe().read(torch.cat(images).clamp(0, 1))
    out: dict = {}
    for kind, keys in (("subject", ("shape", "colour", "texture")), ("background", ("background",))):
        scores = [score_readings([reading], [job[1]]) for reading, job in zip(readings, jobs) if job[2] == kind]
        for key in keys:  # the concept is the scene's first object
            out[f"{kind}_{key}"] = statistics.fmean(float(score[key][0]) for score in scores)
    out["images"] = len(jobs)
    return out


def evaluate(out: Path, device: str, num_steps: int) -> dict:
    entries = json.loads((SCENES / "scenes.json").read_text())
    results: dict = {"num_steps": num_steps, "seeds": list(SEEDS)}
    for variant in VARIANTS:
        run = out / variant
        if not (run / "concepts.json").is_file():
            continue
        results[variant] = {"iou": iou_curves(run), "fidelity": fidelity(run, device, num_steps, entries)}
        print(variant, json.dumps(results[variant]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def localisation(device: str, model: str, num_timesteps: int = 30) -> dict:
    """Does the model's cross-attention find the objects of these 10 scenes? Each scene prompted with its own
    caption, measured as benchmarks/shapes_localisation.py measures fresh scenes (each object's shape and
    colour word inside its mask over outside, the background colour word on the background over on the
    objects; 1 = no localisation), per resolution of the down / up layers, over random timesteps."""
    from datamodules.shapes.scenes import two_object_scenes
    from diffusion.backbone import load_backbone
    from shapes_localisation import measure

    entries = json.loads((SCENES / "scenes.json").read_text())
    scenes = two_object_scenes(len(entries))  # the scenes assets/shapes_scenes was rendered from (seed 0)
    backbone = load_backbone(model, dtype="float32").to(device)
    out = measure(backbone, scenes, num_timesteps, seed=0)
    print(json.dumps(out, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "evaluate", "localisation"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", type=lambda text: text.split(","), default=[],
                        help="train only these variants, comma-separated (em,fixed)")
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps when evaluating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=str(ROOT / "models" / "shapes"), help="localisation: the model to read")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after the options)")
    args = parser.parse_intermixed_args()
    if args.phase == "train":
        train(args.out, args.only, args.overrides, args.trainer)
    elif args.phase == "evaluate":
        evaluate(args.out, args.device, args.num_steps)
    else:
        localisation(args.device, args.model)


if __name__ == "__main__":
    main()
