"""Personalized residuals on the shapes world: identity and prompt fidelity of each held-out badge concept
for residuals, residuals + LAG, textual inversion and Custom Diffusion-style K/V residuals (Table 1's
comparison), 20 prompts x 5 seeds, the same seeds for every method.

    python benchmarks/residuals_shapes.py train --out runs/residuals [--concepts sun_medal,moon_token] [overrides]
    python benchmarks/residuals_shapes.py evaluate --out runs/residuals      # -> runs/residuals/results.json
    python benchmarks/residuals_shapes.py evaluate --out runs/residuals --seeds 5,6,7,8,9,10,11,12,13,14   # more
    python benchmarks/residuals_shapes.py paired --out runs/residuals       # each method - textual inversion, per image
    python benchmarks/residuals_shapes.py lag_masks --out runs/residuals     # LAG masks vs the true masks
    python benchmarks/residuals_shapes.py params                             # SD1.4 parameter counts per target

`train` runs train.py for each concept (its 5 reference renders in assets/shapes_concepts/<concept>)
and method: residuals (proj_out, the paper's defaults), kv (the same on cross-attention K/V),
textual_inversion (Table 1's baseline: one vector), and on request residuals_zero (zero-initialised B),
residuals_zero_600 and residuals_zero_1500 (the same, 600 / 1500 iterations) and textual_inversion_four
(four vectors, the shapes world's recipe for a badge's four parts).
`evaluate` runs evaluate.py on every run with metrics=shapes_concept (the probes' attribute accuracy,
and the concept's identity) over assets/prompts/personalization_eval.txt (10 new backgrounds, 10 added
objects), the proj_out residual runs with `sweep={lag:[false,true]}`, and gathers the rows; other `--seeds` than
0-4 go to their own evaluation folders. `paired` reads every evaluation folder's images again and compares each
method with textual inversion on the same prompt and seed: the mean difference in identity and its standard error.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

CONCEPTS = ("sun_medal", "moon_token", "love_seal", "cross_shield", "ember_gem")
# name -> train.py overrides: each experiment's training (conf/experiment/), its evaluation replaced by evaluate()'s
# fuller one (every prompt of PROMPTS), on each concept's images
METHODS = {
    "residuals": ["experiment=residuals_shapes", "callbacks.evaluation=null"],
    "kv": ["experiment=residuals_shapes", "callbacks.evaluation=null", "module.targets=kv"],
    "textual_inversion": ["experiment=ti_shapes", "callbacks.evaluation=null"],
    "residuals_zero": ["experiment=residuals_shapes", "callbacks.evaluation=null", "module.init=zero"],  # B = 0 first
    "residuals_zero_600": ["experiment=residuals_shapes", "callbacks.evaluation=null", "module.init=zero",
                           "trainer.max_steps=600"],  # 4x the paper's iterations (the shapes world's concepts need them)
    "residuals_zero_1500": ["experiment=residuals_shapes", "callbacks.evaluation=null", "module.init=zero",
                            "trainer.max_steps=1500"],
    "textual_inversion_four": ["experiment=ti_shapes", "callbacks.evaluation=null",
                               "module.token.num_vectors=4"],  # the shapes world's recipe, stronger than Table 1's
}
PROMPTS = ROOT / "assets" / "prompts" / "personalization_eval.txt"
SEEDS = [0, 1, 2, 3, 4]
COLUMNS = ("attributes/background", "attributes/count", "attributes/shape", "attributes/colour",
           "identity/identity", "identity/identity_match")


def run(args: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {code}); see {log}")
    return time.time() - start


def train(out: Path, concepts: list[str], methods: list[str], extra: list[str], trainer: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for concept in concepts:
        for method in methods:
            run_dir = out / concept / method
            if (run_dir / "checkpoints" / "last.ckpt").is_file():
                print(f"{concept} {method}: done before, skipped", flush=True)
                continue
            seconds = run(["train.py", *METHODS[method], f"trainer={trainer}", "logger=csv",
                           f"data.images_dir={ROOT / 'assets' / 'shapes_concepts' / concept / 'images'}",
                           f"hydra.run.dir={run_dir}", "callbacks.progress_bar.refresh_rate=0", *extra],
                          out / f"{concept}_{method}.train.log")
            print(f"{concept} {method}: trained in {seconds:.0f} s", flush=True)


def seeds_label(seeds: list[int]) -> str:
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"seeds{seeds[0]}-{seeds[-1]}" if contiguous else "seeds" + "_".join(map(str, seeds))


def eval_dir_name(method: str, seeds: list[int]) -> str:
    """The evaluation folder of a method's run: <method>_eval for the default seeds, else <method>_eval_seeds5-14."""
    return f"{method}_eval" if seeds == SEEDS else f"{method}_eval_{seeds_label(seeds)}"


def evaluate(out: Path, concepts: list[str], methods: list[str], num_steps: int, seeds: list[int] = SEEDS) -> dict:
    results: dict = {"num_steps": num_steps, "seeds": seeds, "prompts": str(PROMPTS.relative_to(ROOT)), "rows": []}
    for concept in concepts:
        for method in methods:
            run_dir, eval_dir = out / concept / method, out / concept / eval_dir_name(method, seeds)
            if not (eval_dir / "metrics.json").is_file():
                # LAG masks proj_out residuals; K/V residuals and a token have nothing it acts on
                sweep = ["sweep={lag:[false,true]}"] if method.startswith("residuals") else []
                seconds = run(["evaluate.py", f"artifact={run_dir}", "metrics=shapes_concept",
                               f"metrics.identity.concept={concept}", f"prompts_file={PROMPTS}", f"seeds={seeds}",
                               f"num_steps={num_steps}", "batch_size=50", f"hydra.run.dir={eval_dir}", *sweep],
                              out / f"{concept}_{method}.eval.log")
                print(f"{concept} {method}: evaluated in {seconds:.0f} s", flush=True)
            for row in json.loads((eval_dir / "metrics.json").read_text())["rows"]:
                if method == "kv" and row.get("lag"):
                    continue  # LAG leaves K/V residuals as they are: the same images as without it
                name = method if not row.get("lag") else f"{method} + LAG"
                results["rows"].append({"concept": concept, "method": name, **{k: row[k] for k in COLUMNS}})
    table: dict = {}
    for row in results["rows"]:
        table.setdefault(row["method"], []).append(row)
    results["mean"] = {m: {k: statistics.fmean(r[k] for r in rows) for k in COLUMNS} for m, rows in table.items()}
    name = "results.json" if seeds == SEEDS else f"results_{seeds_label(seeds)}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    for method, means in results["mean"].items():
        print(f"{method:24s}", "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in means.items()), flush=True)
    return results


def image_identities(eval_dirs: list[Path], concept: str) -> dict[tuple, float]:
    """(prompt text, seed, lag) -> the concept identity of that evaluation image, over the given folders."""
    import numpy as np
    import torch
    from PIL import Image

    from metrics.shapes_probes import default_probe

    scores = {}
    for eval_dir in eval_dirs:
        samples = json.loads((eval_dir / "samples.json").read_text())["samples"]
        pixels = torch.stack([torch.from_numpy(np.array(Image.open(eval_dir / s["file"]).convert("RGB")))
                              for s in samples]).permute(0, 3, 1, 2).float() / 255
        identity, _ = default_probe().concept_scores(pixels, concept)
        scores.update({(s["text"], s["seed"], bool(s.get("lag", False))): v for s, v in zip(samples, identity.tolist())})
    return scores


def paired(out: Path, concepts: list[str], methods: list[str], baseline: str = "textual_inversion") -> dict:
    """Each method's identity minus the baseline's on the same prompt and seed, over every evaluation folder both
    have (all seeds evaluated): n, mean difference, its standard error, and the share of pairs the method wins."""
    def folders(concept: str, method: str) -> list[Path]:
        return sorted(d for d in (out / concept).glob(f"{method}_eval*") if (d / "samples.json").is_file())

    rows = []
    for concept in concepts:
        if not folders(concept, baseline):
            raise SystemExit(f"no evaluation of {baseline} for {concept} under {out}; run the evaluate phase first")
        base = {(text, seed): v for (text, seed, _), v in image_identities(folders(concept, baseline), concept).items()}
        for method in (m for m in methods if m != baseline):
            mine = image_identities(folders(concept, method), concept)
            for lag in sorted({key[2] for key in mine}):
                diffs = [v - base[(text, seed)] for (text, seed, with_lag), v in mine.items()
                         if with_lag == lag and (text, seed) in base]
                if len(diffs) < 2:
                    continue
                row = {"concept": concept, "method": f"{method} + LAG" if lag else method, "n": len(diffs),
                       "difference": statistics.fmean(diffs), "standard_error": statistics.stdev(diffs) / len(diffs) ** 0.5,
                       "wins": sum(d > 0 for d in diffs) / len(diffs)}
                rows.append(row)
                print(f"{concept:13s} {row['method']:26s} - {baseline}: {row['difference']:+.4f} +- "
                      f"{row['standard_error']:.4f} (n {row['n']}, wins {row['wins']:.2f})", flush=True)
    (out / "paired.json").write_text(json.dumps(rows, indent=2))
    return {"baseline": baseline, "rows": rows}


def lag_masks(out: Path, concepts: list[str], num_timesteps: int = 20) -> dict:
    """How well LAG's masks find the concept: on each concept's reference renders (noised at random
    timesteps, prompted with their own captions), the IoU of each block's median-split V* + class mask
    with the true mask, and the share of the concept's pixels inside the mask (0.5 by chance: the mask
    is half of the image)."""
    import torch

    from datamodules.image_set import load_reference_set
    from diffusion.backbone import load_backbone
    from diffusion.masks import mask_iou
    from diffusion.residuals import load_residuals

    rows = {}
    for concept in concepts:
        backbone = load_backbone(str(ROOT / "models" / "shapes"))
        sampler, token = load_residuals(backbone, out / concept / "residuals")
        folder = ROOT / "assets" / "shapes_concepts" / concept
        images, masks = load_reference_set(folder / "images", folder / "masks", resolution=backbone.resolution)
        captions = json.loads((folder / "images" / "captions.json").read_text())
        prompts = [captions[f"{i:02d}"].replace("{}", token) for i in range(len(images))]
        g = torch.Generator().manual_seed(0)
        ious, recall, share = [], [], []
        with torch.no_grad(), sampler.applied(prompts, lag=True) as hub:
            token_mask = hub.controllers[0]
            latents = backbone.encode_images(images * 2 - 1, generator=g)
            for _ in range(num_timesteps):
                t = torch.randint(0, backbone.num_train_timesteps, (1,), generator=g).expand(len(images))
                noisy = backbone.add_noise(latents, torch.randn(latents.shape, generator=g), t)
                backbone.predict(noisy, t, backbone.encode_prompt(prompts))
                for block, mask in token_mask.masks.items():
                    size = mask.shape[-1]
                    truth = torch.nn.functional.adaptive_avg_pool2d(masks, size) >= 0.5
                    for m, tr in zip(mask.bool(), truth):
                        ious.append(mask_iou(m[0], tr[0]))
                        recall.append(float((m & tr).sum() / tr.sum().clamp(min=1)))
                        share.append(float(tr.float().mean()))
        rows[concept] = {"iou": statistics.fmean(ious), "concept_in_mask": statistics.fmean(recall),
                         "concept_share": statistics.fmean(share)}
        print(concept, json.dumps({k: round(v, 3) for k, v in rows[concept].items()}), flush=True)
    (out / "lag_masks.json").write_text(json.dumps(rows, indent=2))
    return rows


def params() -> None:
    """Trainable parameters of each target set on the SD1.4 architecture (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusion.random_models import UNETS
    from diffusion.residuals import add_residuals

    for targets in ("proj_out", "kv", "proj_in", "kv+proj_out", "kv+proj_in+proj_out"):
        with torch.device("meta"):
            params, ranks = add_residuals(UNet2DConditionModel(**UNETS["sd15"]), targets)
        print(f"{targets:22s} {len(ranks):3d} layers  ranks {sorted(set(ranks.values()))}  "
              f"{sum(p.numel() for p in params):,} parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("train", "evaluate", "paired", "lag_masks", "params"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "residuals")
    parser.add_argument("--concepts", type=lambda text: text.split(","), default=list(CONCEPTS))
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS)[:3],
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--trainer", default="default")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps when evaluating")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=SEEDS,
                        help="comma-separated evaluation seeds (default 0-4)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after the options)")
    args = parser.parse_intermixed_args()
    if args.phase == "train":
        train(args.out, args.concepts, args.methods, args.overrides, args.trainer)
    elif args.phase == "evaluate":
        evaluate(args.out, args.concepts, args.methods, args.num_steps, args.seeds)
    elif args.phase == "paired":
        paired(args.out, args.concepts, args.methods)
    elif args.phase == "lag_masks":
        lag_masks(args.out, args.concepts)
    else:
        params()


if __name__ == "__main__":
    main()
