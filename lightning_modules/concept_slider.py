"""Concept Sliders (Gandikota et al., 2023), the LoRA baseline of Prompt Sliders.

A rank-4 LoRA on the UNet's transformer layers except cross-attention ("noxattn") learns

    eps_LoRA(z_t, c_t) = eps(z_t, neutral) + eta * (eps(z_t, c+) - eps(z_t, c-))     (minus for erase)

with z_t from partially denoising fresh noise with the LoRA on (k ~ U{1..49} of 50 DDIM steps,
guidance 3) and the three predictions from the frozen UNet (LoRA off, one batched call) at guidance 1,
as the authors' code does. The same slider templates as Prompt Sliders; at sampling time the
strength is the LoRA scale. Exported as diffusers LoRA weights.

On a rectified-flow backbone (SD3, FLUX) the LoRA sits on the transformer's attention projections (to_q, to_k, to_v,
to_out.0, as diffusers' train_dreambooth_lora_sd3 / _flux scripts target) and the loss is the same with velocities
v = noise - z_0 in place of eps, all at one x_t (lightning_modules.slider.eq5_prediction):

    v_LoRA(x_t, c_t) = v(x_t, neutral) + eta * (v(x_t, c+) - v(x_t, c-))

x_t = (1 - t) z_0 + t noise with t as the backbone trains and z_0 from the latent pool (the frozen model's samples
of c_t, module.pool), as the prompt slider draws it: DDIM's partial denoising has no flow counterpart here.
The file is what SD3LoraLoaderMixin / FluxLoraLoaderMixin.save_lora_weights write (keys `transformer.`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from diffusion.backbone import Backbone
from diffusion.flow import FlowBackbone
from diffusion.lora import LORA_FILE, add_lora, lora_disabled, save_lora
from diffusion.sliders import SLIDER_INFO, LoraSlider, SliderSet
from lightning_modules.base import DiffusionModule
from lightning_modules.slider import (LatentPool, PoolSettings, TextCache, denoise_partially, eq5_prediction,
                                      slider_target)
from utils.errors import ConfigError
from utils.io import write_json

log = logging.getLogger(__name__)
ADAPTER = "slider"


class ConceptSliderModule(DiffusionModule):
    flow_backbones = True  # SD3 / FLUX: the LoRA on the transformer, eq. above on velocities

    def __init__(self, backbone: dict, optimizer: Callable, lr_scheduler: Callable | None = None,
                 rank: int = 4, alpha: float = 1.0, targets: str | None = None, denoise_steps: int = 50,
                 denoise_guidance: float = 3.0, resolution: int | None = None, pool: dict | None = None,
                 info: dict | None = None, seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        self.rank, self.alpha, self.targets = rank, alpha, targets
        self.denoise_steps, self.denoise_guidance = denoise_steps, denoise_guidance
        self.resolution = resolution
        self.pool = LatentPool(**PoolSettings.from_config(pool).as_dict(), seed=seed) if pool else None
        self.info = dict(info or {})
        self.save_hyperparameters({"backbone": self.backbone_config, "rank": rank, "alpha": alpha, "targets": targets,
                                   "seed": seed}, logger=False)
        self.sliders: SliderSet | None = None
        self._frozen_text = TextCache()

    @property
    def is_flow(self) -> bool:
        return isinstance(self.backbone, FlowBackbone)

    @property
    def lora_model(self) -> torch.nn.Module:
        """What the LoRA sits on: the UNet, or the SD3 / FLUX transformer."""
        return self.backbone.transformer if self.is_flow else self.backbone.unet

    def build(self, backbone: Backbone) -> None:
        if self.targets is None:  # Concept Sliders' layers on a UNet; the attention projections on SD3 / FLUX
            self.targets = "attention" if self.is_flow else "noxattn"
        params = add_lora(self.lora_model, self.rank, self.alpha, self.targets, adapter_name=ADAPTER)
        log.info("LoRA rank %d on %s: %d parameters", self.rank, self.targets, sum(p.numel() for p in params))
        self.sliders = SliderSet([LoraSlider(self.lora_model, ADAPTER)])

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.resolution is None:
            self.resolution = getattr(datamodule, "resolution", None)
        if self.is_flow and hasattr(datamodule, "target_prompts"):
            self.pooled_latents(datamodule.target_prompts())

    def pooled_latents(self, targets: list[str], g: torch.Generator | None = None) -> torch.Tensor | None:
        """The frozen model's samples of the targets (LoRA off): fills the pool, and with `g` draws one per target."""
        if self.pool is None:
            raise ConfigError("a concept slider on SD3 / FLUX draws z_0 from module.pool; set module.pool.size, "
                              "num_steps and guidance_scale")
        with lora_disabled(self.lora_model):
            progress = self._trainer is not None and self.trainer.is_global_zero
            self.pool.fill(self.backbone, targets, self.resolution, progress=progress)
            if g is None:
                return None
            return torch.stack([self.pool.draw(self.backbone, p, g, self.resolution) for p in targets])

    def noised_latents(self, targets: list[str], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t and t: on a UNet, fresh noise partially denoised with the LoRA on; on SD3 / FLUX, a pooled z_0 at
        x_t = (1 - t) z_0 + t noise, t as the backbone trains."""
        backbone = self.backbone
        if not self.is_flow:
            return denoise_partially(backbone, self.text(targets), self.text([""]), self.denoise_steps,
                                     self.denoise_guidance, g, self.step_generator(offset=1, device="cpu"),
                                     self.resolution)  # with the LoRA on
        z0 = self.pooled_latents(list(targets), g).float()
        noise = torch.randn(z0.shape, generator=g, device=self.device, dtype=torch.float32)
        t = backbone.sample_timesteps(len(targets), g).to(self.device)
        return backbone.add_noise(z0, noise, t).to(backbone.dtype), t

    def text(self, prompts):
        """The frozen text encoders' conditioning of `prompts` (cached per prompt)."""
        return self._frozen_text(self.backbone, list(prompts))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        backbone, g = self.backbone, self.step_generator()
        latents, t = self.noised_latents(batch["target"], g)
        # UNet:      target = eps(z_t, neutral) + eta * (eps(z_t, c+) - eps(z_t, c-)), the frozen UNet at guidance 1
        # SD3 / FLUX: target = v(x_t, neutral) + eta * (v(x_t, c+) - v(x_t, c-)), the frozen transformer's velocities
        with torch.no_grad(), lora_disabled(self.lora_model):
            cond = self.text(list(batch["neutral"]) + list(batch["positive"]) + list(batch["unconditional"]))
            x, tt = latents.repeat(3, 1, 1, 1), t.repeat(3)
            eps_n, eps_p, eps_m = eq5_prediction(backbone, x, tt, cond).float().chunk(3)
            scale = batch["sign"].to(self.device).float() * batch["guidance_scale"].to(self.device).float()
            target = slider_target(eps_n, eps_p, eps_m, scale)
        pred = eq5_prediction(backbone, latents, t, self.text(batch["target"])).float()  # with the LoRA on
        loss = F.mse_loss(pred, target)
        self.log("train/loss", loss, batch_size=len(batch["target"]))
        return loss

    @contextlib.contextmanager
    def sampling_setting(self, strength: float | None = None, **setting) -> Iterator[None]:
        """strength: the LoRA scale (None: 1; negative reverses the slider)."""
        with super().sampling_setting(**setting), self.sliders.strengths(strength):
            yield

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        kind = self.backbone.kind if self.is_flow else ("sdxl" if self.backbone.is_sdxl else "sd")
        path = save_lora(out / LORA_FILE, self.lora_model, adapter_name=ADAPTER, kind=kind)
        info = out / SLIDER_INFO
        write_json(info, {"method": "concept_slider", **self.backbone_identity(), "kind": kind,
                          "step": self.global_step, "file": LORA_FILE, "adapter_name": ADAPTER, "rank": self.rank,
                          "alpha": self.alpha, "targets": self.targets, **self.info})
        log.info("wrote %s (%d bytes) and %s", path, path.stat().st_size, info)
        return [path, info]
