"""Concept tokens and latent masks learned jointly, EM-style (paper 001), with Break-a-Scene's baselines.

Each scene (datamodules/scenes.py) illustrates a few concepts, each with its own token. Training
runs in stages by step:

  inversion  [0, I)          optional warm start: unmasked textual inversion of a scene's tokens
  em         [I, I + E)      M-step: tokens under the current masks, eq. (3) + lambda * eq. (4);
                             E-step every `em.every` steps: masks from the tokens' cross-attention
                             (the paper) or, with em.estimate=denoising, from their denoising errors
  joint      [I + E, end)    tokens + UNet weights (full or LoRA) under fixed masks (Break-a-Scene's
                             second phase, lr 2e-6)

A mask is a token's cross-attention (16x16 layers, down and up blocks) averaged over `timesteps`
random timesteps, scaled to [0, 1], thresholded, and refined by DenseCRF against the image
(diffusion/masks.py, CutLER's settings and IoU rule). `masks` chooses the variant:
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
import torch.nn.functional as F

from datamodules.image_set import save_mask
from datamodules.prior import PriorImages
from datamodules.prompts import fill_template
from datamodules.scenes import concept_tokens
from diffusion.attention import AttentionStore
from diffusion.backbone import Backbone
from diffusion.lora import add_lora, save_lora
from diffusion.masks import CRFSettings, mask_iou, refine_mask, upsample
from diffusion.tokens import PlaceholderTokens
from lightning_modules.base import DiffusionModule
from utils.errors import ConfigError
from utils.io import atomic_dir, write_json

log = logging.getLogger(__name__)
VARIANTS = ("em", "fixed", "ground_truth")
WEIGHTS = ("full", "lora", "none")
ATTENTION_LOSSES = ("paper", "break_a_scene")
ASSIGNMENTS = ("threshold", "argmax")
ESTIMATES = ("attention", "denoising")
CONTRASTS = ("leave_one_out", "alone")


def downsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A binary [H, W] mask -> [size, size] in {0, 1}: a cell is in when at least half of it is."""
    return (F.adaptive_avg_pool2d(mask[None, None].float(), size)[0, 0] >= 0.5).float()


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """eq. (3): ||eps * M - eps_theta * M||^2 with M the union of the prompt's concept masks [B, 1, h, w],
    averaged over all latent elements (Break-a-Scene: not divided by the mask's area)."""
    return F.mse_loss(pred.float() * mask, target.float() * mask)


def cross_attention_loss(maps: torch.Tensor, masks: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """eq. (4): ||C_attn(z_t, y_i) - M_i||^2 for each concept token i; maps and masks [B, n, h, w].
    paper: the maps as they are, averaged over tokens; break_a_scene (its code): each map divided by
    its maximum, the per-token errors summed."""
    if form == "break_a_scene":
        maps = maps / maps.flatten(2).amax(-1).clamp(min=1e-8)[..., None, None]
        return F.mse_loss(maps.float(), masks.float(), reduction="none").mean((0, 2, 3)).sum()
    return F.mse_loss(maps.float(), masks.float())


class EMMaskModule(DiffusionModule):
    def __init__(self, backbone: dict, optimizer: Callable, concepts: list[str] | None = None,
                 lr_scheduler: Callable | None = None, masks: str = "em", initializer: str | None = None,
                 prompt: str = "a photo of {}", joiner: str = " and ", inversion_steps: int = 0,
                 em: dict | None = None, losses: dict | None = None, joint: dict | None = None,
                 crf: dict | None = None, out_dir: str | None = None, seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        if masks not in VARIANTS:
            raise ConfigError(f"module.masks={masks!r} is unknown; use one of {VARIANTS}")
        self.variant = masks
        self.concepts = list(concepts or [])  # filled from the data module when empty
        self.initializer = initializer
        self.prompt, self.joiner = prompt, joiner
        if "{}" not in prompt:
            raise ConfigError(f"module.prompt={prompt!r} needs '{{}}' where the concept tokens go")
        self.inversion_steps = int(inversion_steps)
        # ~400 EM steps (Sec. 3); 50 timesteps for the initial masks (Sec. 3, Fig. 2); resolution 16 (Break-a-Scene)
        self.em = {"steps": 400, "every": 50, "timesteps": 50, "update_timesteps": 50, "threshold": 0.5,
                   "attention_resolution": 16, "chunk": 10, "refine": True, "assignment": "threshold",
                   "background": "attention", "estimate": "attention", "contrast": "leave_one_out",
                   "denoising_timesteps": [0, 1000], **(em or {})}
        if self.em["background"] not in ("attention", "complement"):
            raise ConfigError(f"module.em.background={self.em['background']!r} is unknown; use attention or complement")
        if self.em["assignment"] not in ASSIGNMENTS:
            raise ConfigError(f"module.em.assignment={self.em['assignment']!r} is unknown; use one of {ASSIGNMENTS}")
        if self.em["estimate"] not in ESTIMATES:
            raise ConfigError(f"module.em.estimate={self.em['estimate']!r} is unknown; use one of {ESTIMATES}")
        if self.em["contrast"] not in CONTRASTS:
            raise ConfigError(f"module.em.contrast={self.em['contrast']!r} is unknown; use one of {CONTRASTS}")
        # lambda_attn 1e-2: Break-a-Scene's code (the paper gives no weight); eq. (4)'s form: see cross_attention_loss
        self.losses = {"attention_weight": 1e-2, "attention": "paper", **(losses or {})}
        if self.losses["attention"] not in ATTENTION_LOSSES:
            raise ConfigError(f"module.losses.attention={self.losses['attention']!r} is unknown; use one of "
                              f"{ATTENTION_LOSSES}")
        # Break-a-Scene's second phase: 400 steps at lr 2e-6 (tokens and weights), masks fixed
        # prior preservation needs class images (Break-a-Scene's are sampled from the model): off without a folder
        self.joint = {"steps": 400, "weights": "full", "lr": 2e-6, "token_lr": 2e-6, "lora_rank": 16,
                      "lora_alpha": 16, **(joint or {})}
        self.joint["prior"] = {"images_dir": None, "prompt": "a photo", "weight": 1.0, **(self.joint.get("prior") or {})}
        if self.joint["weights"] not in WEIGHTS:
            raise ConfigError(f"module.joint.weights={self.joint['weights']!r} is unknown; use one of {WEIGHTS}")
        self.crf = CRFSettings(**(crf or {}))
        self.out_dir = Path(out_dir) if out_dir else None
        self.save_hyperparameters({"backbone": self.backbone_config, "concepts": self.concepts, "masks": masks,
                                   "em": self.em, "losses": self.losses, "joint": self.joint, "seed": seed},
                                  logger=False)
        self.tokens = torch.nn.ModuleList()
        self.weight_params: list[torch.nn.Parameter] = []
        self.scene_masks: list[dict[str, torch.Tensor]] | None = None  # per scene: token -> bool [H, W]
        self.round = 0
        self.iou_log: list[dict] = []
        self.in_joint = False
        self.scene_set = None  # datamodules.scenes.SceneSet: the data module's, unless set directly
        self.prior: PriorImages | None = None

    # ----- model ----------------------------------------------------------------------------------
    @property
    def em_start(self) -> int:
        return self.inversion_steps

    @property
    def joint_start(self) -> int:
        return self.inversion_steps + int(self.em["steps"])

    def stage(self, step: int) -> str:
        return "inversion" if step < self.em_start else "em" if step < self.joint_start else "joint"

    @property
    def joint_weights(self) -> str:
        """What the joint stage trains besides the tokens: full | lora | none (also when it has no steps)."""
        return self.joint["weights"] if int(self.joint["steps"]) > 0 else "none"

    def compute_dtype(self) -> torch.dtype:
        """fp32 weights when the joint stage fine-tunes the whole UNet (lr 2e-6 updates vanish in bf16;
        autocast still computes in bf16), else the trainer's precision."""
        if self.joint_weights == "full":
            return torch.float32
        return super().compute_dtype()

    def build(self, backbone: Backbone) -> None:
        if not self.concepts and self.scenes() is not None:
            self.concepts = concept_tokens(self.scenes().records)
        if not self.concepts:
            raise ConfigError("module.concepts is empty and no scenes name any; list the concept tokens")
        for k, token in enumerate(self.concepts):
            self.tokens.append(PlaceholderTokens(backbone, token, initializer=self.initializer, init_seed=k))
        weights = self.joint_weights
        if weights == "full":
            self.weight_params = list(backbone.unet.parameters())  # fp32 (compute_dtype)
        elif weights == "lora":
            self.weight_params = add_lora(backbone.unet, int(self.joint["lora_rank"]), float(self.joint["lora_alpha"]),
                                          ["to_q", "to_k", "to_v", "to_out.0"], adapter_name="em_joint")
        for p in self.weight_params:
            p.requires_grad_(False)  # trained from the joint stage on
        prior = self.joint["prior"]
        if prior["images_dir"] and weights != "none":
            self.prior = PriorImages(prior["images_dir"], prior["prompt"], backbone.resolution,
                                     key="module.joint.prior.images_dir")

    def token_id(self, token: str) -> int:
        return int(self.tokens[self.concepts.index(token)].rows[0].token_ids[0])

    def configure_optimizers(self):
        token_params = [p for t in self.tokens for p in t.parameters()]
        groups = [{"params": token_params}]
        if self.weight_params:
            groups.append({"params": self.weight_params, "lr": float(self.joint["lr"])})
        optimizer = self.optimizer_factory(params=groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer=optimizer), "interval": "step"}}

    def enter_joint_stage(self) -> None:
        """Weights start training; the token rows slow to the joint learning rate."""
        for p in self.weight_params:
            p.requires_grad_(True)
        groups = self.trainer.optimizers[0].param_groups
        groups[0]["lr"] = float(self.joint["token_lr"])
        if len(groups) > 1:
            groups[1]["lr"] = float(self.joint["lr"])
        self.in_joint = True
        log.info("joint stage from step %d: tokens + %s weights, masks fixed", self.global_step, self.joint["weights"])

    # ----- prompts and scenes ---------------------------------------------------------------------
    def concept_prompt(self, tokens: list[str]) -> str:
        return self.prompt.replace("{}", self.joiner.join(tokens))

    def token_positions(self, prompt: str, tokens: list[str]) -> list[int]:
        ids = self.backbone.tokenize([prompt])[0].tolist()
        return [ids.index(self.token_id(t)) for t in tokens]

    def scenes(self):
        if self.scene_set is None and self._trainer is not None:
            self.scene_set = getattr(self.trainer.datamodule, "scenes", None)
        return self.scene_set

    def is_global_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    # ----- the E-step: masks from cross-attention or from denoising errors ------------------------
    @torch.no_grad()
    def attention_maps(self, image: torch.Tensor, tokens: list[str], num_timesteps: int,
                       g: torch.Generator) -> torch.Tensor:
        """Each token's cross-attention [n, h, w] over the image noised at `num_timesteps` random
        timesteps (conditional branch, the 16x16 layers of down and up blocks, heads averaged)."""
        backbone, res = self.backbone, int(self.em["attention_resolution"])
        prompt = self.concept_prompt(tokens)
        store = AttentionStore(cross=True, blocks=("down", "up"), resolutions=[res],
                               token_indices=self.token_positions(prompt, tokens), average_steps=True)
        latents = backbone.encode_images(image[None].to(self.device), generator=g)
        t = torch.randint(0, backbone.num_train_timesteps, (num_timesteps,), generator=g, device=self.device)
        cond = backbone.encode_prompt([prompt])
        total = None
        for chunk in t.split(int(self.em["chunk"])):
            noise = torch.randn((len(chunk), *latents.shape[1:]), generator=g, device=self.device)
            noisy = backbone.add_noise(latents.expand(len(chunk), -1, -1, -1).float(), noise, chunk)
            store.reset()
            with self.attention_hub().using(store):
                backbone.predict(noisy, chunk, cond.expand(len(chunk)))
            maps = store.average(resolution=res).float().sum(0)  # [h, w, n], summed over this chunk's timesteps
            total = maps if total is None else total + maps
        return (total / num_timesteps).permute(2, 0, 1)

    @torch.no_grad()
    def denoising_scores(self, image: torch.Tensor, tokens: list[str], num_timesteps: int,
                         g: torch.Generator) -> torch.Tensor:
        """Each token's share of the denoising likelihood [n, h, w] (the EM's own E-step): per latent pixel,
        how much lower the denoising error (eq. 3 unmasked, channels averaged) is with the token named than
        without, averaged over `num_timesteps` timesteps drawn from em.denoising_timesteps with noises
        shared by all prompts. em.contrast: leave_one_out compares all the scene's tokens with all but this
        one; alone compares the prompt naming only this token with the empty prompt."""
        backbone = self.backbone
        if self.em["contrast"] == "alone":
            pairs = [((), (t,)) for t in tokens]
        else:
            pairs = [(tuple(o for o in tokens if o != t), tuple(tokens)) for t in tokens]
        sets = list(dict.fromkeys(s for pair in pairs for s in pair))
        conds = [backbone.encode_prompt([self.concept_prompt(list(s)) if s else ""]) for s in sets]
        latents = backbone.encode_images(image[None].to(self.device), generator=g).float()
        low, high = (int(v) for v in self.em["denoising_timesteps"])
        t = torch.randint(low, high, (num_timesteps,), generator=g, device=self.device)
        errors = torch.zeros(len(sets), *latents.shape[-2:], device=self.device)
        for chunk in t.split(int(self.em["chunk"])):
            noise = torch.randn((len(chunk), *latents.shape[1:]), generator=g, device=self.device)
            clean = latents.expand(len(chunk), -1, -1, -1)
            noisy, target = backbone.add_noise(clean, noise, chunk), backbone.training_target(clean, noise, chunk)
            for k, cond in enumerate(conds):
                pred = backbone.predict(noisy, chunk, cond.expand(len(chunk)))
                errors[k] += (pred.float() - target.float()).pow(2).mean(1).sum(0)
        errors /= num_timesteps
        return torch.stack([errors[sets.index(without)] - errors[sets.index(named)] for without, named in pairs])

    def estimate_masks(self, index: int, num_timesteps: int, estimate: str = "attention") -> dict[str, torch.Tensor]:
        """The scene's masks, bool [H, W]. From attention (`estimate`): each map scaled to [0, 1] (min to max)
        and thresholded at em.threshold (the paper), or each pixel given to the concept whose scaled map is
        highest (em.assignment=argmax). From denoising scores (one unit for all concepts): each pixel to the
        concept that explains it best (the hard E-step). Then refined by DenseCRF, dropped when CutLER's IoU
        rule says so. With em.background=complement the background concept gets what no other concept covers."""
        scenes = self.scenes()
        tokens = list(scenes.records[index].concepts)
        image = scenes.images[index]
        g = torch.Generator(self.device).manual_seed(self.seed * 7919 + self.round * 131 + index)
        estimator = self.denoising_scores if estimate == "denoising" else self.attention_maps
        maps = estimator(image, tokens, num_timesteps, g).cpu()
        low, high = maps.flatten(1).amin(1)[:, None, None], maps.flatten(1).amax(1)[:, None, None]
        scaled = (maps - low) / (high - low).clamp(min=1e-12)  # a new token's map is nearly flat: stretch it
        if estimate == "denoising":
            binaries = F.one_hot(maps.argmax(0), len(tokens)).permute(2, 0, 1).float()
        elif self.em["assignment"] == "argmax":
            binaries = F.one_hot(scaled.argmax(0), len(tokens)).permute(2, 0, 1).float()
        else:
            binaries = (scaled >= float(self.em["threshold"])).float()
        out = {}
        for token, binary in zip(tokens, binaries):
            if self.em["refine"]:
                out[token], _ = refine_mask((image + 1) / 2, binary, self.crf)
            else:
                out[token] = upsample(binary, tuple(image.shape[-2:])) >= 0.5
        background = scenes.records[index].background
        if self.em["background"] == "complement" and background is not None and len(tokens) > 1:
            out[background] = ~torch.stack([m for t, m in out.items() if t != background]).any(0)
        return out

    def mask_round(self) -> None:
        """Estimate every scene's masks from the current tokens; adopt them when the variant says so;
        write them as PNGs and log their IoU with the ground truth. The initial masks always come from
        attention (Sec. 3: new tokens explain nothing yet); re-estimations use em.estimate."""
        scenes = self.scenes()
        first = self.scene_masks is None
        num_timesteps = int(self.em["timesteps"] if first else self.em["update_timesteps"])
        estimate = "attention" if first else self.em["estimate"]
        estimated = [self.estimate_masks(i, num_timesteps, estimate) for i in range(len(scenes))]
        if first:
            if self.variant == "ground_truth":
                missing = [(r.image.name, t) for r, m in zip(scenes.records, scenes.masks) for t in r.concepts
                           if t not in m]
                if missing:
                    raise ConfigError(f"module.masks=ground_truth: scene {missing[0][0]} has no mask for "
                                      f"{missing[0][1]}; add it to scenes.json or use masks=em")
                self.scene_masks = [{t: m > 0.5 for t, m in masks.items()} for masks in scenes.masks]
            else:
                self.scene_masks = estimated
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
                name = f"{record.image.stem}_{token.strip('<>')}.png"
                save_mask(mask, folder / name)

    def log_iou(self, estimated: list[dict[str, torch.Tensor]]) -> None:
        """IoU with the ground truth, per token type: of the masks estimated this round from the tokens,
        and of the masks training uses (the same for em; the first or the true ones otherwise)."""
        scenes = self.scenes()
        means: dict[str, list[float]] = {}
        for kind, sets in (("estimated", estimated), ("used", self.scene_masks)):
            for record, truth, masks in zip(scenes.records, scenes.masks, sets):
                for token, mask in masks.items():
                    if token not in truth:
                        continue
                    iou = mask_iou(mask, truth[token] > 0.5)
                    role = "background" if token == record.background else "subject"
                    means.setdefault(f"{kind}_{role}", []).append(iou)
                    self.iou_log.append({"round": self.round, "step": self.global_step, "kind": kind,
                                         "scene": record.image.stem, "token": token, "role": role, "iou": iou,
                                         "area": float(mask.float().mean())})  # 1.0: a whole-image mask
        for key, values in means.items():
            mean = sum(values) / len(values)
            if self._trainer is not None:
                self.log(f"masks/iou_{key}", mean, batch_size=1)
            log.info("mask round %d (step %d): %s IoU %.3f", self.round, self.global_step, key.replace("_", " "), mean)
        if self.out_dir is not None and self.iou_log and self.is_global_zero():
            write_json(self.out_dir / "masks" / "iou.json", self.iou_log)

    # ----- the M-step and the joint stage ---------------------------------------------------------
    def draw_subset(self, tokens: list[str], g: torch.Generator) -> list[str]:
        """A random non-empty subset, in the scene's order (Break-a-Scene)."""
        k = int(torch.randint(1, len(tokens) + 1, (1,), generator=g, device=g.device))
        chosen = torch.randperm(len(tokens), generator=g, device=g.device)[:k].sort().values.tolist()
        return [tokens[i] for i in chosen]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step = self.global_step
        stage = self.stage(step)
        if stage != "inversion" and (self.scene_masks is None or
                                     (stage == "em" and step > self.em_start
                                      and (step - self.em_start) % int(self.em["every"]) == 0)):
            self.mask_round()
        if stage == "joint" and not self.in_joint:  # also when a run resumes inside the joint stage
            self.enter_joint_stage()
        index, flip = int(batch["index"][0]), bool(batch["flip"][0])
        record = self.scenes().records[index]
        if stage == "inversion":  # the unmasked warm start: the whole image under all its concepts
            loss = self.diffusion_loss(batch["pixel_values"], [self.concept_prompt(list(record.concepts))])
            parts = {"diffusion": loss.detach()}
        else:  # the subset's stream is offset 1; offset 0 draws the noise
            tokens = self.draw_subset(list(record.concepts), self.step_generator(offset=1))
            loss, parts = self.concept_loss(batch["pixel_values"], tokens, index, flip)
        if stage == "joint" and self.prior is not None:  # prior preservation (Break-a-Scene's second phase)
            pixels, prompts = self.prior.draw(len(batch["index"]), self.step_generator(offset=2), self.device)
            prior = self.diffusion_loss(pixels, prompts, self.step_generator(offset=3))
            parts["prior"] = prior.detach()
            loss = loss + float(self.joint["prior"]["weight"]) * prior
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
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
        res = int(self.em["attention_resolution"])
        store = AttentionStore(cross=True, blocks=("down", "up"), resolutions=[res],
                               token_indices=self.token_positions(prompt, tokens), with_grad=True)
        with self.attention_hub().using(store):
            pred = backbone.predict(backbone.add_noise(latents, noise, t), t, cond)
        masks = torch.stack([self.scene_masks[index][tok] for tok in tokens]).to(self.device)  # [n, H, W]
        if flip:
            masks = masks.flip(-1)
        h, w = latents.shape[-2:]
        union = downsample_mask(masks.any(0), h)[None, None]
        mask_loss = masked_diffusion_loss(pred, target, union)
        maps = store.average(resolution=res).permute(0, 3, 1, 2)  # [1, n, h, w]
        small = torch.stack([downsample_mask(m, res) for m in masks])[None]
        attn_loss = cross_attention_loss(maps, small, self.losses["attention"])
        loss = mask_loss + float(self.losses["attention_weight"]) * attn_loss
        return loss, {"mask": mask_loss.detach(), "attention": attn_loss.detach()}

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
        written = []
        for token in self.tokens:
            written.append(token.save(out / "tokens" / f"{token.token.strip('<>')}.safetensors",
                                      sdxl=self.backbone.is_sdxl, metadata={"method": "em_mask"}))
        weights = None
        if self.weight_params and self.global_step > self.joint_start:
            if self.joint["weights"] == "lora":
                weights = save_lora(out / "pytorch_lora_weights.safetensors", self.backbone.unet,
                                    sdxl=self.backbone.is_sdxl, adapter_name="em_joint")
            else:
                weights = self.save_unet(out / "unet")
            written.append(weights)
        info = out / "concepts.json"
        write_json(info, {"method": "em_mask", "masks": self.variant, "step": self.global_step,
                          **self.backbone_identity(), "concepts": self.concepts,
                          "tokens": {t.token: f"tokens/{t.token.strip('<>')}.safetensors" for t in self.tokens},
                          "weights": None if weights is None else weights.name, "mask_rounds": self.round})
        log.info("wrote %d concept tokens%s to %s", len(self.tokens), " and weights" if weights else "", out)
        return [*written, info]

    def save_unet(self, path: Path) -> Path:
        """The fine-tuned UNet as a diffusers folder, written beside and renamed into place."""
        with atomic_dir(path) as staging:
            self.backbone.unet.save_pretrained(staging)
        return path

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        for token in self.tokens:
            token.write_back()  # plain sampling after training reads the learnt rows
