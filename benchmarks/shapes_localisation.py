"""Does a shapes-world model's cross-attention find the objects its words name?

    python benchmarks/shapes_localisation.py --model models/shapes --scenes 200

Renders fresh one- and two-object scenes (scene seeds apart from the training stream's), noises each
render at --timesteps random timesteps and runs the UNet once with the scene's own caption. For every
object, the mean conditional cross-attention (heads, layers and timesteps averaged) of its shape word
and of its colour word inside the object over the mean outside it (1 = no localisation), weighting each
latent cell by the exact mask's coverage; for the background colour word, its mean on the background
over its mean on the objects. One number per resolution of the down and up layers (16x16, 8x8). A badge
named part by part counts its outer shape and outer colour words; a bare "badge" counts as its shape
word and has no colour word.

A high ratio says where a word's attention mass lies, not that its map covers the region. The `*_iou`
columns apply EM's mask rule (the map scaled to [0, 1] between its minimum and maximum, threshold 0.5;
no DenseCRF) and report the IoU with the region (cells at least half covered): what attention-based
masks (EM, LAG, LocalBlend) can recover from the model's own words.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from datamodules.shapes.render import render_scene
from datamodules.shapes.world import BACKGROUND_ROLE, CLASS_WORD, COLOURS, SHAPES, Scene, SceneSampler
from diffusion.attention import AttentionHub, AttentionStore
from diffusion.backbone import load_backbone
from diffusion.masks import mask_iou, scale_maps


def named_words(scene: Scene) -> dict[str, list[tuple[int, int]]]:
    """Token positions to score: {"shape" | "colour": [(position, object)], "background": [(position, -1)]}.
    Position 0 is the start token; every word of the world is one token."""
    out: dict[str, list[tuple[int, int]]] = {"shape": [], "colour": [], "background": []}
    seen: set[tuple[str, int]] = set()
    for i, (word, role) in enumerate(scene.caption_words()):
        if role == BACKGROUND_ROLE:
            if word != "background":
                out["background"].append((i + 1, -1))
            continue
        if role is None:
            continue
        # the first shape / colour word of an object is its own (a named badge's inner ones come later)
        kind = "shape" if word in (*SHAPES, CLASS_WORD) else "colour" if word in COLOURS else None
        if kind and (kind, role) not in seen:
            seen.add((kind, role))
            out[kind].append((i + 1, role))
    return out


def weighted_ratio(attn: torch.Tensor, inside: torch.Tensor) -> float:
    """Mean of attn weighted by `inside` over its mean weighted by 1 - inside."""
    return float(((attn * inside).sum() / inside.sum()) / ((attn * (1 - inside)).sum() / (1 - inside).sum()))


def threshold_iou(attn: torch.Tensor, cover: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of the map's cells at or above `threshold` of its [min, max] range with the cells `cover` at least half fills."""
    return mask_iou(scale_maps(attn) >= threshold, cover >= 0.5)


@torch.no_grad()
def measure(backbone, scenes: list[Scene], timesteps: int, seed: int) -> dict:
    g = torch.Generator(backbone.device).manual_seed(seed)
    ratios: dict = {}
    tokenizer = backbone.tokenizers[0]
    with AttentionHub(backbone.unet) as hub:
        for scene in tqdm(scenes, desc="scenes"):
            caption = scene.caption()
            if len(tokenizer(caption).input_ids) != len(scene.caption_words()) + 2:
                raise ValueError(f"the model's tokenizer does not read {caption!r} one token per word")
            image, masks = render_scene(scene, backbone.resolution)
            latents = backbone.encode_images((image * 2 - 1)[None].to(backbone.device, backbone.dtype), generator=g)
            t = torch.randint(0, backbone.num_train_timesteps, (timesteps,), generator=g, device=backbone.device)
            noise = torch.randn((timesteps, *latents.shape[1:]), generator=g, device=backbone.device)
            noisy = backbone.add_noise(latents.expand(timesteps, -1, -1, -1), noise, t)
            store = AttentionStore(blocks=("down", "up"), average_steps=True)
            with hub.using(store):
                backbone.predict(noisy, t, backbone.encode_prompt([caption]).expand(timesteps))
            words = named_words(scene)
            for res in sorted({hw[0] for hw in store.hw.values()}):
                maps = store.average(resolution=res).float().mean(0).permute(2, 0, 1).cpu()  # [K, r, r]
                cover = F.adaptive_avg_pool2d(masks[:, None].float(), res)[:, 0]  # [objects, r, r]
                key = f"{res}x{res}"
                objects = cover.sum(0).clamp(max=1)
                for kind in ("shape", "colour", "background"):
                    for position, obj in words[kind]:
                        region = 1 - objects if kind == "background" else cover[obj]
                        ratios.setdefault(key, {}).setdefault(kind, []).append(weighted_ratio(maps[position], region))
                        ratios[key].setdefault(f"{kind}_iou", []).append(threshold_iou(maps[position], region))
    return {res: {kind: statistics.fmean(v) for kind, v in kinds.items()} for res, kinds in ratios.items()}


def fresh_scenes(count: int, seed: int, parts_p: float) -> list[Scene]:
    """One- and two-object scenes from string seeds, which the training stream's integer seeds never give."""
    sampler = SceneSampler(two_object_p=0.5, parts_p=parts_p)
    return [sampler.sample(random.Random(f"localisation/{seed}/{i}")) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--timesteps", type=int, default=10, help="random timesteps per scene")
    parser.add_argument("--parts-p", type=float, default=0.5, help="share of badges captioned part by part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    backbone = load_backbone(args.model, dtype="float32").to(args.device)
    results = measure(backbone, fresh_scenes(args.scenes, args.seed, args.parts_p), args.timesteps, args.seed)
    print(f"{args.model}: {args.scenes} scenes x {args.timesteps} timesteps")
    print("| layers | shape word in / out | colour word in / out | background word on background / on objects "
          "| mask IoU: shape / colour / background word |")
    print("| --- | --- | --- | --- | --- |")
    for res, r in results.items():
        print(f"| {res} | {r['shape']:.2f} | {r['colour']:.2f} | {r['background']:.2f} "
              f"| {r['shape_iou']:.3f} / {r['colour_iou']:.3f} / {r['background_iou']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results, model=args.model, scenes=args.scenes, timesteps=args.timesteps), f, indent=2)


if __name__ == "__main__":
    main()
