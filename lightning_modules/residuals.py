"""Personalized residuals (Ham et al., paper 002): low-rank offsets on a frozen UNet, and LAG sampling.

For every transformer block i, the output projection W_i (m_i x m_i; a 1x1 conv on SD1.x, linear on
SD2.x / SDXL) gets a residual dW_i = A_i B_i of rank r_i = 0.05 m_i (Sec. 3.2, 4.1), trained with the
plain diffusion loss (eq. 1) on a few images captioned "a photo of a V* <macro class>"; V* is a new
token that starts from a rarely used token's embedding and stays frozen (Sec. 3.2), the base weights
stay frozen, and no regularisation images are used. 150 iterations, batch 4, lr 1e-3 (Sec. 4.1).

Table 3's ablations are config: `targets` (proj_out | kv | proj_in and '+' combinations),
`token.train` (update V*), `prior.images_dir` (regularisation images), `rank` (a fixed rank).

Sampling: the residual everywhere (strength `strength`), or LAG (Sec. 3.3, eq. 3): in each block the
conditional cross-attention of V* and the class token, summed and binarised at its median, decides
where the residual applies; no extra UNet evaluations (diffusion/residuals.py).

The optimizer is the paper's silent choice: AdamW (the framework's default for every method).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from datamodules.prior import PriorImages
from diffusion.attention import AttentionHub
from diffusion.backbone import Backbone
from diffusion.lora import LORA_FILE, save_lora
from diffusion.residuals import ADAPTER, INFO_FILE, ResidualSampler, add_residuals
from diffusion.tokens import PlaceholderTokens, fill_template
from lightning_modules.base import DiffusionModule, LossBatch
from utils.errors import ConfigError
from utils.io import write_json

log = logging.getLogger(__name__)
EMBEDDINGS_FILE = "learned_embeds.safetensors"


class ResidualModule(DiffusionModule):
    def __init__(self, backbone: dict, optimizer: Callable, token: dict, class_word: str,
                 lr_scheduler: Callable | None = None, targets: str = "proj_out", rank_ratio: float = 0.05,
                 rank: int | None = None, init: str = "random", prior: dict | None = None,
                 sampling: dict | None = None, seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        self.token_config = {"name": "<v>", "initializer": None, "train": False, **dict(token)}
        if not class_word or not str(class_word).strip():
            raise ConfigError("module.class_word is empty; give the concept's macro class (e.g. dog), which "
                              "the prompts and LAG use")
        self.class_word = str(class_word)
        self.targets, self.rank_ratio, self.rank, self.init = targets, rank_ratio, rank, init
        # regularisation images: off in the paper (Sec. 3.2); weight 1 as DreamBooth's prior loss
        self.prior_config = {"images_dir": None, "prompt": "a photo of a {}", "weight": 1.0, **dict(prior or {})}
        # sampling defaults: the residual everywhere at strength 1 (LAG is a sampling-time choice)
        self.sampling_defaults = {"lag": False, "strength": 1.0, **dict(sampling or {})}
        self.save_hyperparameters({"backbone": self.backbone_config, "token": self.token_config,
                                   "class_word": self.class_word, "targets": targets, "rank_ratio": rank_ratio,
                                   "rank": rank, "init": init, "seed": seed}, logger=False)
        self.tokens: PlaceholderTokens | None = None
        self.ranks: dict[str, int] = {}
        self.prior: PriorImages | None = None
        self.sampler: ResidualSampler | None = None

    # ----- model ----------------------------------------------------------------------------------
    def build(self, backbone: Backbone) -> None:
        cfg = self.token_config
        self.tokens = PlaceholderTokens(backbone, cfg["name"], initializer=cfg.get("initializer"))
        for rows in self.tokens.rows:
            rows.rows.requires_grad_(bool(cfg.get("train")))  # V* frozen (Sec. 3.2) unless the ablation asks
        params, self.ranks = add_residuals(backbone.unet, self.targets, self.rank_ratio, self.rank, self.init,
                                           seed=self.seed)
        log.info("residuals on %d %s layers (ranks %s): %d parameters", len(self.ranks), self.targets,
                 sorted(set(self.ranks.values())), sum(p.numel() for p in params))
        self.sampler = ResidualSampler(backbone, self.token_ids(), self.class_word)
        if self.prior_config["images_dir"]:
            self.prior = PriorImages(self.prior_config["images_dir"],
                                     fill_template(self.prior_config["prompt"], self.class_word), backbone.resolution)

    def token_ids(self) -> list[int]:
        return list(self.tokens.rows[0].ids)

    @property
    def concept(self) -> str:
        """What stands for the concept in prompts: 'V* <macro class>'."""
        return f"{self.tokens.token} {self.class_word}"

    def residual_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.backbone.unet.named_parameters() if f".{ADAPTER}." in n)

    # ----- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batches = [LossBatch(batch["pixel_values"], batch["prompt"], keys=batch.get("image_key"))]  # eq. (1)
        if self.prior is not None:  # the class images join the concept's in one UNet call
            pixels, prompts = self.prior.draw(len(batch["prompt"]), self.step_generator(offset=1), self.device)
            batches.append(LossBatch(pixels, prompts, self.step_generator(offset=2)))
        loss, *prior = self.diffusion_losses(batches)
        self.log("train/concept", loss.detach(), batch_size=len(batch["prompt"]))
        if prior:
            self.log("train/prior", prior[0].detach(), batch_size=len(batch["prompt"]))
            loss = loss + float(self.prior_config["weight"]) * prior[0]
        self.log("train/loss", loss, batch_size=len(batch["prompt"]))
        return loss

    # ----- sampling -------------------------------------------------------------------------------
    def sampling_prompt(self, template: str, class_word: str) -> str:
        """'{}' is the concept: 'V* <macro class>'."""
        return fill_template(template, self.concept)

    @contextlib.contextmanager
    def sampling_setting(self, prompts: Sequence[str] | None = None, lag: bool | None = None,
                         strength: float | None = None, **setting) -> Iterator[AttentionHub | None]:
        """lag: sample with LAG (needs the prompts); strength: the residual's scale (module.sampling's defaults)."""
        lag = self.sampling_defaults["lag"] if lag is None else lag
        strength = self.sampling_defaults["strength"] if strength is None else strength
        with super().sampling_setting(**setting), \
                self.sampler.applied(prompts or [], lag=bool(lag), strength=float(strength)) as hub:
            yield hub

    # ----- artifacts ------------------------------------------------------------------------------
    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        weights = save_lora(out / LORA_FILE, self.backbone.unet, sdxl=self.backbone.is_sdxl, adapter_name=ADAPTER)
        meta = {"method": "residuals", **self.backbone_identity(), "step": self.global_step}
        embeds = self.tokens.save(out / EMBEDDINGS_FILE, sdxl=self.backbone.is_sdxl, metadata=meta)
        info = out / INFO_FILE
        write_json(info, {**meta, "file": LORA_FILE, "embeddings": EMBEDDINGS_FILE, "adapter_name": ADAPTER,
                          "token": self.tokens.token, "class_word": self.class_word, "targets": self.targets,
                          "init": self.init, "ranks": self.ranks, "parameters": self.residual_parameter_count(),
                          "token_trained": bool(self.token_config.get("train"))})
        log.info("wrote %s (%d residual parameters), %s and %s", weights, self.residual_parameter_count(), embeds, info)
        return [weights, embeds, info]

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if self.tokens is not None:
            self.tokens.write_back()  # plain sampling after training reads V*'s row
