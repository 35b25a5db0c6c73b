"""EMMaskModule on full-size random-weight SD1.5: one full run (EM stage + joint stage), time and peak memory.

    python benchmarks/em_speed.py --model sd15_random --out runs/em_speed [--scenes 1] [--weights full]

Break-a-Scene's setting: one image (shapes-world scene 00 at the model's resolution: two subjects and a
background token, with its masks for IoU), prompts "a photo of <c0> and <bg>", the defaults of
method=em_mask otherwise (400 EM steps, masks re-estimated every 50 from 50 timesteps + DenseCRF, then
400 joint steps of tokens + UNet). trainer=gpu: bf16 autocast; the UNet the joint stage trains is
kept in fp32. Reports the wall time of each stage (from train.log's timestamps), the median step of
each, and the peak GPU memory (timing.json). Writes <out>/speed.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SCENES = ROOT / "assets" / "shapes_scenes"

from timing import run_timing  # noqa: E402

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def scene_subset(folder: Path, count: int) -> Path:
    """A scenes folder holding the first `count` shapes-world scenes (images, masks, scenes.json)."""
    records = json.loads((SCENES / "scenes.json").read_text())[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        for name in [record["image"], *record["masks"].values()]:
            shutil.copy(SCENES / name, folder / name)
    (folder / "scenes.json").write_text(json.dumps(records, indent=1))
    return folder


def stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stage_times(log: Path) -> dict:
    """Seconds from the first mask round to the joint stage's start, and from there to the end of fit."""
    lines = [line for line in log.read_text().splitlines() if STAMP.match(line)]
    first = next(stamp(line) for line in lines if "mask round 0" in line)
    joint = next((stamp(line) for line in lines if "joint stage from step" in line), None)
    end = next(stamp(line) for line in lines if "stopped: `max_steps=" in line)
    return {"em_stage_s": (joint or end) - first, "joint_stage_s": end - joint if joint else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15_random")
    parser.add_argument("--scenes", type=int, default=1, help="how many shapes-world scenes to learn at once")
    parser.add_argument("--weights", default="full", help="the joint stage's weights: full | lora | none")
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "em_speed")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_intermixed_args()
    run = args.out / f"em_{args.model}_{args.weights}"
    scenes = scene_subset(args.out / "scenes", args.scenes)
    cmd = [sys.executable, "train.py", "method=em_mask", f"model={args.model}", f"trainer={args.trainer}",
           "logger=csv", f"data.scenes_dir={scenes}", "module.prompt='a photo of {}'", "module.joiner=' and '",
           f"module.joint.weights={args.weights}", f"hydra.run.dir={run}",
           "callbacks.model_checkpoint.every_n_train_steps=0", "callbacks.progress_bar.refresh_rate=0",
           *args.overrides]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    timing = run_timing(run)
    result = {"model": args.model, "scenes": args.scenes, "joint_weights": args.weights,
              "wall_s": time.time() - start, **stage_times(run / "train.log"), **timing}
    rows = json.loads((run / "masks" / "iou.json").read_text())
    last = max(row["round"] for row in rows)  # the masks the joint stage used
    result["final_used_iou"] = {row["token"]: row["iou"] for row in rows
                                if row["round"] == last and row["kind"] == "used"}
    print(json.dumps(result, indent=2))
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
