"""The UNet calls of a prompt-slider step, timed alone: is the step bound by its kernel count or its FLOPs, would
channels_last help, and would one merged call beat the frozen and trained calls apart?

    python benchmarks/unet_calls.py --model sdxl_random --out runs/unet_calls

Calls (CUDA graphs on a GPU, as training replays them; bf16 weights):
- f1, f3: no-gradient forwards at batch 1 and 3 (f3: the step's frozen call on neutral, positive and negative);
- t1: a batch-1 forward and backward to the text states (the step's trained call);
- j4: one batch-4 forward and backward with the loss on its last row (the two calls merged).
f1 against f3 shows how far a call is from being bound by its FLOPs (a FLOP-bound call takes 3x at batch 3).
Each layout is timed twice, in turns, and the median kept. Writes <out>/unet_calls.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a photo of a person", "a photo of an old person", "a photo of a young person", "a photo of a person x"]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def calls(backbone, size: int) -> dict:
    """The four calls by name; t1 and j4 return the trained text row's gradient (the same in both)."""
    from diffusion.conditioning import Conditioning

    cond = backbone.encode_prompt(PROMPTS)
    x = torch.randn(4, 4, size, size, device=backbone.device)
    t = torch.full((4,), 500, device=backbone.device)

    def rows(part: slice, states: torch.Tensor | None = None) -> Conditioning:
        pick = (lambda v: None if v is None else v[part])
        return Conditioning(cond.hidden_states[part] if states is None else states, pick(cond.pooled),
                            pick(cond.time_ids))

    def frozen(n: int):
        with torch.no_grad():
            backbone.predict(x[:n], t[:n], rows(slice(0, n)))

    def trained() -> torch.Tensor:
        states = cond.hidden_states[3:4].clone().requires_grad_(True)
        backbone.predict(x[3:4], t[3:4], rows(slice(3, 4), states)).float().square().mean().backward()
        return states.grad

    def merged() -> torch.Tensor:
        trained_row = cond.hidden_states[3:4].clone().requires_grad_(True)
        states = torch.cat([cond.hidden_states[:3], trained_row])
        backbone.predict(x, t, rows(slice(0, 4), states))[3:].float().square().mean().backward()
        return trained_row.grad

    return {"f1": lambda: frozen(1), "f3": lambda: frozen(3), "t1": trained, "j4": merged}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(backbone, size: int, repeats: int) -> dict:
    """Milliseconds per call: {layout: {call: median over two turns}}."""
    from diffusion.cuda_graphs import UNetGraphs

    measured: dict = {}
    for layout in list(LAYOUTS) * 2:  # in turns: a drifting clock affects both layouts alike
        backbone.unet.to(memory_format=LAYOUTS[layout])
        backbone.unet_graphs = UNetGraphs(backbone.unet) if backbone.device.type == "cuda" else None
        for name, call in calls(backbone, size).items():
            for _ in range(3):  # captures and warm-up
                call()
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            sync()
            measured.setdefault(layout, {}).setdefault(name, []).append((time.perf_counter() - start) / repeats * 1e3)
        backbone.unet_graphs = None
    backbone.unet.to(memory_format=torch.contiguous_format)
    return {layout: {name: statistics.median(v) for name, v in by_call.items()} for layout, by_call in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl_random", help="a conf/model name")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=30, help="calls timed per layout and turn")
    parser.add_argument("--resolution", type=int, default=512,
                        help="pixels of the trained images (conf/slider/age.yaml's templates: 512)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.path=<folder>")
    args = parser.parse_args()

    from diffusion.backbone import load_backbone
    from utils.config import entry_config

    cuda = torch.cuda.is_available()
    cfg = entry_config("train", [f"model={args.model}", *args.overrides]).model
    backbone = load_backbone(**{k: v for k, v in cfg.items() if k != "dtype"},
                             dtype=torch.bfloat16 if cuda else torch.float32).to("cuda" if cuda else "cpu")
    size = args.resolution // 8
    result = {"model": args.model, "device": torch.cuda.get_device_name() if cuda else "cpu", "latent_side": size,
              "ms_per_call": time_calls(backbone, size, args.repeats)}
    for layout, ms in result["ms_per_call"].items():
        print(f"{layout:14s} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in ms.items())
              + f"  | frozen b3 + trained b1 {ms['f3'] + ms['t1']:.2f} ms, merged b4 {ms['j4']:.2f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unet_calls.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
