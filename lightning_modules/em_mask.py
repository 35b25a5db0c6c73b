"""Concept tokens and latent masks learned jointly, EM-style (paper 001), with Break-a-Scene's baselines.

Each scene (datamodules/scenes.py) illustrates a few concepts, each with its own token. Training
runs in stages by step:

  inversion  [0, I)          optional warm start: unmasked textual inversion of a scene's tokens
  em         [I, I + E)      M-step: tokens under the current masks, eq. (3) + lambda * eq. (4);
                             E-step every `em.every` steps: masks from the tokens' cross-attention
                             (the paper) or, with em.estimate=denoising, from their denoising errors
  joint      [I + E, end)    tokens + UNet weights (full or LoRA) under fixed masks (Break-a-Scene's
                             second phase, lr 2e-6)

The E-step's masks and the settings' checks are diffusion/concept_masks.py's. `masks` chooses the variant:
  em            the paper: masks re-estimated from the updated tokens during the em stage
  fixed         the initial masks, never updated (the paper's "baseline method")
  ground_truth  the scenes' own masks (Break-a-Scene; the paper's upper bound)
Every variant estimates masks at each round, so mask IoU against ground truth (when the scenes have
it) is logged per token type over rounds for all three (the paper's Fig. 3).

Each step trains a random non-empty subset of one scene's concepts with the prompt
"a photo of <c0> and <c2>" (Break-a-Scene), with the union of their masks in eq. (3).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from datamodules.image_set import save_mask
from datamodules.prior import PriorImages
from datamodules.scenes import concept_tokens
from diffusion.backbone import Backbone
from diffusion.concept_masks import (VARIANTS, EMSettings, JointSettings, LossSettings, MaskEstimator, draw_subset,
                                     iou_means, iou_rows, true_masks)
from diffusion.lora import add_lora, save_lora
from diffusion.losses import cross_attention_loss, downsample_mask, masked_diffusion_loss
from diffusion.masks import CRFSettings
from diffusion.tokens import PlaceholderTokens, fill_template
from lightning_modules.base import DiffusionModule
from utils.errors import ConfigError
from utils.io import atomic_dir, write_json
from utils.settings import check_choice

log = logging.getLogger(__name__)
ROLES = ("subject", "background")  # what a concept token names in its scene


class EMMaskModule(DiffusionModule):
    def __init__(self, backbone: dict, optimizer: Callable, *, masks: str, initializer: str | dict | None, prompt: str,
                 joiner: str, inversion_steps: int, em: dict, losses: dict, joint: dict,
                 concepts: list[str] | None = None, lr_scheduler: Callable | None = None, crf: dict | None = None,
                 out_dir: str | None = None, seed: int = 0):
        """The defaults live in conf/method/em_mask.yaml; em, losses and joint become their settings classes."""
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        check_choice("module.masks", masks, VARIANTS)
        if "{}" not in prompt:
            raise ConfigError(f"module.prompt={prompt!r} needs '{{}}' where the concept tokens go")
        self.variant, self.inversion_steps = masks, int(inversion_steps)
        self.concepts = list(concepts or [])  # filled from the data module when empty
        if isinstance(initializer, dict) and not set(initializer) <= set(ROLES):
            raise ConfigError(f"module.initializer={initializer} names roles {sorted(set(initializer) - set(ROLES))}; "
                              f"give a word, null, or a word (or null) per role: {{subject: ..., background: ...}}")
        self.initializer, self.prompt, self.joiner = initializer, prompt, joiner
        self.em = EMSettings.from_config(em)
        self.losses = LossSettings.from_config(losses)
        self.joint = JointSettings.from_config(joint)
        self.crf = CRFSettings(**(crf or {}))
        self.out_dir = Path(out_dir) if out_dir else None
        self.save_hyperparameters({"backbone": self.backbone_config, "concepts": self.concepts, "masks": masks,
                                   "em": self.em.as_dict(), "losses": self.losses.as_dict(),
                                   "joint": self.joint.as_dict(), "seed": seed}, logger=False)
        self.tokens = torch.nn.ModuleList()
        self.weight_params: list[torch.nn.Parameter] = []
        self.scene_masks: list[dict[str, torch.Tensor]] | None = None  # per scene: token -> bool [H, W]
        self._masks_on_device: tuple[list | None, list[dict[str, torch.Tensor]]] = (None, [])  # (of, copies)
        self.round = 0
        self.iou_log: list[dict] = []
        self.in_joint = False
        self.scene_set = None  # datamodules.scenes.SceneSet: the data module's, unless set directly
        self.prior: PriorImages | None = None

    # ----- model ----------------------------------------------------------------------------------
    @property
    def joint_start(self) -> int:
        return self.inversion_steps + self.em.steps

    def stage(self, step: int) -> str:
        return "inversion" if step < self.inversion_steps else "em" if step < self.joint_start else "joint"

    @property
    def joint_weights(self) -> str:
        """What the joint stage trains besides the tokens: full | lora | none (also when it has no steps)."""
        return self.joint.weights if self.joint.steps > 0 else "none"

    def compute_dtype(self) -> torch.dtype:
        """fp32 weights when the joint stage fine-tunes the whole UNet (lr 2e-6 updates vanish in bf16;
        autocast still computes in bf16), else the trainer's precision."""
        return torch.float32 if self.joint_weights == "full" else super().compute_dtype()

    def build(self, backbone: Backbone) -> None:
        if not self.concepts and self.scenes() is not None:
            self.concepts = concept_tokens(self.scenes().records)
        if not self.concepts:
            raise ConfigError("module.concepts is empty and no scenes name any; list the concept tokens")
        for k, token in enumerate(self.concepts):
            self.tokens.append(PlaceholderTokens(backbone, token, initializer=self.initializer_of(token), init_seed=k))
        weights = self.joint_weights
        if weights == "full":
            self.weight_params = list(backbone.unet.parameters())  # fp32 (compute_dtype)
        elif weights == "lora":
            self.weight_params = add_lora(backbone.unet, self.joint.lora_rank, self.joint.lora_alpha,
                                          ["to_q", "to_k", "to_v", "to_out.0"], adapter_name="em_joint")
        for p in self.weight_params:
            p.requires_grad_(False)  # trained from the joint stage on
        prior = self.joint.prior
        if prior.images_dir and weights != "none":
            self.prior = PriorImages(prior.images_dir, prior.prompt, backbone.resolution,
                                     key="module.joint.prior.images_dir")

    def initializer_of(self, token: str) -> str | None:
        """The word a token starts from: module.initializer, or its entry for the token's role (a scene's
        background token, or a subject)."""
        if not isinstance(self.initializer, dict):
            return self.initializer
        scenes = self.scenes()
        backgrounds = {record.background for record in scenes.records} if scenes is not None else set()
        return self.initializer.get("background" if token in backgrounds else "subject")

    def optimizer_params(self) -> list[dict]:
        """The token rows, and the weights the joint stage switches on (at its lr)."""
        groups = [{"params": [p for t in self.tokens for p in t.parameters()]}]
        return groups + [{"params": self.weight_params, "lr": self.joint.lr}] if self.weight_params else groups

    def enter_joint_stage(self) -> None:
        """Weights start training; the token rows slow to the joint learning rate."""
        for p in self.weight_params:
            p.requires_grad_(True)
        for group, lr in zip(self.trainer.optimizers[0].param_groups, (self.joint.token_lr, self.joint.lr)):
            group["lr"] = lr
        self.in_joint = True
        log.info("joint stage from step %d: tokens + %s weights, masks fixed", self.global_step, self.joint.weights)

    # ----- prompts and scenes ---------------------------------------------------------------------
    def concept_prompt(self, tokens: list[str]) -> str:
        return self.prompt.replace("{}", self.joiner.join(tokens))

    def token_positions(self, prompt: str, tokens: list[str]) -> list[int]:
        ids = self.backbone.token_id_rows([prompt])[0].tolist()
        token_ids = [self.tokens[self.concepts.index(t)].rows[0].ids[0] for t in tokens]
        return [ids.index(i) for i in token_ids]

    def scenes(self):
        if self.scene_set is None and self._trainer is not None:
            self.scene_set = getattr(self.trainer.datamodule, "scenes", None)
        return self.scene_set

    def is_global_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    # ----- the E-step (diffusion/concept_masks.py) -----------------------------------------------------
    @property
    def estimator(self) -> MaskEstimator:
        return MaskEstimator(self.backbone, self.attention_hub, self.em, self.crf, self.concept_prompt,
                             self.token_positions)

    def estimate_masks(self, index: int, num_timesteps: int, estimate: str = "attention") -> dict[str, torch.Tensor]:
        """Scene `index`'s masks, bool [H, W], from a generator seeded by (seed, round, scene)."""
        record = self.scenes().records[index]
        g = torch.Generator(self.device).manual_seed(self.seed * 7919 + self.round * 131 + index)
        return self.estimator.estimate(self.scenes().images[index], list(record.concepts), record.background,
                                       num_timesteps, g, estimate)

    def mask_round(self) -> None:
        """Estimate every scene's masks from the current tokens; adopt them when the variant says so;
        write them as PNGs and log their IoU with the ground truth. The initial masks always come from
        attention (Sec. 3: new tokens explain nothing yet); re-estimations use em.estimate."""
        scenes = self.scenes()
        first = self.scene_masks is None
        estimate, num_timesteps = (("attention", self.em.timesteps) if first
                                   else (self.em.estimate, self.em.update_timesteps))
        estimated = [self.estimate_masks(i, num_timesteps, estimate) for i in range(len(scenes))]
        if first:
            truth = self.variant == "ground_truth"
            self.scene_masks = true_masks(scenes.records, scenes.masks) if truth else estimated
        elif self.variant == "em":
            self.scene_masks = estimated
        self.write_masks(estimated)
        self.log_iou(estimated)
        self.round += 1

    def write_masks(self, estimated: list[dict[str, torch.Tensor]]) -> None:
        if self.out_dir is None or not self.is_global_zero():
            return
        folder = self.out_dir / "masks" / f"round_{self.round:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for record, masks in zip(self.scenes().records, estimated):
            for token, mask in masks.items():
                save_mask(mask, folder / f"{record.image.stem}_{token.strip('<>')}.png")

    def log_iou(self, estimated: list[dict[str, torch.Tensor]]) -> None:
        """IoU with the ground truth, per token type: of the masks estimated this round from the tokens,
        and of the masks training uses (the same for em; the first or the true ones otherwise)."""
        scenes = self.scenes()
        rows = [{"round": self.round, "step": self.global_step, **row} for kind, sets in
                (("estimated", estimated), ("used", self.scene_masks))
                for row in iou_rows(kind, scenes.records, scenes.masks, sets)]
        self.iou_log.extend(rows)
        for key, mean in iou_means(rows).items():
            if self._trainer is not None:
                self.log(f"masks/iou_{key}", mean, batch_size=1)
            log.info("mask round %d (step %d): %s IoU %.3f", self.round, self.global_step, key.replace("_", " "), mean)
        if self.out_dir is not None and self.iou_log and self.is_global_zero():
            write_json(self.out_dir / "masks" / "iou.json", self.iou_log)

    # ----- the M-step and the joint stage ---------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step, stage = self.global_step, self.stage(self.global_step)
        if stage != "inversion" and (self.scene_masks is None or
                                     (stage == "em" and step > self.inversion_steps
                                      and (step - self.inversion_steps) % self.em.every == 0)):
            self.mask_round()
        if stage == "joint" and not self.in_joint:  # also when a run resumes inside the joint stage
            self.enter_joint_stage()
        index, flip = batch["index"][0], batch["flip"][0]  # host numbers (datamodules/stream.py's collate)
        record = self.scenes().records[index]
        if stage == "inversion":  # the unmasked warm start: the whole image under all its concepts
            loss = self.diffusion_loss(batch["pixel_values"], [self.concept_prompt(list(record.concepts))])
            parts = {"diffusion": loss.detach()}
        else:  # the subset's stream is offset 1; offset 0 draws the noise
            tokens = draw_subset(list(record.concepts), self.step_generator(offset=1, device="cpu"))
            loss, parts = self.concept_loss(batch["pixel_values"], tokens, index, flip)
        if stage == "joint" and self.prior is not None:  # prior preservation (Break-a-Scene's second phase)
            pixels, prompts = self.prior.draw(len(batch["index"]), self.step_generator(offset=2), self.device)
            prior = self.diffusion_loss(pixels, prompts, self.step_generator(offset=3))
            parts["prior"] = prior.detach()
            loss = loss + self.joint.prior.weight * prior
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=1)
        self.log("train/loss", loss, batch_size=1)
        return loss

    def concept_loss(self, pixels: torch.Tensor, tokens: list[str], index: int, flip: bool
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eq. (3) + lambda * eq. (4) for the prompt naming `tokens`."""
        backbone, g = self.backbone, self.step_generator()
        latents = backbone.encode_images(pixels, generator=g)
        noise = torch.randn(latents.shape, generator=g, device=self.device, dtype=latents.dtype)
        t = torch.randint(0, backbone.num_train_timesteps, (1,), generator=g, device=self.device)
        prompt = self.concept_prompt(tokens)
        cond = backbone.encode_prompt([prompt])
        target = backbone.training_target(latents, noise, t)
        res = self.em.attention_resolution
        store = self.estimator.attention_store(prompt, tokens, with_grad=True)
        with self.attention_hub().using(store):
            pred = backbone.predict(backbone.add_noise(latents, noise, t), t, cond)
        masks = self.training_masks(index, tokens)  # [n, H, W]
        if flip:
            masks = masks.flip(-1)
        union = downsample_mask(masks.any(0), latents.shape[-2])[None, None]
        mask_loss = masked_diffusion_loss(pred, target, union)
        maps = store.average(resolution=res).permute(0, 3, 1, 2)  # [1, n, h, w]
        small = torch.stack([downsample_mask(m, res) for m in masks])[None]
        attn_loss = cross_attention_loss(maps, small, self.losses.attention)
        loss = mask_loss + self.losses.attention_weight * attn_loss
        return loss, {"mask": mask_loss.detach(), "attention": attn_loss.detach()}

    def training_masks(self, index: int, tokens: list[str]) -> torch.Tensor:
        """Scene `index`'s masks of `tokens`, [n, H, W], from a copy of the training masks on the module's device
        made once per set of masks (a copy from the host at every step would wait for the GPU's queue)."""
        if self._masks_on_device[0] is not self.scene_masks:
            copies = [{tok: mask.to(self.device, non_blocking=True) for tok, mask in scene.items()}
                      for scene in self.scene_masks]
            self._masks_on_device = (self.scene_masks, copies)
        return torch.stack([self._masks_on_device[1][index][tok] for tok in tokens])

    # ----- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["em_masks"] = self.scene_masks
        checkpoint["em_round"] = self.round
        checkpoint["em_iou_log"] = self.iou_log

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.scene_masks = checkpoint.get("em_masks")
        self.round = int(checkpoint.get("em_round", 0))
        self.iou_log = list(checkpoint.get("em_iou_log", []))

    # ----- sampling and artifacts -----------------------------------------------------------------
    def sampling_prompt(self, template: str, class_word: str) -> str:
        """Templates name the learnt tokens themselves ("<c1> next to <c2>"); a '{}' reads the first."""
        return fill_template(template, self.concepts[0])

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        written = [token.save(out / "tokens" / f"{token.token.strip('<>')}.safetensors", sdxl=self.backbone.is_sdxl,
                              metadata={"method": "em_mask"}) for token in self.tokens]
        weights = None
        if self.weight_params and self.global_step > self.joint_start:
            if self.joint.weights == "lora":
                weights = save_lora(out / "pytorch_lora_weights.safetensors", self.backbone.unet,
                                    sdxl=self.backbone.is_sdxl, adapter_name="em_joint")
            else:  # a diffusers folder, written beside and renamed into place
                with atomic_dir(out / "unet") as staging:
                    self.backbone.unet.save_pretrained(staging)
                weights = out / "unet"
            written.append(weights)
        info = out / "concepts.json"
        write_json(info, {"method": "em_mask", "masks": self.variant, "step": self.global_step,
                          **self.backbone_identity(), "concepts": self.concepts,
                          "tokens": {t.token: f"tokens/{t.token.strip('<>')}.safetensors" for t in self.tokens},
                          "weights": None if weights is None else weights.name, "mask_rounds": self.round})
        log.info("wrote %d concept tokens%s to %s", len(self.tokens), " and weights" if weights else "", out)
        return [*written, info]

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        for token in self.tokens:
            token.write_back()  # plain sampling after training reads the learnt rows
