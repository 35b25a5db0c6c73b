"""Textual inversion: this project's train.py against a plain eager diffusers loop, same model, images and batch.

    python benchmarks/peer_speed.py --model sd15_random --batches 1,4 --steps 60 --out runs/peer_speed
    python benchmarks/peer_speed.py --model sdxl_random --batches 1,4 --steps 40 --out runs/peer_speed_xl

The plain loop is written here with the compute of diffusers' textual-inversion examples: the VAE encodes
the batch, the text encoder(s) run forward and backward, the UNet runs forward and backward to its text
input, and AdamW updates the input embedding (the rows of the other tokens are put back after each step,
as the examples do); frozen weights in bf16 on a GPU, the text encoders and their embeddings in fp32 under
bf16 autocast. For each batch size the script times that loop in its own process, then runs train.py
(method=textual_inversion) on the same model, images and batch size, and prints both medians, the ratio
(ours / plain, in steps per second), and the plain step's model FLOP/s against the GPU's measured bf16
matmul peak. Writes <out>/peer_speed.json.
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

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from benchmarks.timing import run_timing  # noqa: E402
from benchmarks.train_speed import render_images  # noqa: E402

TOKEN, INITIALIZER = "<peer-concept>", "object"


def load_plain(path: str, device: str, dtype: torch.dtype):
    """The pipeline's parts as diffusers and transformers load them (no project code on the hot path)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = (Path(path) / "text_encoder_2").is_dir()
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    return sdxl, tokenizers, [e.to(device) for e in encoders], unet, vae, scheduler


def add_token(tokenizer, encoder) -> int:
    """The examples' set-up: a new token whose row starts from the initializer word's; only embeddings train."""
    tokenizer.add_tokens([TOKEN])
    encoder.resize_token_embeddings(len(tokenizer))
    token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    rows = encoder.get_input_embeddings().weight
    with torch.no_grad():
        rows[token_id] = rows[tokenizer.convert_tokens_to_ids(f"{INITIALIZER}</w>")]
    encoder.requires_grad_(False)
    rows.requires_grad_(True)
    return token_id


def load_images(folder: Path, size: int, batch: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    pixels = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size)))) for f in files]
    stacked = torch.stack(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return stacked[torch.arange(batch) % len(stacked)].to(device, dtype)


def plain_step_fn(parts, pixels: torch.Tensor, size: int, device: str, dtype: torch.dtype):
    """One training step of the plain loop, and the optimizer it steps."""
    sdxl, tokenizers, encoders, unet, vae, scheduler = parts
    token_ids = [add_token(t, e) for t, e in zip(tokenizers, encoders)]
    originals = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    params = [e.get_input_embeddings().weight for e in encoders]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    prompts = [f"a photo of a {TOKEN}"] * len(pixels)
    ids = [t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True,
             return_tensors="pt").input_ids.to(device) for t in tokenizers]  # the examples tokenize in the loader
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(len(pixels), 6)

    def step() -> torch.Tensor:
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if sdxl:
                first = encoders[0](ids[0], output_hidden_states=True)
                second = encoders[1](ids[1], output_hidden_states=True)
                states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).to(dtype)
                added = {"text_embeds": second[0].to(dtype), "time_ids": time_ids}
                pred = unet(noisy, t, states, added_cond_kwargs=added).sample
            else:
                pred = unet(noisy, t, encoders[0](ids[0])[0].to(dtype)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # only the new token's row may change
            for param, original, token_id in zip(params, originals, token_ids):
                keep = torch.ones(len(param), dtype=torch.bool, device=param.device)
                keep[token_id] = False
                param[keep] = original[keep]
        return loss

    return step


def time_plain(step, steps: int, warmup: int, device: str) -> list[float]:
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def step_flops(step) -> int:
    """Model FLOPs of one step (forward and backward), counted by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def bf16_peak(device: str) -> float | None:
    """Measured bf16 matmul FLOP/s of this GPU (8192^3, mean of 10 after 3 warm-ups)."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start)


def run_plain(args) -> None:
    """Child process: time the plain loop at one batch size; print one JSON line."""
    from diffusion.builds import ensure_built_pipeline
    from utils.config import model_config

    cfg = model_config(args.model)
    if cfg.build:
        ensure_built_pipeline(cfg.path, cfg.build)
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    parts = load_plain(cfg.path, device, dtype)
    pixels = load_images(Path(args.images), cfg.resolution, args.batch, device, dtype)
    step = plain_step_fn(parts, pixels, cfg.resolution, device, dtype)
    times = time_plain(step, args.steps, args.warmup, device)
    flops = step_flops(step)
    median = statistics.median(times)
    peak = bf16_peak(device)
    print(json.dumps({"median_step_s": median, "flops_per_step": flops, "flops_per_s": flops / median,
                      "bf16_peak_flops_per_s": peak, "fraction_of_peak": flops / median / peak if peak else None}))


def run_ours(args, batch: int, images: Path, out: Path) -> dict:
    run = out / f"ours_b{batch}"
    trainer = "gpu" if args.device.startswith("cuda") else "cpu"
    cmd = [sys.executable, "train.py", "method=textual_inversion", f"model={args.model}", f"trainer={trainer}",
           f"trainer.max_steps={args.steps}", f"data.images_dir={images}", f"data.batch_size={batch}",
           "logger=csv", f"hydra.run.dir={run}", "callbacks.model_checkpoint.every_n_train_steps=0",
           "callbacks.sample_grid=null", f"callbacks.step_timer.warmup={args.warmup}",
           f"module.token.initializer={INITIALIZER}", *args.overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return run_timing(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15_random")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--images", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for our runs (after the options)")
    args = parser.parse_intermixed_args()
    if args.plain_child:
        run_plain(args)
        return
    from utils.config import model_config

    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new --out")
    images = render_images(args.out / "images", model_config(args.model).resolution)
    rows = []
    for batch in args.batches:
        child = [sys.executable, __file__, "--plain-child", "--model", args.model, "--batch", str(batch),
                 "--images", str(images), "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--device", args.device, "--out", str(args.out)]
        plain = json.loads(subprocess.run(child, cwd=ROOT, check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
        ours = run_ours(args, batch, images, args.out)
        rows.append({"batch": batch, "plain": plain, "ours": ours,
                     "ratio": plain["median_step_s"] / ours["median_step_s"]})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "peer_speed.json").write_text(json.dumps({"model": args.model, "device": args.device,
                                                          "steps": args.steps, "rows": rows}, indent=2))
    print("\n| model | batch | plain diffusers s/step | ours s/step | ratio (ours steps/s over plain) | "
          "plain model TFLOP/s | of bf16 peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p = r["plain"]
        fraction = f"{p['fraction_of_peak']:.1%}" if p["fraction_of_peak"] else "-"
        print(f"| {args.model} | {r['batch']} | {p['median_step_s']:.4f} | {r['ours']['median_step_s']:.4f} | "
              f"{r['ratio']:.2f}x | {p['flops_per_s'] / 1e12:.2f} | {fraction} |")


if __name__ == "__main__":
    main()
