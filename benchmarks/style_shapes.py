"""Real-image inversion on the shapes world: reconstruction PSNR / SSIM of StyleDiffusion vs null-text
inversion vs negative-prompt inversion vs plain DDIM inversion (paper 003, Table 3), on rendered scenes
with their captions.

    python benchmarks/style_shapes.py reconstruct --out runs/style --count 50 [--steps 30] [--adam code]
    # -> runs/style/reconstruction.json (per image and means) and a grid of the first 8 images

Every method starts from the same DDIM inversion at guidance 1 with the caption (T steps) and samples
back at guidance 7.5: DDIM inversion as it is, null-text inversion (per-step unconditional embeddings,
Mokady et al.'s settings), negative-prompt inversion (the caption as the unconditional embedding), and
StyleDiffusion (Algorithm 1's mapping networks on a random-initialised CLIP ViT-B/16 image encoder:
the shapes world ships no CLIP weights; `--encoder` takes a real one). Scores compare the decoded
reconstruction with the rendered image (the autoencoder's own round trip is reported as the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
METHODS = ("ddim", "null_text", "negative_prompt", "style_diffusion")


def rendered_scenes(count: int, seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    """`count` shapes-world scenes (one or two objects) as images [3, 64, 64] in [-1, 1] and captions."""
    from datamodules.shapes.render import render_scene
    from datamodules.shapes.world import SceneSampler

    rng = random.Random(f"style-reconstruction/{seed}")
    sampler = SceneSampler(badge_p=0.0)
    out = []
    for _ in range(count):
        scene = sampler.sample(rng)
        image, _ = render_scene(scene, 64)
        out.append((image * 2 - 1, scene.caption()))
    return out


def reconstruct(out: Path, count: int, steps: int, encoder: str | None, adam: str, device: str,
                methods: list[str]) -> dict:
    from diffusion.backbone import load_backbone
    from diffusion.inversion import negative_prompt_inversion, null_text_inversion
    from diffusion.inversion import reconstruct as replay
    from datamodules.trajectories import invert_image
    from lightning_modules.style_diffusion import StyleDiffusionModule
    from lightning_modules.style_diffusion import reconstruct as style_replay
    from metrics.image_quality import PSNR, SSIM
    from utils.images import save_png

    encoder_dir = Path(encoder) if encoder else ROOT / ".cache" / "models" / "clip-vit-b16-random"
    module = StyleDiffusionModule({"path": str(ROOT / "models" / "shapes")},
                                  {"path": str(encoder_dir), "build": None if encoder else "base"},
                                  num_steps=steps, adam={"preset": adam})
    module.configure_model()
    module.to(device)
    backbone = module.backbone
    uncond = backbone.encode_prompt([""])
    rows, grid = [], []
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; use some of {', '.join(METHODS)}")
    seconds = {m: 0.0 for m in methods}
    for k, (pixels, caption) in enumerate(rendered_scenes(count)):
        trajectory = invert_image(backbone, pixels, caption, steps)
        latents = trajectory.latent_list()
        cond = backbone.encode_prompt([caption])
        recon = {"autoencoder": latents[0].to(device)}
        for method in methods:
            start = time.perf_counter()
            if method == "ddim":
                z = replay(backbone, latents, cond, uncond, steps)
            elif method == "null_text":
                z = replay(backbone, latents, cond, null_text_inversion(backbone, latents, cond, steps), steps)
            elif method == "negative_prompt":
                z = replay(backbone, latents, cond, negative_prompt_inversion(cond, steps), steps)
            else:
                generator = torch.Generator(device).manual_seed(k)  # M_t's N(0, 0.01) start, per image
                inversion = module.fit_image(pixels, caption, trajectory, name=f"{k:02d}", generator=generator)
                z = style_replay(backbone, module.attention_hub(), inversion)
            seconds[method] += time.perf_counter() - start
            recon[method] = z
        target = ((pixels[None] + 1) / 2).clamp(0, 1).to(device)
        images = {name: backbone.decode_latents(z) for name, z in recon.items()}
        row = {"image": k, "caption": caption}
        for name, image in images.items():
            row[name] = {"psnr": float(PSNR().per_image(image, target)[0]),
                         "ssim": float(SSIM().per_image(image, target)[0])}
        rows.append(row)
        if k < 8:
            grid.append(torch.cat([target, *images.values()], dim=-1))
        print(k, caption, {n: round(row[n]["psnr"], 2) for n in images}, flush=True)
    names = ["autoencoder", *methods]
    means = {n: {m: statistics.fmean(r[n][m] for r in rows) for m in ("psnr", "ssim")} for n in names}
    result = {"count": count, "steps": steps, "guidance_scale": 7.5, "adam": adam,
              "encoder": str(encoder_dir) if encoder else "random ViT-B/16", "means": means,
              "seconds_per_step": {m: seconds[m] / (count * steps) for m in methods}, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction.json").write_text(json.dumps(result, indent=2))
    save_png(torch.cat(grid, dim=-2)[0], out / "reconstruction_grid.png")  # columns: target, then `names`
    for n in names:
        print(f"{n:16s} PSNR {means[n]['psnr']:.2f}  SSIM {means[n]['ssim']:.3f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("reconstruct",))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "style")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps T of every inversion (paper: 30)")
    parser.add_argument("--encoder", default=None, help="a CLIP ViT-B/16 folder (default: a random one)")
    parser.add_argument("--adam", default="paper", help="StyleDiffusion's optimiser preset: paper | code")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    reconstruct(args.out, args.count, args.steps, args.encoder, args.adam, args.device, args.methods)


if __name__ == "__main__":
    main()
