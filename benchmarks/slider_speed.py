"""Prompt slider vs LoRA (Concept) slider on full-size random-weight SD1.5 / SDXL: training and sampling cost.

    python benchmarks/slider_speed.py train --models sd15_random sdxl_random --steps 40 --out runs/speed
    python benchmarks/slider_speed.py sample --models sd15_random sdxl_random --repeats 5

`train` runs train.py (trainer=gpu, slider=age) for method=prompt_slider and method=concept_slider and
prints the median and mean seconds per iteration and the peak GPU memory from each run's timing.json. `sample` times one image (50 DDIM steps, guidance 7.5,
bf16) with the plain model, with a prompt slider in the prompt, and with a rank-4 LoRA slider on the
UNet (unmerged, as sliders are used with a strength), in turns, and the time to load the LoRA file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from timing import run_timing, sync, time_in_turns  # noqa: E402


def train(models: list[str], methods: list[str], steps: int, out: Path, overrides: list[str]) -> list[dict]:
    rows = []
    for model in models:
        for method in methods:
            run = out / f"{method}_{model}"
            cmd = [sys.executable, "train.py", f"method={method}", f"model={model}", "slider=age", "trainer=gpu",
                   f"trainer.max_steps={steps}", "logger=csv", f"hydra.run.dir={run}", "callbacks.sample_grid=null",
                   "callbacks.progress_bar.refresh_rate=0", *overrides]
            start = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            timing = run_timing(run)
            rows.append({"method": method, "model": model, "wall_s": time.time() - start, **timing})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | model | median s/iter | mean s/iter | 3000 iters (median) | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['model']} | {r['median_step_s']:.3f} | {r['mean_step_s']:.3f} | "
              f"{3000 * r['median_step_s'] / 60:.1f} min | {r.get('peak_memory_gib', float('nan')):.1f} |")
    return rows


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sample(models: list[str], repeats: int) -> list[dict]:
    from diffusion.backbone import load_backbone
    from diffusion.lora import add_lora, load_lora, lora_disabled, save_lora
    from diffusion.sampling import generate
    from diffusion.sliders import LoraSlider, SliderSet, TokenSlider
    from diffusion.tokens import PlaceholderTokens
    from utils.config import model_config

    rows = []
    for model in models:
        backbone = load_backbone(**{k: v for k, v in model_config(model).items() if k != "dtype"},
                                 dtype="bfloat16").to(DEVICE)
        prompt = "a photo of a person"

        def run(p: str, sliders: SliderSet = SliderSet(), backbone=backbone):
            return generate(backbone, [p], num_steps=50, guidance_scale=7.5, encode=sliders.encoder(backbone))

        tokens = PlaceholderTokens(backbone, "<age>", encoders=[0])
        prompt_slider = SliderSet([TokenSlider("<age>", list(tokens.rows))])
        add_lora(backbone.unet, 4, 1.0, "noxattn", adapter_name="bench", init=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_lora(Path(tmp) / "lora.safetensors", backbone.unet, sdxl=backbone.is_sdxl, adapter_name="bench")
            backbone.unet.delete_adapters("bench")
            sync()
            start = time.perf_counter()
            load_lora(backbone.unet, path, adapter_name="slider")
            sync()
            load_s = time.perf_counter() - start
        lora = SliderSet([LoraSlider(backbone.unet, "slider")])
        variants = {  # the three take turns, so drifting clocks affect them alike
            "plain_s": lambda: run(prompt),
            "prompt_slider_s": lambda: run(prompt_slider.prompt(prompt), prompt_slider),
            "lora_slider_s": lambda: run(prompt, lora),
        }
        def setting(name: str):  # the LoRA stays on the UNet: off but for its own variant
            return lora_disabled(backbone.unet) if name != "lora_slider_s" else contextlib.nullcontext()

        with prompt_slider.strengths(2.0), lora.strengths(2.0):
            medians = time_in_turns(variants, repeats, setting)
        params = sum(p.numel() for n, p in backbone.unet.named_parameters() if "lora_" in n)
        rows.append({"model": model, **medians, "lora_load_s": load_s, "lora_params": params, "repeats": repeats})
        print(json.dumps(rows[-1]), flush=True)
        backbone = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | plain s/image | prompt slider | LoRA slider | LoRA load s | LoRA params |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['plain_s']:.3f} | {r['prompt_slider_s']:.3f} "
              f"({100 * (r['prompt_slider_s'] / r['plain_s'] - 1):+.1f}%) | {r['lora_slider_s']:.3f} "
              f"({100 * (r['lora_slider_s'] / r['plain_s'] - 1):+.1f}%) | {r['lora_load_s']:.2f} | "
              f"{r['lora_params'] / 1e6:.2f}M |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("train", "sample"))
    parser.add_argument("--models", nargs="+", default=["sd15_random", "sdxl_random"])
    parser.add_argument("--methods", nargs="+", default=["prompt_slider", "concept_slider"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmarks" / "sliders")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    rows = train(args.models, args.methods, args.steps, args.out, args.overrides) if args.phase == "train" else \
        sample(args.models, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.phase}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
