"""Training speed of a method on full-size random-weight architectures (same compute as real weights).

    python benchmarks/train_speed.py --models sd15_random sdxl_random --steps 60 [--method textual_inversion]

Runs train.py with trainer=gpu for each model on an image set rendered at the model's resolution,
and prints a markdown table of median seconds per step and peak GPU memory (from timing.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT / "benchmarks"))

from timing import run_timing  # noqa: E402

RESOLUTION = {"sd15_random": 512, "sdxl_random": 1024, "tiny": 64}


def render_images(folder: Path, size: int, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        im = Image.new("RGB", (size, size), (60 + 40 * i, 120, 200 - 30 * i))
        r = size // (3 + i % 2)
        ImageDraw.Draw(im).ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r), fill=(210, 30, 30))
        im.save(folder / f"{i}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15_random"])
    parser.add_argument("--method", default="textual_inversion")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--out", default=str(ROOT / "logs" / "benchmarks"))
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            images = render_images(Path(tmp) / model, RESOLUTION.get(model, 512))
            run = Path(args.out) / f"{args.method}_{model}_{os.getpid()}"
            cmd = [sys.executable, "train.py", f"method={args.method}", f"model={model}", f"trainer={args.trainer}",
                   f"trainer.max_steps={args.steps}", f"data.images_dir={images}", "logger=csv",
                   f"hydra.run.dir={run}", "callbacks.model_checkpoint.every_n_train_steps=0", *args.overrides]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            rows.append((model, run_timing(run)))
    print("\n| method | model | device | precision | median s/step | steps/s | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, t in rows:
        print(f"| {args.method} | {model} | {t['device']} | {t['precision']} | {t.get('median_step_s', float('nan')):.4f} "
              f"| {t.get('steps_per_s', float('nan')):.2f} | {t.get('peak_memory_gib', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
