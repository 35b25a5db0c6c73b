"""StyleDiffusion against null-text inversion on full-size random-weight SD1.5: inversion and editing time.

    python benchmarks/style_speed.py --model sd15_random --out runs/style_speed [--repeats 3]

One shapes-world scene at the model's resolution, source "a photo of a red circle", target "a photo of
a blue circle" (equal word counts: AttentionReplace). Timed on the same backbone (fp32 weights, TF32
matrix products):

- null-text inversion at its own N = 50 (Mokady et al.'s settings, up to 10 Adam steps per step, its DDIM
  inversion included), eager and with the UNet's CUDA graphs (the default), in fp32 and with bf16 UNet
  weights, each with the PSNR of its guided reconstruction of the image (`null_text_50`);
- StyleDiffusion's Algorithm 1 at T = 30 (`StyleDiffusionFitter.fit`, the paper's K_t and Adam) in the same
  four variants, each with the PSNR of its replay (`algorithm_1`; the DDIM trajectory with its 16x16 maps is
  computed before, untimed); `--variants` picks some of them (fp32_eager,bf16_graphs: the reference and the
  default on a GPU);
- in fp32: the DDIM trajectory with its maps at T = 30 and null-text inversion of it at T = 30;
- one editing pass [source replay, target] at T = 30 with the P2Plus controller: StyleDiffusion (value
  injection until tau_v T) against null-text + P2P and null-text + P2Plus (per-step unconditional
  embeddings), in turns, median over `--repeats` after one warm-up round. Seconds per step = pass / T.

The paper gives 0.30 s (StyleDiffusion) against 0.28 s (null-text) per editing step; the target here
is StyleDiffusion's step within 10% of null-text's. `--first-calls` first times the first eager UNet calls of
the process (where one-time set-up goes), `--no-cudnn-attention` keeps attention off cuDNN's fused kernel. Writes
<out>/speed.json.
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


VARIANTS = ("fp32_eager", "fp32_graphs", "bf16_eager", "bf16_graphs")


def variant_settings(variants: list[str]):
    """(name, weight dtype, graphs) of each chosen variant, fp32 first (the backbone changes dtype once)."""
    for name in VARIANTS:
        if name in variants:
            yield name, torch.float32 if name.startswith("fp32") else torch.bfloat16, name.endswith("graphs")


def psnr_of(backbone, latents: torch.Tensor, image: torch.Tensor) -> float:
    """PSNR (dB) of the decoded latents (in [0, 1]) against the image (in [-1, 1])."""
    from metrics.image_quality import PSNR

    with torch.no_grad():
        pixels = backbone.decode_latents(latents.to(backbone.dtype)).float()
    return PSNR().per_image(pixels.cpu(), image[None].cpu().float() / 2 + 0.5).item()


def null_text_variants(backbone, image: torch.Tensor, z0: torch.Tensor, w: float, variants: list[str],
                       n: int = 50, runs: int = 1) -> dict:
    """Null-text inversion at N = 50 (its DDIM inversion included), eager and graphed, with fp32 and bf16
    weights: seconds, Adam iterations and the PSNR (dB) of the guided reconstruction against the image. With
    runs > 1 each variant inverts the image again: `seconds` is the first run (with the process's one-time CUDA
    set-up, when it is the first GPU work of its kind), `later_seconds` the others."""
    from diffusion.inversion import null_text_inversion, reconstruct
    from diffusion.sampling import ddim_invert

    rows = {}
    for name, dtype, graphs in variant_settings(variants):
        backbone.to(dtype)  # frozen weights in bf16, as training keeps them; the null embedding stays fp32
        cond = backbone.encode_prompt([SOURCE])

        def run():
            with torch.no_grad():
                trajectory = ddim_invert(backbone, z0, cond, n, cuda_graphs=graphs)
            return trajectory, null_text_inversion(backbone, trajectory, cond, n, w, cuda_graphs=graphs)

        (trajectory, schedule), seconds = timed(run)
        later = [timed(run)[1] for _ in range(runs - 1)]
        replay = reconstruct(backbone, trajectory, cond, schedule, n, w)
        rows[name] = {"seconds": seconds, "iterations": sum(schedule.iterations),
                      "psnr_db": psnr_of(backbone, replay, image), **({"later_seconds": later} if later else {})}
        print("null-text", name, json.dumps(rows[name]), flush=True)
    backbone.to(torch.float32)
    return rows


def first_call_seconds(backbone, calls: int = 3) -> dict:
    """Seconds of the first `calls` eager bf16 UNet forwards (no grad) and forwards + backwards to the text
    states at batch 1, in that order: the first of each pays the kernels' one-time set-up (cuDNN's plans)."""
    backbone.to(torch.bfloat16)
    cond = backbone.encode_prompt([SOURCE])
    side = backbone.resolution // 8
    x = torch.randn(1, 4, side, side, device=backbone.device, dtype=torch.bfloat16)
    t = torch.tensor([500], device=backbone.device)

    def forward():
        with torch.no_grad():
            backbone.predict(x, t, cond)

    def backward():
        states = cond.hidden_states.clone().requires_grad_(True)
        backbone.predict(x, t, type(cond)(states, cond.pooled, cond.time_ids)).float().square().mean().backward()

    out = {name: [timed(fn)[1] for _ in range(calls)] for name, fn in (("forward", forward), ("backward", backward))}
    backbone.to(torch.float32)
    print("first calls", json.dumps(out), flush=True)
    return out


def algorithm_1_variants(backbone, hub, encoder, image: torch.Tensor, z0: torch.Tensor, n: int, w: float,
                         variants: list[str]):
    """StyleDiffusion's Algorithm 1 at T = n in each variant: seconds, Adam iterations and the PSNR of the replay
    (sampling with M_t's values from z*_T); (rows, the last variant's inversion)."""
    from diffusion.inversion import invert_latents
    from diffusion.style_editing import reconstruct
    from diffusion.style_inversion import FitSettings, StyleDiffusionFitter

    rows, inversion = {}, None
    for name, dtype, graphs in variant_settings(variants):
        backbone.to(dtype)
        trajectory = invert_latents(backbone, z0, SOURCE, n)
        fitter = StyleDiffusionFitter.create(backbone, encoder, FitSettings.from_yaml(n, w), cuda_graphs=graphs)
        generator = torch.Generator(backbone.device).manual_seed(0)
        inversion, seconds = timed(lambda: fitter.fit(hub, image[None], SOURCE, trajectory, "scene_00", generator))
        rows[name] = {"seconds": seconds, "iterations": sum(inversion.iterations),
                      "psnr_db": psnr_of(backbone, reconstruct(backbone, hub, inversion), image)}
        print("algorithm 1", name, json.dumps(rows[name]), flush=True)
    backbone.to(torch.float32)
    return rows, inversion


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
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}, for the N = 50 null-text and Algorithm 1 rows")
    parser.add_argument("--null-text-runs", type=int, default=1,
                        help="inversions per null-text variant (the first pays the process's one-time CUDA set-up)")
    parser.add_argument("--first-calls", action="store_true",
                        help="first time three eager bf16 UNet forwards, and forwards + backwards (one-time set-up)")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep scaled_dot_product_attention off cuDNN's fused kernel (flash / memory-efficient)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "style_speed")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants {args.variants!r}: each must be one of {', '.join(VARIANTS)}")

    from datamodules.image_set import load_image
    from diffusion.attention import AttentionHub
    from diffusion.editing import load_edit_method, sample_controlled
    from diffusion.image_encoder import ensure_encoder
    from diffusion.inversion import invert_latents, null_text_inversion
    from diffusion.style_editing import edit

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load(args.model, device)
    n, w = args.steps, 7.5
    image = load_image(ROOT / "assets" / "shapes_scenes" / "00.png", backbone.resolution)
    z0 = backbone.encode_images(image[None].to(device), torch.Generator(device).manual_seed(0)).float()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    result: dict = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "T": n, "guidance_scale": w, "repeats": args.repeats,
                    "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled()}
    if args.first_calls:
        result["first_calls"] = first_call_seconds(backbone)
    result["null_text_50"] = null_text_variants(backbone, image.to(device), z0, w, variants,
                                                runs=args.null_text_runs)

    encoder = ensure_encoder(args.out / f"clip-vit-{args.encoder}", args.encoder).to(device)
    hub = AttentionHub(backbone.unet)  # StyleDiffusion's value input goes through the hub's processors
    result["algorithm_1"], inversion = algorithm_1_variants(backbone, hub, encoder, image.to(device), z0, n, w,
                                                            variants)
    hub.restore()  # null-text inversion's UNet calls replay graphs only through diffusers' own processors
    trajectory, result["ddim_inversion_s"] = timed(lambda: invert_latents(backbone, z0, SOURCE, n))
    cond_src = backbone.encode_prompt([SOURCE])
    latents = [z[None].to(device) for z in trajectory.latents]
    schedule, result["null_text_s"] = timed(lambda: null_text_inversion(backbone, latents, cond_src, n, w))
    result["null_text_iterations"] = sum(schedule.iterations)
    hub = AttentionHub(backbone.unet)

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
