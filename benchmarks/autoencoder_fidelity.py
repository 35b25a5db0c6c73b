"""How much of each held-out concept survives a model's autoencoder (encode, decode).

    python benchmarks/autoencoder_fidelity.py --model models/shapes --poses 10

Renders every concept of the shapes world in --poses poses (`reference_scenes(name, poses, seed)`),
passes them through the model's VAE (posterior mean), and prints, per concept, the probes' strict
identity match on the renders and on the round trips, with the round trip's mean L1 error. The
identity a personalization method can reach on this model is bounded by the round-trip column.
"""

from __future__ import annotations

import argparse

import torch

from datamodules.shapes.concepts import reference_scenes
from datamodules.shapes.render import render_batch
from datamodules.shapes.world import CONCEPTS
from diffusers import AutoencoderKL
from metrics.shapes_probes import ShapesProbe


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    pixels = images.to(vae.device, vae.dtype) * 2 - 1
    return ((vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().clamp(-1, 1) + 1) / 2).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--poses", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)  # apart from the shipped reference sets (seed 0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32).to(args.device)
    probe = ShapesProbe.load()
    rows = []
    for name in CONCEPTS:
        images, _ = render_batch(reference_scenes(name, args.poses, args.seed))
        decoded = round_trip(vae, images)
        rows.append((name, probe.identity_match(images, name).float().mean().item(),
                     probe.identity_match(decoded, name).float().mean().item(), (decoded - images).abs().mean().item()))
    rows.append(("mean", *(sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3))))
    print(f"{args.model}: {args.poses} poses per concept")
    print("| concept | renders | round trip | round-trip L1 |")
    print("| --- | --- | --- | --- |")
    for name, renders, trip, l1 in rows:
        print(f"| {name} | {renders:.2f} | {trip:.2f} | {l1:.4f} |")


if __name__ == "__main__":
    main()
