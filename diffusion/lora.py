"""Low-rank adapters (PEFT LoRA) on a frozen UNet or flow transformer, saved and read in diffusers' LoRA format.

The adapter's weights are fp32 and trainable; the model they sit on stays frozen in its compute dtype.
Files are what `pipeline.save_lora_weights` writes (`pytorch_lora_weights.safetensors`, keys
`unet.<module>.lora_A.weight`, on SD3 / FLUX `transformer.<module>...`, the adapter's config in the metadata)
so `load_lora_weights` reads them back with their alpha.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

from utils.errors import ArtifactError, ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
# Concept Sliders' "noxattn": every linear / 1x1 layer inside the transformer blocks except cross-attention
# (attn2), i.e. self-attention q/k/v/out, the feed-forward and proj_in / proj_out.
NO_CROSS_ATTENTION = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                      r"(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")
# SD3 / FLUX: the attention projections (image stream of SD3's joint blocks; FLUX's double and single blocks), the
# default targets of diffusers' train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py.
ATTENTION_PROJECTIONS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
TARGETS = {"noxattn": NO_CROSS_ATTENTION, "attention": list(ATTENTION_PROJECTIONS)}
# The pipeline whose `save_lora_weights` writes each backbone kind's file, and the key prefix it writes.
SAVERS = {"sd": ("StableDiffusionPipeline", "unet"), "sdxl": ("StableDiffusionXLPipeline", "unet"),
          "sd3": ("StableDiffusion3Pipeline", "transformer"), "flux": ("FluxPipeline", "transformer")}


def add_lora(unet, rank: int, alpha: float, targets: str | Sequence[str], adapter_name: str = "default",
             init: str | bool = True, rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to `unet`; return its (fp32, trainable) parameters. `targets` is a key of
    TARGETS, a regex matched against full module names, or a list of module-name suffixes;
    rank_pattern / alpha_pattern give some layers (by name) their own rank and alpha."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"LoRA rank {rank} must be at least 1")
    target_modules = TARGETS.get(targets, targets) if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=init,
                        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}))
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        raise ConfigError(f"LoRA targets {targets!r} match no layer of this model ({str(e).splitlines()[0]})") from e
    params = []
    for name, p in unet.named_parameters():
        if f"lora_A.{adapter_name}." in name or f"lora_B.{adapter_name}." in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def set_lora_scale(unet, scale: float, adapter_name: str = "default") -> None:
    """Multiply the adapter's output by `scale` (on top of alpha / rank); negative scales reverse it."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            module.scaling[adapter_name] = scale * module.lora_alpha[adapter_name] / module.r[adapter_name]


@contextlib.contextmanager
def lora_disabled(unet) -> Iterator[None]:
    """The frozen UNet without its adapters inside the block."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def save_lora(path: str | Path, unet, sdxl: bool = False, adapter_name: str = "default", kind: str | None = None
              ) -> Path:
    """Write the adapter as diffusers LoRA weights at `path` (a .safetensors file), atomically. `kind` (sd3, flux)
    names a flow transformer's pipeline; else the UNet's (SDXL's when `sdxl`)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    layers = {k: v.detach().float().cpu() for k, v in state.items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    pipeline_name, prefix = SAVERS[kind or ("sdxl" if sdxl else "sd")]
    pipeline = getattr(diffusers, pipeline_name)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        pipeline.save_lora_weights(tmp, weight_name=path.name, **{f"{prefix}_lora_layers": layers,
                                                                  f"{prefix}_lora_adapter_metadata": metadata})
        shutil.move(str(Path(tmp) / path.name), str(path))
    path.chmod(0o644)
    return path


def load_lora(unet, path: str | Path, adapter_name: str = "default", prefix: str = "unet") -> None:
    """Add the adapter of a diffusers LoRA file to `unet` (as `save_lora` wrote it); prefix "transformer" for an
    SD3 / FLUX transformer."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"LoRA file {path} does not exist; pass a run's {LORA_FILE}")
    try:
        # folder + weight_name: diffusers reads the adapter's config (its alpha) from the metadata only this way
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=prefix, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"{path} does not fit this {prefix} ({str(e).splitlines()[0]}); it was trained on "
                            f"another architecture") from e
