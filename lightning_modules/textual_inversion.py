"""Textual inversion (Gal et al., 2022): learn the embedding v* of a new token S* from a few images.

    v* = argmin_v  E_{z ~ E(x), y, eps, t} || eps - eps_theta(z_t, t, c_theta(y(S*))) ||^2

with y a template prompt ("a photo of a S*"); only the token's rows are trained (the baseline
every paper in this framework compares against). On SD3 and FLUX the token is added to every text encoder
(CLIP-L, CLIP-G, T5) and the loss is the flow-matching one (DiffusionModule.diffusion_loss).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from diffusion.backbone import Backbone
from diffusion.tokens import PlaceholderTokens, fill_template
from lightning_modules.base import DiffusionModule
from utils.io import write_json

log = logging.getLogger(__name__)
EMBEDDINGS_FILE = "learned_embeds.safetensors"


class TextualInversionModule(DiffusionModule):
    flow_backbones = True  # only the token's rows are trained, through diffusion_loss and sample

    def __init__(self, backbone: dict, token: dict, optimizer: Callable, lr_scheduler: Callable | None = None,
                 seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        self.token_config = dict(token)
        self.save_hyperparameters({"backbone": self.backbone_config, "token": self.token_config, "seed": seed},
                                  logger=False)  # train.py logs the whole config
        self.tokens: PlaceholderTokens | None = None

    def build(self, backbone: Backbone) -> None:
        cfg = self.token_config
        self.tokens = PlaceholderTokens(backbone, cfg["name"], num_vectors=cfg.get("num_vectors", 1),
                                        initializer=cfg.get("initializer"),
                                        train_existing=cfg.get("train_existing", False))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch["pixel_values"], [self.tokens.expand(p) for p in batch["prompt"]],
                                   keys=batch.get("image_key"))
        self.log("train/loss", loss, batch_size=len(batch["prompt"]))
        return loss

    def sampling_prompt(self, template: str, class_word: str) -> str:
        return self.tokens.expand(fill_template(template, self.tokens.token))

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        meta = {"method": "textual_inversion", **self.backbone_identity(), "step": self.global_step}
        # one key per text encoder on SDXL, SD3 and FLUX ({"clip_l", "clip_g", "t5"}); {token: rows} on SD1.x
        path = self.tokens.save(out / EMBEDDINGS_FILE, keys=self.backbone.embedding_keys, metadata=meta)
        info = out / "learned_embeds.json"
        write_json(info, {**meta, "token": self.tokens.token, "names": self.tokens.names,
                          "initializer": self.token_config.get("initializer"),
                          "file": EMBEDDINGS_FILE})
        log.info("wrote %s (%s)", path, ", ".join(self.tokens.names))
        return [path, info]

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if self.tokens is not None:
            self.tokens.write_back()  # leave the backbone usable for plain sampling after training
