"""Real-image inversion on the shapes world: reconstruction PSNR / SSIM of StyleDiffusion vs null-text
inversion vs negative-prompt inversion vs plain DDIM inversion (paper 003, Table 3), on rendered scenes
with their captions.

    python benchmarks/style_shapes.py reconstruct --out runs/style --count 50 [--steps 30] [--adam code]
    # -> runs/style/reconstruction.json (per image and means) and a grid of the first 8 images
    python benchmarks/style_shapes.py edit --out runs/style_edit --count 24 [--shard 0/2]
    python benchmarks/style_shapes.py edit_table --out runs/style_edit   # merges the runs' edit_*of*.json

Every method starts from the same DDIM inversion at guidance 1 with the caption (T steps) and samples
back at guidance 7.5: DDIM inversion as it is, null-text inversion (per-step unconditional embeddings,
Mokady et al.'s settings), negative-prompt inversion (the caption as the unconditional embedding), and
StyleDiffusion (Algorithm 1's mapping networks on a random-initialised CLIP ViT-B/16 image encoder:
the shapes world ships no CLIP weights; `--encoder` takes a real one). Scores compare the decoded
reconstruction with the rendered image (the autoencoder's own round trip is reported as the ceiling).

`edit` (the paper's Table 2 on this world): two-object scenes, each caption edited in one attribute
(shape, colour or texture) of one object, the attribute and object taking turns; every method of
diffusion/editing.py edits the render from the source caption to the target caption (StyleDiffusion +
P2Plus at T = 30, null-text + P2P, null-text + P2Plus, DDIM inversion + word swap and SDEdit at 50
steps, StyleDiffusion + SDEdit at T = 30, guidance 7.5; SDEdit's strength 0.5 for both). The probes
read each edit against the target scene: success = the edited attribute reads the target value;
preservation = the edited object's other attributes, the other object's attributes and the background
read as in the source. NS-PSNR compares edit and render outside the edited object (its exact
footprint in the source and target renders, dilated by one pixel). NS-LPIPS
(`metrics.image_quality.NSLPIPS`: AlexNet at 256 px, that region blacked out in both) and
Structure-dist (DINO ViT-B/8 keys' self-similarity) need their local weights (conf/metrics/editing.yaml)
and are left out without them.
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
    from diffusion.attention import AttentionHub
    from diffusion.backbone import load_backbone
    from diffusion.image_encoder import ensure_encoder
    from diffusion.inversion import invert_image, negative_prompt_inversion, null_text_inversion
    from diffusion.inversion import reconstruct as replay
    from diffusion.style_editing import reconstruct as style_replay
    from diffusion.style_inversion import FitSettings, StyleDiffusionFitter
    from metrics.image_quality import PSNR, SSIM
    from utils.images import save_png

    encoder_dir = Path(encoder) if encoder else ROOT / ".cache" / "models" / "clip-vit-b16-random"
    backbone = load_backbone(str(ROOT / "models" / "shapes")).to(device)
    image_encoder = ensure_encoder(encoder_dir, None if encoder else "base").to(device)
    settings = FitSettings.from_yaml(steps, 7.5, adam={"preset": adam})  # Algorithm 1 as conf/style_diffusion sets it
    fitter = StyleDiffusionFitter.create(backbone, image_encoder, settings)
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
                with AttentionHub(backbone.unet) as hub:  # StyleDiffusion's value input goes through its processors
                    inversion = fitter.fit(hub, pixels, caption, trajectory, name=f"{k:02d}", generator=generator)
                    z = style_replay(backbone, hub, inversion)
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


EDIT_METHODS = ("style_diffusion", "null_text_p2p", "null_text_p2plus", "ddim_word_swap", "sdedit",
                "style_diffusion_sdedit")
EDIT_ATTRIBUTES = ("shape", "colour", "texture")


def edited_scene(scene, obj: int, attribute: str, rng: random.Random):
    """A copy of `scene` with one attribute of object `obj` changed to another value the world allows."""
    import copy

    from datamodules.shapes.world import COLOURS, SHAPES, TEXTURES, contrasting_backgrounds

    target = copy.deepcopy(scene)
    spec = target.objects[obj]
    if attribute == "shape":
        choices = [v for v in SHAPES if v != spec.shape]
    elif attribute == "colour":
        choices = [v for v in COLOURS if v != spec.colour and scene.background in contrasting_backgrounds(v)]
    else:
        choices = [v for v in TEXTURES if v != spec.texture]
    setattr(spec, attribute, rng.choice(choices))
    return target


def edit_cases(count: int, seed: int = 0) -> list[dict]:
    """`count` (scene, edited scene) pairs: two plain objects each; case k edits object k % 2's
    attribute EDIT_ATTRIBUTES[k % 3], so every (object, attribute) pair recurs every 6 cases."""
    from datamodules.shapes.world import SceneSampler

    rng = random.Random(f"style-edit/{seed}")
    sampler = SceneSampler(two_object_p=1.0, badge_p=0.0)
    cases = []
    for k in range(count):
        scene = sampler.sample(rng)
        obj, attribute = k % 2, EDIT_ATTRIBUTES[k % 3]
        cases.append({"scene": scene, "target": edited_scene(scene, obj, attribute, rng), "object": obj,
                      "attribute": attribute})
    return cases


def edit_region(source_masks: torch.Tensor, target_masks: torch.Tensor, obj: int) -> torch.Tensor:
    """[H, W] bool: object `obj`'s footprint in the source or the target render, dilated by one pixel."""
    from utils.morphology import dilate

    return dilate(((source_masks[obj] > 0) | (target_masks[obj] > 0)).float()) > 0


def optional_metric(build):
    """The metric, or None when its weights are not on this machine (the ConfigError says which)."""
    from utils.errors import ConfigError

    try:
        return build()
    except ConfigError as e:
        print(f"left out: {e}", flush=True)
        return None


def edit(out: Path, count: int, shard: tuple[int, int], encoder: str | None, device: str,
         methods: list[str], strength: float) -> Path:
    from diffusion.backbone import load_backbone
    from diffusion.editing import load_edit_method, method_config
    from datamodules.shapes.render import render_scene
    from metrics.dino import StructureDistance
    from metrics.image_quality import NSLPIPS
    from metrics.shapes_probes import default_probe, score_readings
    from utils.images import save_png
    from utils.io import write_json

    unknown = sorted(set(methods) - set(EDIT_METHODS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; use some of {', '.join(EDIT_METHODS)}")
    index, parts = shard
    name = f"edit_{'+'.join(methods)}_{index}of{parts}"  # runs of other methods on the same cases sit beside it
    path = out / f"{name}.json"
    if path.exists():
        raise SystemExit(f"{path} exists; give another --out (edit_table merges every run in a folder)")
    weights = ROOT / "metric_models"
    lpips = optional_metric(lambda: NSLPIPS("alex", weights / "alexnet-owt-7be5be79.pth").to(device))
    structure = optional_metric(lambda: StructureDistance(weights / "dino-vitb8").to(device))
    backbone = load_backbone(str(ROOT / "models" / "shapes")).to(device)
    encoder_dir = Path(encoder) if encoder else ROOT / ".cache" / "models" / "clip-vit-b16-random"
    probe = default_probe(device)
    image_encoder = {"path": str(encoder_dir), "build": None if encoder else "base"}
    built = {}
    for method in methods:  # each yaml's settings, with the run's SDEdit strength and image encoder where it has them
        cfg = method_config(method)
        given = {"strength": strength, "image_encoder": image_encoder}
        built[method] = load_edit_method(method, **{k: v for k, v in given.items() if k in cfg})
    rows, grid = [], []
    for k, case in enumerate(edit_cases(count)):
        if k % parts != index:
            continue
        scene, target, obj, attribute = case["scene"], case["target"], case["object"], case["attribute"]
        image, source_masks = render_scene(scene, 64)
        target_image, target_masks = render_scene(target, 64)
        keep = ~edit_region(source_masks, target_masks, obj)
        pixels = (image * 2 - 1)[None].to(device)
        z0 = backbone.encode_images(pixels, torch.Generator(device).manual_seed(0)).float()
        source, prompt = scene.caption(), target.caption()
        row = {"case": k, "source": source, "target": prompt, "object": obj, "attribute": attribute,
               "methods": {}}
        edits = []
        oracle = score_readings(probe.read(target_image[None].to(device)), [target])  # the probes' own ceiling
        row["target_render"] = {"success": float(oracle[attribute][obj]),
                                "background_kept": float(oracle["background"][0])}
        for method in methods:
            start = time.perf_counter()
            latents = built[method](backbone, z0, source, prompt, guidance_scale=7.5, seed=k, pixels=pixels)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                decoded = backbone.decode_latents(latents).clamp(0, 1).cpu()  # [reconstruction, edit]
            edited = decoded[1:]
            scores = score_readings(probe.read(edited.to(device)), [target])
            others = [a for a in EDIT_ATTRIBUTES if a != attribute]
            row["methods"][method] = {
                "success": float(scores[attribute][obj]),
                "same_object_kept": float(torch.stack([scores[a][obj] for a in others]).mean()),
                "other_object_kept": float(torch.stack([scores[a][1 - obj] for a in EDIT_ATTRIBUTES]).mean()),
                "background_kept": float(scores["background"][0]),
                "count": float(scores["count"][0]),
                "ns_psnr": masked_psnr(edited[0], image, keep),
                "ns_lpips": None if lpips is None else one_score(lpips, edited.to(device), image[None].to(device),
                                                                 (~keep)[None].float().to(device)),
                "structure_dist": None if structure is None else float(
                    structure.scores(edited.to(device), image[None].to(device))[0]),
                "seconds": seconds}
            edits.append(edited[0])
        rows.append(row)
        if len(grid) < 8:
            grid.append(torch.cat([image, target_image, *edits], dim=-1))
        print(k, f"{attribute} of object {obj}:", prompt, {m: round(v["success"]) for m, v in row["methods"].items()},
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"count": count, "methods": methods, "strength": strength,
                      "encoder": str(encoder_dir) if encoder else "random ViT-B/16", "rows": rows})
    if grid:  # columns: render, target render, then each method's edit
        save_png(torch.cat(grid, dim=-2), out / f"{name}_grid.png")
    return path


def masked_psnr(image: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> float:
    """PSNR over the pixels where `keep` ([H, W] bool) holds; images [3, H, W] in [0, 1]."""
    mse = (image - reference).square().mean(0)[keep].mean()
    return float(10 * torch.log10(1 / mse.clamp_min(1e-10)))


def one_score(metric, *inputs: torch.Tensor) -> float:
    """A per-image-mean metric's value for one image."""
    metric.reset()
    metric.update(*inputs)
    return float(metric.compute())


def edit_table(out: Path) -> dict:
    """Merge every run's rows (shards, and runs of other methods on the same cases) and print the
    per-method means over the cases every method has (all of them, and per edited attribute)."""
    from utils.io import write_json

    parts = sorted(out.glob("edit_*of*.json"))
    if not parts:
        raise SystemExit(f"no edit_*of*.json in {out}; run the edit phase first")
    by_case: dict[int, dict] = {}
    for part in parts:
        for row in json.loads(part.read_text())["rows"]:
            merged = by_case.setdefault(row["case"], {**row, "methods": {}})
            merged["methods"].update(row["methods"])
    found = set.intersection(*(set(r["methods"]) for r in by_case.values()))
    methods = [m for m in EDIT_METHODS if m in found]
    rows = [by_case[k] for k in sorted(by_case)]
    keys = ("success", "same_object_kept", "other_object_kept", "background_kept", "count", "ns_psnr", "ns_lpips",
            "structure_dist", "seconds")

    def mean(selected: list[dict], method: str, key: str) -> float | None:
        values = [r["methods"][method][key] for r in selected if r["methods"][method][key] is not None]
        return statistics.fmean(values) if values else None

    table = {m: {key: mean(rows, m, key) for key in keys} for m in methods}
    table["target_render"] = {key: statistics.fmean(r["target_render"][key] for r in rows)
                              for key in ("success", "background_kept")}
    by_attribute = {a: {m: mean([r for r in rows if r["attribute"] == a], m, "success") for m in methods}
                    for a in EDIT_ATTRIBUTES}
    result = {"cases": len(rows), "means": table, "success_by_attribute": by_attribute}
    write_json(out / "edit.json", result)  # the merged table, rebuilt from the runs each time
    print(f"{len(rows)} cases")
    print("| method | " + " | ".join(keys) + " |")
    for m in [*methods, "target_render"]:
        print(f"| {m} | " + " | ".join("-" if table[m].get(k) is None else f"{table[m][k]:.3f}" for k in keys) + " |")
    for a, values in by_attribute.items():
        print(a, {m: None if v is None else round(v, 3) for m, v in values.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("reconstruct", "edit", "edit_table"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "style")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps T of every inversion (paper: 30)")
    parser.add_argument("--encoder", default=None, help="a CLIP ViT-B/16 folder (default: a random one)")
    parser.add_argument("--adam", default="paper", help="StyleDiffusion's optimiser preset: paper | code")
    parser.add_argument("--methods", type=lambda text: text.split(","), default=None,
                        help=f"comma-separated, of {', '.join(METHODS)} (reconstruct) or "
                             f"{', '.join(EDIT_METHODS)} (edit)")
    parser.add_argument("--shard", type=lambda text: tuple(int(v) for v in text.split("/")), default=(0, 1),
                        help="edit: i/n runs every n-th case from case i (for parallel processes)")
    parser.add_argument("--strength", type=float, default=0.5, help="edit: SDEdit's noise level")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.phase == "reconstruct":
        reconstruct(args.out, args.count, args.steps, args.encoder, args.adam, args.device,
                    args.methods or list(METHODS))
    elif args.phase == "edit":
        edit(args.out, args.count, args.shard, args.encoder, args.device, args.methods or list(EDIT_METHODS),
             args.strength)
    else:
        edit_table(args.out)


if __name__ == "__main__":
    main()
