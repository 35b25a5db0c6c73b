"""Personalized residuals on the shapes world: identity and prompt fidelity of each held-out badge concept
for residuals, residuals + LAG, textual inversion and Custom Diffusion-style K/V residuals (Table 1's
comparison), 20 prompts x 5 seeds, the same seeds for every method.

    python benchmarks/residuals_shapes.py train --out runs/residuals [--concepts sun_medal,moon_token] [overrides]
    python benchmarks/residuals_shapes.py evaluate --out runs/residuals      # -> runs/residuals/results.json
    python benchmarks/residuals_shapes.py params                             # SD1.4 parameter counts per target

`train` runs train.py for each concept (its 5 reference renders in assets/shapes_concepts/<concept>)
and method: residuals (proj_out, the paper's defaults), kv (the same on cross-attention K/V),
textual_inversion (the framework's recipe), and on request residuals_zero (zero-initialised B).
`evaluate` runs evaluate.py on every run with metrics=shapes_concept (the probes' attribute accuracy,
and the concept's identity) over assets/prompts/personalization_eval.txt (10 new backgrounds, 10 added
objects), the residual runs with `sweep={lag:[false,true]}`, and gathers the rows.
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
METHODS = {  # name -> train.py overrides
    "residuals": ["method=residuals"],
    "kv": ["method=residuals", "module.targets=kv"],
    "textual_inversion": ["method=textual_inversion"],
    "residuals_zero": ["method=residuals", "module.init=zero"],  # B = 0 at the start instead of random
}
PROMPTS = ROOT / "assets" / "prompts" / "personalization_eval.txt"
SEEDS = "[0,1,2,3,4]"
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


def evaluate(out: Path, concepts: list[str], methods: list[str], num_steps: int) -> dict:
    results: dict = {"num_steps": num_steps, "seeds": SEEDS, "prompts": str(PROMPTS.relative_to(ROOT)), "rows": []}
    for concept in concepts:
        for method in methods:
            run_dir, eval_dir = out / concept / method, out / concept / f"{method}_eval"
            if not (eval_dir / "metrics.json").is_file():
                sweep = ["sweep={lag:[false,true]}"] if method != "textual_inversion" else []
                seconds = run(["evaluate.py", f"artifact={run_dir}", "metrics=shapes_concept",
                               f"metrics.identity.concept={concept}", f"prompts_file={PROMPTS}", f"seeds={SEEDS}",
                               f"num_steps={num_steps}", "batch_size=50", f"hydra.run.dir={eval_dir}", *sweep],
                              out / f"{concept}_{method}.eval.log")
                print(f"{concept} {method}: evaluated in {seconds:.0f} s", flush=True)
            for row in json.loads((eval_dir / "metrics.json").read_text())["rows"]:
                name = method if "lag" not in row else f"{method}{' + LAG' if row['lag'] else ''}"
                results["rows"].append({"concept": concept, "method": name, **{k: row[k] for k in COLUMNS}})
    table: dict = {}
    for row in results["rows"]:
        table.setdefault(row["method"], []).append(row)
    results["mean"] = {m: {k: statistics.fmean(r[k] for r in rows) for k in COLUMNS} for m, rows in table.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for method, means in results["mean"].items():
        print(f"{method:24s}", "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in means.items()), flush=True)
    return results


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
    parser.add_argument("phase", choices=("train", "evaluate", "params"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "residuals")
    parser.add_argument("--concepts", type=lambda text: text.split(","), default=list(CONCEPTS))
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS)[:3],
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--trainer", default="default")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps when evaluating")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (after the options)")
    args = parser.parse_intermixed_args()
    if args.phase == "train":
        train(args.out, args.concepts, args.methods, args.overrides, args.trainer)
    elif args.phase == "evaluate":
        evaluate(args.out, args.concepts, args.methods, args.num_steps)
    else:
        params()


if __name__ == "__main__":
    main()
