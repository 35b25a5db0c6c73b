"""Rectified-flow backbones on one GPU: what textual inversion, the prompt slider, the LoRA concept slider and
flow editing cost on full-size SD3-medium and FLUX.1-dev with random weights, in bf16.

    python benchmarks/flow_speed.py --models sd3_random flux_random --steps 12 --out runs/flow_speed
    python benchmarks/flow_speed.py --models tiny_sd3 tiny_flux --steps 3 --sample-steps 3 --out /tmp/fs   # CPU check
    python benchmarks/flow_speed.py model.gradient_checkpointing=true --models flux_random   # activations recomputed: less memory

For each model the backbone is made once (random models in GPU memory, nothing written to disk; configured
models loaded as train.py loads them) and every measurement shares it:
- training: each method's module composed from its train.py config (`method=... model=... slider=age`) and fitted
  by a Lightning Trainer for `--steps` steps (bf16-mixed on a GPU) with the step timer of every run
  (callbacks/throughput.py): median seconds per step after its warm-up, and the peak GPU memory of that fit;
- sampling: one image at the model's resolution and guidance, `--sample-steps` Euler steps, plain, with the
  trained prompt slider at strength 2, and with the trained LoRA slider at strength 2, in turns (`--repeats`
  rounds after one warm-up round), medians;
- editing: edit_method=flow_p2p (flow inversion, then [source, target] under prompt-to-prompt), seconds per image.
Writes <out>/flow_speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from timing import sync, time_in_turns  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = {  # name -> train.py overrides
    "textual_inversion": ["method=textual_inversion"],
    "prompt_slider": ["method=prompt_slider", "slider=age", "module.pool.size=2", "slider.templates.0.resolution=null"],
    "concept_slider": ["method=concept_slider", "slider=age", "module.pool.size=2",
                       "slider.templates.0.resolution=null"],
}
RANDOM_ARCHS = {"random_sd3": "sd3", "random_flux": "flux"}


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else None


def model_settings(model: str, overrides: Sequence[str] = ()):
    """conf/model/<model>.yaml as train.py composes it with `overrides` (e.g. model.resolution=64)."""
    from utils.config import entry_config

    return entry_config("train", [f"model={model}", *overrides]).model


def make_backbone(model: str, tokenizer_dir: Path, overrides: Sequence[str] = (), sizes: dict | None = None):
    """The model's FlowBackbone in bf16 on the GPU (fp32 on the CPU): random architectures built in memory (with
    `sizes`' component configs, diffusion.random_flow_models.architecture_configs, when given)."""
    from diffusion.backbone import load_backbone
    from diffusion.flow import flow_backbone_from_pipeline
    from diffusion.random_flow_models import random_flow_pipeline

    cfg = model_settings(model, overrides)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    if cfg.get("build") in RANDOM_ARCHS:
        arch = RANDOM_ARCHS[cfg.build]
        pipe = random_flow_pipeline(arch, tokenizer_dir, dtype=dtype, sizes=sizes)
        return flow_backbone_from_pipeline(arch, pipe, cfg.get("max_sequence_length"), cfg.name,
                                           gradient_checkpointing=cfg.get("gradient_checkpointing", False),
                                           resolution=cfg.resolution, training_guidance=cfg.get("training_guidance"))
    return load_backbone(**{k: v for k, v in cfg.items() if k != "dtype"}, dtype=dtype).to(DEVICE)


def reference_images(run_dir: Path, resolution: int) -> Path:
    """The shapes world's sun_medal set rendered at the model's resolution (the shipped renders are 64 px)."""
    from datamodules.shapes.concepts import write_reference_set

    return write_reference_set("sun_medal", run_dir / "references", resolution) / "images"


def train(backbone, model: str, method: str, steps: int, run_dir: Path, overrides: Sequence[str] = ()):
    """Fit the method's module for `steps` steps on the shared backbone; its timing and the fitted module."""
    import lightning as L
    from hydra.utils import instantiate

    from callbacks.throughput import StepTimer
    from utils.config import entry_config

    if method == "textual_inversion":  # trains on images: the concept's set at the model's resolution
        overrides = [*overrides, f"data.images_dir={reference_images(run_dir, backbone.resolution)}"]
    cfg = entry_config("train", [*METHODS[method], f"model={model}", "seed=0", *overrides])
    module = instantiate(cfg.module)
    module.backbone = backbone  # configure_model keeps a backbone it is given
    module.build(backbone)
    data = instantiate(cfg.data)
    timer = StepTimer(str(run_dir), warmup=min(3, steps - 1))
    trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, max_steps=steps,
                        precision="bf16-mixed" if DEVICE == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], default_root_dir=str(run_dir))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    module.to(DEVICE)  # Lightning's teardown moved it to the CPU; its token hooks stay on the shared backbone
    summary = timer.summary(module)
    return module, {"median_step_s": summary.get("median_step_s"), "fit_s": wall, "peak_gib": peak_gib()}


def time_sampling(backbone, modules: dict, sample_steps: int, repeats: int, guidance: float) -> dict:
    from diffusion.flow import flow_generate
    from diffusion.lora import lora_disabled

    prompt = "a photo of a person"
    variants = {"plain": lambda: flow_generate(backbone, [prompt], [0], sample_steps, guidance)}
    for name in ("prompt_slider", "concept_slider"):
        module = modules.get(name)
        if module is not None:
            variants[name] = (lambda m=module: m.sample([m.sampling_prompt("a photo of a {}", "person")], [0],
                                                        {"strength": 2.0}, num_steps=sample_steps,
                                                        guidance_scale=guidance))
    lora = modules.get("concept_slider")

    def setting(name: str):  # the trained LoRA stays on the transformer: off but for its own variant
        return lora_disabled(lora.lora_model) if lora is not None and name != "concept_slider" else nullcontext()

    return {f"sample_{name}_s": s for name, s in time_in_turns(variants, repeats, setting).items()}


def time_editing(backbone, sample_steps: int, guidance: float) -> dict:
    from diffusion.editing import load_edit_method

    method = load_edit_method("flow_p2p", num_steps=sample_steps)
    size = backbone.resolution // backbone.vae_scale_factor
    z0 = torch.randn(1, backbone.latent_channels, size, size, device=backbone.device,
                     generator=torch.Generator(backbone.device).manual_seed(0)).to(backbone.dtype)
    rounds = []
    for _ in range(2):  # the first warms up
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        method(backbone, z0, "a photo of a cat", "a photo of a dog", guidance_scale=guidance)
        sync()
        rounds.append(time.perf_counter() - start)
    return {"edit_s": rounds[-1], "edit_peak_gib": peak_gib()}


def measure(model: str, steps: int, sample_steps: int, repeats: int, out: Path, methods: list[str],
            overrides: Sequence[str] = (), sizes: dict | None = None, editing: bool = True) -> dict:
    """One model's row; `overrides` go to every composed config, `sizes` to a random architecture's components
    (tests/test_random_flow_models.py runs the random path at toy sizes)."""
    guidance = float(model_settings(model, overrides).get("guidance_scale", 7.5))
    row: dict = {"model": model, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                 "steps": steps, "sample_steps": sample_steps, "guidance_scale": guidance}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        start = time.perf_counter()
        backbone = make_backbone(model, Path(tokenizer_dir), overrides, sizes)
        row["build_s"] = time.perf_counter() - start
        row["backbone_gib"] = sum(p.numel() * p.element_size() for p in backbone.parameters()) / 2 ** 30
        print(json.dumps(row), flush=True)
        if editing:
            row.update(time_editing(backbone, sample_steps, guidance))  # before any method adds a token or adapter
            print(json.dumps(row), flush=True)
        modules = {}
        for method in methods:
            modules[method], timing = train(backbone, model, method, steps, out / f"{model}_{method}", overrides)
            row.update({f"{method}_{k}": v for k, v in timing.items()})
            print(json.dumps(row), flush=True)
        row.update(time_sampling(backbone, modules, sample_steps, repeats, guidance))
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| model | TI s/step (peak GiB) | prompt slider s/step (peak GiB) | LoRA slider s/step (peak GiB) | "
             "sample s: plain / prompt slider / LoRA slider | inversion + edit s (peak GiB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [f"{f(r.get(f'{m}_median_step_s'))} ({f(r.get(f'{m}_peak_gib'), 1)})"
                 for m in ("textual_inversion", "prompt_slider", "concept_slider")]
        sampling = " / ".join(f(r.get(f"sample_{v}_s"), 2) for v in ("plain", "prompt_slider", "concept_slider"))
        lines.append(f"| {r['model']} | {' | '.join(cells)} | {sampling} | "
                     f"{f(r.get('edit_s'), 2)} ({f(r.get('edit_peak_gib'), 1)}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd3_random", "flux_random"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=12, help="training steps per method (3 warm up)")
    parser.add_argument("--sample-steps", type=int, default=28, help="Euler steps per image (the pipelines' 28)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "benchmarks" / "flow_speed")
    parser.add_argument("--no-editing", dest="editing", action="store_false", help="skip the inversion + edit timing")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every model and run, before --models "
                                                     "(e.g. model.gradient_checkpointing=true)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        rows.append(measure(model, args.steps, args.sample_steps, args.repeats, args.out, args.methods,
                            args.overrides, editing=args.editing))
        (args.out / "flow_speed.json").write_text(json.dumps(rows, indent=2))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))


if __name__ == "__main__":
    main()
