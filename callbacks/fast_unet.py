"""A faster frozen UNet for training: CUDA graphs or torch.compile, switched on when training starts.

At batch 1 a UNet step is bound by the CPU launching thousands of small kernels (an SDXL slider step
keeps the GPU busy about a tenth of its wall time, docs/benchmarks.md).

- `cuda_graphs`: each input signature's forward (and backward to the text states) is captured once
  and replayed (diffusion/cuda_graphs.py); capturing takes about a second.
- `default`, `reduce-overhead`, `max-autotune`: torch.compile of the UNet in place, for static
  shapes; compiling an SDXL UNet's forward and backward takes several minutes.

CUDA graphs need a UNet that is frozen or trains LoRA adapters alone (personalized residuals: the graphs'
backward gives the adapters' gradients); torch.compile a frozen UNet, not an adapted one. Otherwise an
error says so. With CUDA graphs, calls through attention processors that record maps in Python run eager.
Switched on in on_train_start (after the latent pools and caches made in on_fit_start) and off when
training ends.

`auto` (the default) is `cuda_graphs` wherever it applies (a GPU, and a UNet frozen or training adapters
alone) and eager elsewhere (the CPU, a UNet that trains its own weights, flow backbones' transformers),
without an error; `null` is eager.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from diffusion.cuda_graphs import UNetGraphs, adapters_train_alone, frozen_unet
from utils.errors import ConfigError

log = logging.getLogger(__name__)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
MODES = ("auto", "cuda_graphs", *COMPILE_MODES)


class FastUNet(L.Callback):
    def __init__(self, mode: str | None = "auto"):
        if mode is not None and mode not in MODES:
            raise ConfigError(f"callbacks.fast_unet.mode={mode!r} is unknown; use null or one of {MODES}")
        self.mode = mode
        self.active: str | None = None  # the mode in use during training (auto resolved), None when eager

    def on_train_start(self, trainer, pl_module) -> None:
        self.active = None
        if self.mode is None:
            return
        backbone = getattr(pl_module, "backbone", None)
        graphs_apply = adapters_train_alone(getattr(backbone, "unet", None))
        if self.mode == "auto":
            if pl_module.device.type == "cuda" and graphs_apply:
                self.enable(pl_module, "cuda_graphs")
            else:
                log.info("fast UNet: eager (auto: %s)", "no GPU" if pl_module.device.type != "cuda"
                         else "the UNet trains its own weights, or is not a UNet")
            return
        if pl_module.device.type != "cuda":
            raise ConfigError(f"callbacks.fast_unet.mode={self.mode} needs a GPU; use trainer=gpu or mode=null")
        if self.mode == "cuda_graphs" and not graphs_apply:
            raise ConfigError("callbacks.fast_unet.mode=cuda_graphs: this method trains the UNet's own weights (or "
                              "has no UNet); set callbacks.fast_unet.mode=null")
        if self.mode != "cuda_graphs" and frozen_unet(backbone) is None:
            raise ConfigError(f"callbacks.fast_unet.mode={self.mode}: this method has no frozen backbone UNet (it "
                              f"trains or adapts the UNet); set callbacks.fast_unet.mode=null or cuda_graphs")
        self.enable(pl_module, self.mode)

    def enable(self, pl_module, mode: str) -> None:
        unet = pl_module.backbone.unet
        if mode == "cuda_graphs":
            pl_module.backbone.unet_graphs = UNetGraphs(unet)
        else:
            unet.compile(mode=mode, dynamic=False)
        self.active = mode
        log.info("fast UNet: %s%s", mode, " (auto)" if self.mode == "auto" else "")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.active in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # this step may overwrite the last step's graph outputs

    def on_train_end(self, trainer, pl_module) -> None:
        if self.active == "cuda_graphs":
            pl_module.backbone.unet_graphs = None  # frees the graphs' memory; later sampling runs eager
        self.active = None
