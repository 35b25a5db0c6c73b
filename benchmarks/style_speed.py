"""StyleDiffusion against null-text inversion on full-size random-weight SD1.5: inversion and editing time.

    python benchmarks/style_speed.py --model sd15_random --out runs/style_speed [--repeats 3]

One shapes-world scene at the model's resolution, source "a photo of a red circle", target "a photo of
a blue circle" (equal word counts: AttentionReplace). Timed on the same backbone (fp32 weights, TF32
matrix products):

- null-text inversion at its own N = 50 (Mokady et al.'s settings, up to 10 Adam steps per step, its DDIM
  inversion included), eager and with the UNet's CUDA graphs (the default), in fp32 and with bf16 UNet
  weights, each with the PSNR of its guided reconstruction of the image (`null_text_50`);
- inversion of one image at T = 30: the DDIM trajectory with its 16x16 maps, then Algorithm 1
  (`StyleDiffusionFitter.fit`, the paper's K_t and Adam), and null-text inversion of the same
  trajectory at T = 30;
- one editing pass [source replay, target] at T = 30 with the P2Plus controller: StyleDiffusion (value
  injection until tau_v T) against null-text + P2P and null-text + P2Plus (per-step unconditional
  embeddings), in turns, median over `--repeats` after one warm-up round. Seconds per step = pass / T.

The paper gives 0.30 s (StyleDiffusion) against 0.28 s (null-text) per editing step; the target here
is StyleDiffusion's step within 10% of null-text's. Writes <out>/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
SOURCE, TARGET = "a photo of a red circle", "a photo of a blue circle"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def null_text_variants(backbone, image: torch.Tensor, z0: torch.Tensor, w: float, n: int = 50) -> dict:
    """Null-text inversion at N = 50 (its DDIM inversion included), eager and graphed, with fp32 and bf16
    weights: seconds, Adam iterations and the PSNR (dB) of the guided reconstruction against the image."""
    from diffusion.inversion import null_text_inversion, reconstruct
    from diffusion.sampling import ddim_invert
    from metrics.image_quality import PSNR

    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        backbone.to(dtype)  # frozen weights in bf16, as training keeps them; the null embedding stays fp32
        cond = backbone.encode_prompt([SOURCE])
        for graphs in (False, True):
            def run():
                with torch.no_grad():
                    trajectory = ddim_invert(backbone, z0, cond, n, cuda_graphs=graphs)
                return trajectory, null_text_inversion(backbone, trajectory, cond, n, w, cuda_graphs=graphs)

            (trajectory, schedule), seconds = timed(run)
            with torch.no_grad():
                pixels = backbone.decode_latents(reconstruct(backbone, trajectory, cond, schedule, n, w).float())
            name = f"{'fp32' if dtype == torch.float32 else 'bf16'}_{'graphs' if graphs else 'eager'}"
            rows[name] = {"seconds": seconds, "iterations": sum(schedule.iterations),
                          "psnr_db": PSNR().per_image(pixels.cpu(), image[None].cpu().float()).item()}
            print(name, json.dumps(rows[name]), flush=True)
    backbone.to(torch.float32)
    return rows


def load(model: str, device: str):
    from diffusion.backbone import load_backbone
    from utils.config import model_config

    config = {k: v for k, v in model_config(model).items() if k != "dtype"}
    return load_backbone(**config, dtype="float32").to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15_random")
    parser.add_argument("--steps", type=int, default=30, help="T of the inversions and the edits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="base", help="random image encoder architecture (base = ViT-B/16)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "style_speed")
    args = parser.parse_args()

    from datamodules.image_set import load_image
    from diffusion.attention import AttentionHub
    from diffusion.editing import load_edit_method, sample_controlled
    from diffusion.image_encoder import ensure_encoder
    from diffusion.inversion import invert_latents, null_text_inversion
    from diffusion.style_editing import edit
    from diffusion.style_inversion import FitSettings, StyleDiffusionFitter

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load(args.model, device)
    n, w = args.steps, 7.5
    image = load_image(ROOT / "assets" / "shapes_scenes" / "00.png", backbone.resolution)
    z0 = backbone.encode_images(image[None].to(device), torch.Generator(device).manual_seed(0)).float()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    result: dict = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "T": n, "guidance_scale": w, "repeats": args.repeats}
    result["null_text_50"] = null_text_variants(backbone, image.to(device), z0, w)

    encoder = ensure_encoder(args.out / f"clip-vit-{args.encoder}", args.encoder).to(device)
    fitter = StyleDiffusionFitter.create(backbone, encoder, FitSettings.from_yaml(n, w))
    trajectory, result["ddim_inversion_s"] = timed(lambda: invert_latents(backbone, z0, SOURCE, n))
    cond_src = backbone.encode_prompt([SOURCE])
    latents = [z[None].to(device) for z in trajectory.latents]
    # before the hub: null-text inversion's UNet calls replay graphs only through diffusers' own processors
    schedule, result["null_text_s"] = timed(lambda: null_text_inversion(backbone, latents, cond_src, n, w))
    result["null_text_iterations"] = sum(schedule.iterations)
    generator = torch.Generator(device).manual_seed(0)
    hub = AttentionHub(backbone.unet)  # StyleDiffusion's value input goes through the hub's processors
    inversion, result["style_diffusion_fit_s"] = timed(
        lambda: fitter.fit(hub, image[None].to(device), SOURCE, trajectory, "scene_00", generator))
    result["style_diffusion_iterations"] = sum(inversion.iterations)

    cond = backbone.encode_prompt([SOURCE, TARGET])
    p2p, p2plus = (load_edit_method(name).controllers(backbone, SOURCE, TARGET)[0]
                   for name in ("null_text_p2p", "null_text_p2plus"))  # tau_u: None, and P2Plus's 0.5
    passes = {
        "style_diffusion_p2plus": lambda: edit(backbone, hub, inversion, [TARGET], guidance_scale=w),
        "null_text_p2p": lambda: sample_controlled(backbone, cond, latents[-1], schedule, n, w, p2p),
        "null_text_p2plus": lambda: sample_controlled(backbone, cond, latents[-1], schedule, n, w, p2plus),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    with torch.no_grad():
        for r in range(args.repeats + 1):  # in turns; round 0 warms up
            for name, fn in passes.items():
                _, seconds = timed(fn)
                if r:
                    times[name].append(seconds)
    hub.restore()
    per_step = {name: statistics.median(t) / n for name, t in times.items()}
    result["edit_s_per_step"] = per_step
    result["style_over_null_text"] = per_step["style_diffusion_p2plus"] / per_step["null_text_p2p"]
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
