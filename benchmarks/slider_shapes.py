"""Prompt Sliders on the shapes world: the size sweep, erasing, composition and transfer, measured by probes.

    python benchmarks/slider_shapes.py train --out runs/sliders          # the sliders (GPU: a few minutes)
    python benchmarks/slider_shapes.py evaluate --out runs/sliders       # -> runs/sliders/results.json

`train` runs train.py for each slider below (concurrently: each is small), `evaluate` loads the
artifacts and measures, with the same prompts and seeds for every method:
- size: 50 prompts x 5 seeds x alpha in {0, 0.5, 1, 2, 3}: mean Spearman correlation of the read object
  area with alpha per (prompt, seed), and shape / colour / background accuracy per alpha, for the prompt
  slider (paper), the reference-code variant and the LoRA Concept Slider;
- erase: prompts naming red, the share read as red without and with the erased word; other colours'
  accuracy without and with it;
- composition: size and dark-background sliders alone and together (strength 2 each): each one's effect
  (area gain; background luminance drop) with the other on, as a share of its effect alone;
- transfer: the size slider trained on shapes, used on shapes_b, against shapes_b's own size slider.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

SIZE = ["experiment=slider_size_shapes", "callbacks.evaluation=null"]  # its training; evaluate() scores it
RUNS = {  # name: train.py overrides
    "size_paper": SIZE,
    "size_paper_eta0.5": [*SIZE, "slider.templates.0.guidance_scale=0.5"],
    "size_paper_eta0.33": [*SIZE, "slider.templates.0.guidance_scale=0.33"],
    # the reference code's z_t costs a partial denoising per step: 1000 steps, as the LoRA baseline's recipe
    "size_reference_code": ["method=prompt_slider", "slider=shapes_size", "module.variant=reference_code",
                            "trainer.max_steps=1000"],
    "size_lora": ["method=concept_slider", "slider=shapes_size"],
    "dark_paper": ["method=prompt_slider", "slider=shapes_dark"],
    "erase_red": ["experiment=slider_erase_shapes", "callbacks.evaluation=null"],
    "erase_red_eta2": ["method=prompt_slider", "slider=shapes_erase_red", "slider.templates.0.guidance_scale=2.0"],
    "size_paper_shapes_b": [*SIZE, "model=shapes_b"],
}
ALPHAS = (0.0, 0.5, 1.0, 2.0, 3.0)
SEEDS = (0, 1, 2, 3, 4)


def train(out: Path, steps: int | None, only: list[str], extra: list[str]) -> None:
    procs = {}
    for name, overrides in RUNS.items():
        if only and name not in only:
            continue
        run = out / name
        args = [sys.executable, "train.py", *overrides, "trainer=gpu", "logger=csv", f"hydra.run.dir={run}",
                "callbacks.progress_bar.refresh_rate=0", "callbacks.artifact_export.every_n_steps=250"]
        if steps:
            args.append(f"trainer.max_steps={steps}")  # after the run's own: it wins
        args += extra
        run.parent.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.time())
    for name, (proc, start) in procs.items():
        code = proc.wait()
        timing = out / name / "timing.json"
        step = json.loads(timing.read_text())["median_step_s"] if timing.is_file() else None
        print(f"{name}: exit {code}, {time.time() - start:.0f} s, median step {step}", flush=True)


def artifact(run: Path) -> Path | None:
    """The run's final slider, else its latest periodic export (step_NNNNNN/), else None."""
    if (run / "slider.json").is_file():
        return run
    steps = sorted(run.glob("step_*/slider.json"))
    return steps[-1].parent if steps else None


def size_prompts(n: int = 50) -> list[str]:
    lines = (ROOT / "assets/prompts/shapes_size_eval.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")][:n]


def colour_prompts(colours: tuple[str, ...], n: int, seed: int) -> list[str]:
    from datamodules.shapes.world import BACKGROUNDS, SHAPES, _contrasts
    combos = [(c, s, b) for c in colours for s in SHAPES for b in BACKGROUNDS if _contrasts(c, b)]
    random.Random(seed).shuffle(combos)
    return [f"a medium {c} {s} on a {b} background" for c, s, b in combos[:n]]


class Renderer:
    def __init__(self, model: str, device: str, num_steps: int, batch_size: int = 250):
        from diffusion.backbone import load_backbone
        self.backbone = load_backbone(str(ROOT / "models" / model), dtype="bfloat16" if device == "cuda" else None)
        self.backbone.to(device)
        self.num_steps, self.batch_size = num_steps, batch_size

    def load(self, run: Path):
        from diffusion.sliders import load_slider
        return load_slider(self.backbone, run)

    def images(self, prompts: list[str], sliders, strengths) -> torch.Tensor:
        """[P * S, 3, H, W]: every prompt x seed, with the sliders at `strengths`."""
        from diffusion.sampling import generate
        from diffusion.sliders import SliderSet
        slider_set = SliderSet(sliders)
        jobs = [(slider_set.prompt(p), s) for p in prompts for s in SEEDS]
        out = []
        with slider_set.strengths(strengths if sliders else None):
            for i in range(0, len(jobs), self.batch_size):
                chunk = jobs[i:i + self.batch_size]
                out.append(generate(self.backbone, [p for p, _ in chunk], seed=[s for _, s in chunk],
                                    num_steps=self.num_steps, encode=slider_set.encoder(self.backbone)).float().cpu())
        return torch.cat(out)


def read(images: torch.Tensor):
    from metrics.shapes_probes import default_probe
    return default_probe().read(images.clamp(0, 1))


def size_sweep(renderer: Renderer, run: Path, prompts: list[str]) -> dict:
    from datamodules.shapes.world import parse_caption
    from metrics.shapes_metrics import spearman
    from metrics.shapes_probes import score_readings
    slider = renderer.load(run)
    scenes = [parse_caption(p) for p in prompts for _ in SEEDS]
    areas, accuracy = [], {}
    for alpha in ALPHAS:
        readings = read(renderer.images(prompts, [slider], alpha))
        areas.append(torch.tensor([r.objects[0].area if r.objects else 0.0 for r in readings]))
        scores = score_readings(readings, scenes, caption_only=True)
        accuracy[alpha] = {k: float(scores[k].nanmean()) for k in ("shape", "colour", "background")}
    areas = torch.stack(areas, 1)  # [P * S, alphas]
    rho = torch.stack([spearman(torch.tensor(ALPHAS), a) for a in areas])
    base = accuracy[0.0]
    kept = {k: min(accuracy[a][k] / base[k] for a in ALPHAS) for k in base}
    return {"spearman": float(rho.mean()), "area": dict(zip(map(str, ALPHAS), areas.mean(0).tolist())),
            "accuracy": {str(a): v for a, v in accuracy.items()}, "accuracy_kept_min": kept,
            "area_gain": float((areas[:, -1] - areas[:, 0]).mean())}


def erase(renderer: Renderer, run: Path) -> dict:
    from datamodules.shapes.world import parse_caption
    from metrics.shapes_probes import score_readings
    named = colour_prompts(("red",), 50, seed=1)
    others = colour_prompts(("orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown"), 50, 2)

    def colour_accuracy(prompts):
        readings = read(renderer.images(prompts, [], None))
        return float(score_readings(readings, [parse_caption(p) for p in prompts for _ in SEEDS],
                                    caption_only=True)["colour"].nanmean())
    before = {"red": colour_accuracy(named), "others": colour_accuracy(others)}
    renderer.load(run)  # the erased word's trained rows replace its own
    after = {"red": colour_accuracy(named), "others": colour_accuracy(others)}
    return {"red_shown_before": before["red"], "red_shown_after": after["red"],
            "other_colours_before": before["others"], "other_colours_after": after["others"]}


def composition(renderer: Renderer, size_run: Path, dark_run: Path, strength: float = 2.0) -> dict:
    from metrics.shapes_probes import estimate_background
    prompts = [p.rsplit(" on a ", 1)[0] + " on a gray background" for p in size_prompts()]
    sliders = [renderer.load(size_run), renderer.load(dark_run)]
    measured = {}
    for s_size, s_dark in ((0, 0), (strength, 0), (0, strength), (strength, strength)):
        images = renderer.images(prompts, sliders, [s_size, s_dark])
        readings = read(images)
        area = torch.tensor([r.objects[0].area if r.objects else 0.0 for r in readings]).mean()
        luminance = estimate_background(images).mean()
        measured[(s_size, s_dark)] = (float(area), float(luminance))
    s = strength
    size_alone = measured[(s, 0)][0] - measured[(0, 0)][0]
    size_with_dark = measured[(s, s)][0] - measured[(0, s)][0]
    dark_alone = measured[(0, 0)][1] - measured[(0, s)][1]
    dark_with_size = measured[(s, 0)][1] - measured[(s, s)][1]
    return {"strength": s, "area_gain_alone": size_alone, "area_gain_with_dark": size_with_dark,
            "size_effect_kept": size_with_dark / size_alone, "luminance_drop_alone": dark_alone,
            "luminance_drop_with_size": dark_with_size, "dark_effect_kept": dark_with_size / dark_alone,
            "conditions": {f"size={a},dark={b}": v for (a, b), v in measured.items()}}


def evaluate(out: Path, device: str, num_steps: int, only: list[str]) -> dict:
    results: dict = {"num_steps": num_steps, "seeds": list(SEEDS), "alphas": list(ALPHAS)}
    prompts = size_prompts()
    start = time.time()
    shapes = Renderer("shapes", device, num_steps)
    runs = {name: artifact(out / name) if not only or name in only else None for name in RUNS}
    results["artifacts"] = {name: str(path.relative_to(out)) for name, path in runs.items() if path}
    for name, path in runs.items():
        if name.startswith("size_") and "shapes_b" not in name and path:
            results[name] = size_sweep(Renderer("shapes", device, num_steps), path, prompts)
            print(name, json.dumps(results[name]["spearman"]), results[name]["accuracy_kept_min"], flush=True)
    for name in ("erase_red", "erase_red_eta2"):
        if runs[name]:
            results[name] = erase(Renderer("shapes", device, num_steps), runs[name])
            print(name, results[name], flush=True)
    if runs["dark_paper"] and artifact(out / "size_paper"):
        results["composition"] = composition(shapes, artifact(out / "size_paper"), runs["dark_paper"])
        print("composition", {k: v for k, v in results["composition"].items() if k != "conditions"}, flush=True)
    if runs["size_paper_shapes_b"] and artifact(out / "size_paper"):
        transferred = size_sweep(Renderer("shapes_b", device, num_steps), artifact(out / "size_paper"), prompts)
        own = size_sweep(Renderer("shapes_b", device, num_steps), runs["size_paper_shapes_b"], prompts)
        results["transfer"] = {"transferred": transferred, "own": own,
                               "spearman_kept": transferred["spearman"] / own["spearman"],
                               "area_gain_kept": transferred["area_gain"] / own["area_gain"]}
        print("transfer", results["transfer"]["spearman_kept"], results["transfer"]["area_gain_kept"], flush=True)
    results["seconds"] = time.time() - start
    (out / f"results{'_' + '_'.join(only) if only else ''}.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "evaluate"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="train.py's max_steps (default: each method's)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=[],
                        help="train / evaluate only these runs, comma-separated")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps when evaluating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for every run (after the options)")
    args = parser.parse_intermixed_args()
    if args.phase == "train":
        train(args.out, args.steps, args.only, args.overrides)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the probes read on the CPU; leave some for training
        evaluate(args.out, args.device, args.num_steps, args.only)


if __name__ == "__main__":
    main()
