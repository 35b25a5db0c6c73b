"""Personalized residuals on full-size random-weight SD1.5: training time and LAG's sampling cost.

    python benchmarks/residuals_speed.py --model sd15_random --out runs/residuals_speed [--repeats 5]

Trains method=residuals with the paper's settings (150 iterations, batch 4, trainer=gpu, bf16) on a
shapes-world reference set resized to the model's resolution, and reports the wall time of the 150
steps, the median step and the peak GPU memory (the run's timing.json); the paper's figure is about
3 minutes on one A100, the target here 60 s. The UNet replays CUDA graphs with the residuals' gradients
(`callbacks.fast_unet.mode=auto`, the default); `--eager-train` also trains with mode=null. Then times one
image (50 DDIM steps, guidance 6, the paper's sampling) with the residual everywhere and with LAG, in turns,
at each `--batches` size (images per call), each with the UNet's CUDA graphs (the default) and eager; the
target is LAG within 5%. `--profile` adds one profiled (eager) UNet call of each.
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

from timing import run_timing  # noqa: E402

sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def train(model: str, run: Path, trainer: str, overrides: list[str]) -> dict:
    from datamodules.shapes.concepts import write_reference_set
    from utils.config import model_config

    resolution = int(model_config(model).resolution)  # the shipped renders are 64 px
    images = write_reference_set("sun_medal", run.parent / "references", resolution) / "images"
    cmd = [sys.executable, "train.py", "method=residuals", f"model={model}", f"trainer={trainer}", "logger=csv",
           f"data.images_dir={images}",
           "data.templates=[\"a photo of a {}\"]", f"hydra.run.dir={run}", "callbacks.sample_grid=null",
           "callbacks.progress_bar.refresh_rate=0", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    timing = run_timing(run)
    return {"wall_s": time.time() - start, **timing}


def sample(model: str, run: Path, repeats: int, batches: list[int], profile: bool = False) -> dict:
    """Per batch size (images per call): median seconds of one 50-step image set, plain and with LAG."""
    from diffusion.backbone import load_backbone
    from diffusion.residuals import load_residuals
    from utils.config import model_config

    model_cfg = model_config(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(**{k: v for k, v in model_cfg.items() if k != "dtype"}, dtype="bfloat16").to(device)
    sampler, concept = load_residuals(backbone, run)
    out = {"repeats": repeats}
    for batch in batches:
        prompts = [f"a photo of a {concept} on the beach"] * batch
        out[f"batch_{batch}"] = time_sampling(backbone, sampler, prompts, repeats)
        if profile:
            out[f"batch_{batch}"]["profile"] = {name: profiled_step(backbone, sampler, prompts, lag)
                                                for name, lag in (("plain", False), ("lag", True))}
    return out


def time_sampling(backbone, sampler, prompts: list[str], repeats: int) -> dict:
    from diffusion.sampling import generate

    variants = {"plain_s": (False, True), "lag_s": (True, True), "plain_eager_s": (False, False),
                "lag_eager_s": (True, False)}  # name: (LAG, CUDA graphs)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):  # the variants take turns; the first round warms up
        for name, (lag, graphs) in variants.items():
            with sampler.applied(prompts, lag=lag) as hub:
                sync()
                start = time.perf_counter()
                generate(backbone, prompts, num_steps=50, guidance_scale=6.0, hub=hub, cuda_graphs=graphs)
                sync()
            if r:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {**medians, "lag_overhead": medians["lag_s"] / medians["plain_s"] - 1,
            "lag_overhead_eager": medians["lag_eager_s"] / medians["plain_eager_s"] - 1}


def profiled_step(backbone, sampler, prompts: list[str], lag: bool, top: int = 12) -> dict:
    """One guided UNet call under torch.profiler: operator count and the ops with most CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from diffusion.sampling import guided_epsilon

    cond, uncond = backbone.encode_prompt(prompts), backbone.encode_prompt([""])
    side = backbone.resolution // 8
    x = torch.randn(len(prompts), backbone.unet.config.in_channels, side, side, device=backbone.device,
                    dtype=backbone.dtype)
    t = torch.tensor(500, device=backbone.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with sampler.applied(prompts, lag=lag) as hub, torch.no_grad():
        guided_epsilon(backbone, x, t, cond, uncond, 6.0, hub)  # warm-up
        sync()
        with profile(activities=activities) as prof:
            guided_epsilon(backbone, x, t, cond, uncond, 6.0, hub)
            sync()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"aten_ops": sum(e.count for e in events),
            "top_self_cpu_us": {e.key: round(e.self_cpu_time_total) for e in events[:top]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15_random")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4],
                        help="images per sampling call, comma-separated")
    parser.add_argument("--profile", action="store_true", help="also profile one plain and one LAG UNet call")
    parser.add_argument("--eager-train", action="store_true", help="also train with an eager UNet (fast_unet null)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "residuals_speed")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_intermixed_args()
    run = args.out / f"residuals_{args.model}"
    result = {"model": args.model, "train": train(args.model, run, args.trainer, args.overrides)}
    print("train", json.dumps(result["train"]), flush=True)
    if args.eager_train:
        result["train_eager"] = train(args.model, args.out / f"residuals_{args.model}_eager", args.trainer,
                                      [*args.overrides, "callbacks.fast_unet.mode=null"])
        print("train eager", json.dumps(result["train_eager"]), flush=True)
    result["sample"] = sample(args.model, run, args.repeats, args.batches, args.profile)
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
