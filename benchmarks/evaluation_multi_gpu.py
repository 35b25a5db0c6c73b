"""evaluate.py on 1 and N GPUs: the same table, and the wall time of each.

Scores a textual-inversion artifact on the shapes model with the probes, CLIP-T / CLIP-I / DINO
(random-initialised CLIP ViT-L/14 and DINO ViT-S/16 architectures: the real compute, no download),
PSNR and LPIPS against the class word's sample, then runs `train.py` with DDP and the evaluation
callback. Usage (on a machine with >= 2 GPUs):

    python benchmarks/evaluation_multi_gpu.py --devices 2 --out /tmp/eval_gpu.json
"""

from __future__ import annotations

import argparse
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


def build_metric_models(root: Path) -> Path:
    """clip-vit-large-patch14 and dino-vits16 folders with random weights, and an AlexNet weights file."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from datamodules.shapes.world import vocabulary
    from diffusion.clip_tokenizer import write_clip_tokenizer
    from metrics.lpips import build_features

    torch.manual_seed(0)
    clip = write_clip_tokenizer(vocabulary(), root / "clip-vit-large-patch14")
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(clip)
    ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536), add_pooling_layer=False).save_pretrained(root / "dino-vits16")
    torch.save({f"features.{k}": v for k, v in build_features("alex").state_dict().items()},
               root / "alexnet-owt-7be5be79.pth")
    return root


def concept_file(root: Path, model: str) -> Path:
    """A textual-inversion file: the class word's embedding, nudged so that the token's samples differ."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import save_file

    from diffusion.backbone import load_backbone
    from utils.config import register_resolvers

    register_resolvers()
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"model={model}"])
    backbone = load_backbone(**{k: v for k, v in cfg.model.items() if k in ("path", "kind", "build")})
    row = backbone.text_encoders[0].get_input_embeddings().weight[
        backbone.tokenizers[0].convert_tokens_to_ids(f"{cfg.model.initializer_word}</w>")]
    row = row + 0.3 * row.std() * torch.randn(row.shape, generator=torch.Generator().manual_seed(0))
    path = root / "learned_embeds.safetensors"
    save_file({"<sun>": row.detach().clone().view(1, -1)}, str(path))
    return path


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed; see {log}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--model", default="shapes", help="shapes, or sd15_random (SD1.5 compute at 512 px)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--out", default="evaluation_multi_gpu.json")
    parser.add_argument("--logs", default=None, help="folder for the runs' logs (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.logs or tempfile.mkdtemp(prefix="eval_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    models = build_metric_models(work / "metric_models")
    artifact = concept_file(work, args.model)
    shapes = args.model.startswith("shapes")
    backgrounds = ["white", "gray", "navy", "teal", "beige", "black"]
    prompts = [f"a {size} {{}} on a {bg} background" for size in ("small", "medium", "large") for bg in backgrounds]
    if not shapes:
        prompts = [f"a photo of a {{}} {where}" for where in ("on a beach", "in the snow", "on a table", "in a city")]
    prompts = (prompts * 8)[:args.prompts]
    common = [f"model={args.model}", f"artifact={artifact}", "metrics=personalization",
              f"paths.metric_models_dir={models}",
              *(["+metrics.attributes._target_=metrics.shapes_metrics.ShapesAttributeAccuracy"] if shapes else []),
              "+metrics.psnr._target_=metrics.image_quality.PSNR", "+metrics.lpips._target_=metrics.lpips.LPIPS",
              f"+metrics.lpips.weights={models / 'alexnet-owt-7be5be79.pth'}", "pairs=class_word",
              f"references={ROOT / 'assets/shapes_concepts/sun_medal/images'}",
              f"reference_masks={ROOT / 'assets/shapes_concepts/sun_medal/masks'}",
              f"prompts={json.dumps(prompts)}", f"seeds={list(range(args.seeds))}", f"num_steps={args.steps}",
              f"batch_size={32 if shapes else 8}", "device=cuda"]
    results = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "samples": len(prompts) * args.seeds, "steps": args.steps}
    for devices in (1, args.devices):
        out = work / f"eval_{devices}"
        seconds = run(["evaluate.py", *common, f"devices={devices}", f"hydra.run.dir={out}"],
                      work / f"eval_{devices}.log")
        summary = json.loads((out / "metrics.json").read_text())
        results[f"devices_{devices}"] = {"seconds": round(seconds, 1), "rows": summary["rows"],
                                         "world_size": summary["world_size"]}
    one, many = (results[f"devices_{d}"]["rows"][0] for d in (1, args.devices))
    results["largest_difference"] = max(abs(one[k] - many[k]) for k in one if one[k] != float("inf"))
    if not shapes:  # the training check below runs the default (shapes) job
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return

    train_out = work / "train_ddp"
    seconds = run(["train.py", "trainer=ddp", f"trainer.devices={args.devices}", "logger=csv", "callbacks=eval",
                   "metrics=shapes_concept", f"trainer.max_steps={args.train_steps}",
                   "callbacks.evaluation.num_steps=25",
                   f"callbacks.evaluation.every_n_steps={args.train_steps // 2}", f"hydra.run.dir={train_out}"],
                  work / "train_ddp.log")
    evaluations = json.loads((train_out / "metrics.json").read_text())["evaluations"]
    results["train_ddp"] = {"seconds": round(seconds, 1), "evaluations": evaluations,
                            "grids": sorted(p.name for p in (train_out / "samples").glob("*.png"))}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
