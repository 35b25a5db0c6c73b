"""Seconds to sample one image (DDIM + classifier-free guidance) on the CPU or a GPU.

    python benchmarks/sampling_speed.py --model models/shapes --steps 25 --threads 2

Reports the median over --repeats single-image generations after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusion.backbone import load_backbone
from diffusion.sampling import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model).to(args.device)
    prompt = ["a small red striped star left of a medium blue circle on a gray background"]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    generate(backbone, prompt, num_steps=args.steps, guidance_scale=args.guidance)
    times = []
    for seed in range(args.repeats):
        sync()
        start = time.perf_counter()
        generate(backbone, prompt, seed=seed, num_steps=args.steps, guidance_scale=args.guidance)
        sync()
        times.append(time.perf_counter() - start)
    print(f"{args.model}: {args.steps} steps, {args.device}, {args.threads} threads: "
          f"median {statistics.median(times):.3f} s per image (min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
