"""Concept Sliders (Gandikota et al., 2023), the LoRA baseline of Prompt Sliders.

A rank-4 LoRA on the UNet's transformer layers except cross-attention ("noxattn") learns

    eps_LoRA(z_t, c_t) = eps(z_t, neutral) + eta * (eps(z_t, c+) - eps(z_t, c-))     (minus for erase)

with z_t from partially denoising fresh noise with the LoRA on (k ~ U{1..49} of 50 DDIM steps,
guidance 3) and the three predictions from the frozen UNet (LoRA off, one batched call) at guidance 1,
as the authors' code does. The same slider templates as Prompt Sliders; at sampling time the
strength is the LoRA scale. Exported as diffusers LoRA weights.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from diffusion.backbone import Backbone
from diffusion.lora import LORA_FILE, add_lora, lora_disabled, save_lora
from diffusion.sliders import SLIDER_INFO, LoraSlider, SliderSet
from lightning_modules.base import DiffusionModule
from lightning_modules.slider import TextCache, denoise_partially, slider_target
from utils.io import write_json

log = logging.getLogger(__name__)
ADAPTER = "slider"


class ConceptSliderModule(DiffusionModule):
    def __init__(self, backbone: dict, optimizer: Callable, lr_scheduler: Callable | None = None,
                 rank: int = 4, alpha: float = 1.0, targets: str = "noxattn", denoise_steps: int = 50,
                 denoise_guidance: float = 3.0, resolution: int | None = None, info: dict | None = None,
                 seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        self.rank, self.alpha, self.targets = rank, alpha, targets
        self.denoise_steps, self.denoise_guidance = denoise_steps, denoise_guidance
        self.resolution = resolution
        self.info = dict(info or {})
        self.save_hyperparameters({"backbone": self.backbone_config, "rank": rank, "alpha": alpha, "targets": targets,
                                   "seed": seed}, logger=False)
        self.sliders: SliderSet | None = None
        self._frozen_text = TextCache()

    def build(self, backbone: Backbone) -> None:
        params = add_lora(backbone.unet, self.rank, self.alpha, self.targets, adapter_name=ADAPTER)
        log.info("LoRA rank %d on %s: %d parameters", self.rank, self.targets, sum(p.numel() for p in params))
        self.sliders = SliderSet([LoraSlider(backbone.unet, ADAPTER)])

    def on_fit_start(self) -> None:
        if self.resolution is None:
            self.resolution = getattr(self.trainer.datamodule, "resolution", None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        backbone, g = self.backbone, self.step_generator()
        text = lambda prompts: self._frozen_text(backbone, list(prompts))  # noqa: E731
        latents, t = denoise_partially(backbone, text(batch["target"]), text([""]), self.denoise_steps,
                                       self.denoise_guidance, g, self.resolution)  # with the LoRA on
        with torch.no_grad(), lora_disabled(backbone.unet):
            cond = text(list(batch["neutral"]) + list(batch["positive"]) + list(batch["unconditional"]))
            x, tt = latents.repeat(3, 1, 1, 1), t.repeat(3)
            eps_n, eps_p, eps_m = backbone.to_epsilon(backbone.predict(x, tt, cond), x, tt).float().chunk(3)
            scale = batch["sign"].to(self.device).float() * batch["guidance_scale"].to(self.device).float()
            target = slider_target(eps_n, eps_p, eps_m, scale)
        pred = backbone.to_epsilon(backbone.predict(latents, t, text(batch["target"])), latents, t).float()
        loss = F.mse_loss(pred, target)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    @contextlib.contextmanager
    def sampling_setting(self, strength: float | None = None, **setting) -> Iterator[None]:
        """strength: the LoRA scale (None: 1; negative reverses the slider)."""
        with super().sampling_setting(**setting), self.sliders.strengths(strength):
            yield

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        path = save_lora(out / LORA_FILE, self.backbone.unet, sdxl=self.backbone.is_sdxl, adapter_name=ADAPTER)
        info = out / SLIDER_INFO
        write_json(info, {"method": "concept_slider", **self.backbone_identity(), "step": self.global_step,
                          "file": LORA_FILE, "adapter_name": ADAPTER, "rank": self.rank,
                          "alpha": self.alpha, "targets": self.targets, **self.info})
        log.info("wrote %s (%d bytes) and %s", path, path.stat().st_size, info)
        return [path, info]
