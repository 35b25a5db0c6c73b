"""Train a small text-to-image latent diffusion model from scratch (the shapes-world backbones).

Stage 1 (steps < vae_steps) trains the autoencoder: L1 reconstruction + a small KL term.
Stage 2 freezes it, sets the latent scaling factor to 1 / std of the latents, and trains the UNet
and the CLIP text encoder with the epsilon-prediction loss, dropping the caption for `uncond_p` of
the samples (classifier-free guidance). An exponential moving average of the UNet and text
encoder is what gets exported, as a diffusers StableDiffusionPipeline folder.

`init_from` starts from an existing pipeline folder and reuses its tokenizer, text encoder and
autoencoder (the text encoder frozen when `train_text_encoder` is false): a second UNet on the same
text encoder (shapes_b), the stand-in for models that share CLIP (SDXL and SD1.5). `unet_from`
names a pipeline folder whose UNet training continues from (an exported model, trained further).
With `init_from`, `decoder_steps` > 0 first fine-tunes the autoencoder's decoder alone: the encoder
stays frozen, so the latents, their scaling factor and every UNet trained on them stay valid;
`object_weight` weighs the objects' pixels up in its L1 (a badge's small inner emblem is what blurs).
`vae_from` takes the autoencoder from another pipeline folder (such a decoder fine-tuning's export).
A vocabulary word the `init_from` tokenizer lacks gets a new token; the rows of known tokens are kept.

`attention_weight` > 0 adds TokenCompose's token loss (Wang et al. 2024, eq. 2) on the UNet's
cross-attention at `attention_resolutions`: for every caption word that names an object or the
background (the batch's `token_roles`), (1 - its attention mass inside that region / its total mass)^2,
averaged over words and layers. It makes the model's words attend where their objects are, which the
attention-based methods (EM masks, LAG, prompt-to-prompt) rely on. `pixel_weight` > 0 adds its pixel loss
(eq. 3): the token loss alone lets a word's map peak in a few cells of its region, which a threshold on the
map (EM's masks, LAG's median split) cannot turn into the region.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from diffusion.attention import AttentionHub, AttentionStore
from diffusion.schedules import SD_BETAS, SD_DDIM
from diffusion.clip_tokenizer import CaptionIds, extend_vocabulary, write_clip_tokenizer
from diffusion.losses import region_masks, token_attention_loss, token_pixel_loss
from utils.errors import ConfigError
from utils.io import atomic_dir

log = logging.getLogger(__name__)


def _schedule(start: int, warmup: int, total: int):
    """0 before `start`, linear warm-up, then cosine decay to 10% at `total`."""
    def factor(step: int) -> float:
        if step < start:
            return 0.0
        s = step - start
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - start - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class PretrainModule(L.LightningModule):
    def __init__(self, unet: dict, text_encoder: dict, vae: dict, words: list[str], total_steps: int,
                 vae_steps: int = 3000, lr_vae: float = 4e-4, lr_unet: float = 3e-4, warmup: int = 500,
                 weight_decay: float = 0.01, uncond_p: float = 0.1, kl_weight: float = 1e-6, ema_decay: float = 0.999,
                 init_from: str | None = None, unet_from: str | None = None, train_text_encoder: bool = True,
                 decoder_steps: int = 0, object_weight: float = 0.0, vae_from: str | None = None,
                 attention_weight: float = 0.0, attention_resolutions: tuple[int, ...] = (16, 8),
                 pixel_weight: float = 0.0, pixel_resolutions: tuple[int, ...] | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if init_from is None and vae_steps <= 0:
            raise ConfigError("module.vae_steps must be > 0 unless module.init_from gives a trained autoencoder")
        if decoder_steps > 0 and init_from is None:
            raise ConfigError("module.decoder_steps fine-tunes a trained autoencoder's decoder; set module.init_from "
                              "to a pipeline folder (from scratch, module.vae_steps trains the whole autoencoder)")
        for key, folder, part in (("unet_from", unet_from, "unet"), ("vae_from", vae_from, "vae")):
            if folder is not None and not (Path(folder) / part).is_dir():
                raise ConfigError(f"module.{key}={folder} has no {part}/ folder; give an exported pipeline")
        if vae_from is not None and init_from is None:
            raise ConfigError("module.vae_from replaces the autoencoder of module.init_from; set module.init_from too")
        if min(attention_weight, pixel_weight, object_weight) < 0:
            raise ConfigError("module.attention_weight, module.pixel_weight and module.object_weight must be >= 0")
        if pixel_resolutions is not None and not set(pixel_resolutions) <= set(attention_resolutions):
            raise ConfigError(f"module.pixel_resolutions={list(pixel_resolutions)} must be among "
                              f"module.attention_resolutions={list(attention_resolutions)}")
        self.built = False

    # ----- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.built:
            return
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        hp = self.hparams
        torch.manual_seed(hp.seed)
        if hp.init_from:
            base = Path(hp.init_from)
            if not (base / "text_encoder").is_dir():
                raise ConfigError(f"module.init_from={base} is not a pipeline folder; train the first model first")
            self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32)
            if any(len(self.tokenizer(w, add_special_tokens=False).input_ids) != 1 for w in hp.words):
                self.tokenizer = extend_vocabulary(self.tokenizer, self.text_encoder, hp.words)
                log.info("vocabulary extended to %d tokens", len(self.tokenizer))
            vae_base = Path(hp.vae_from or base)
            self.vae = AutoencoderKL.from_pretrained(vae_base, subfolder="vae", torch_dtype=torch.float32)
            self.vae.requires_grad_(False)
            if hp.decoder_steps > 0:
                self.vae.decoder.requires_grad_(True)
                self.vae.post_quant_conv.requires_grad_(True)
            if not hp.train_text_encoder:
                self.text_encoder.requires_grad_(False)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(hp.words, tmp))
            ids = dict(bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                       pad_token_id=self.tokenizer.pad_token_id, vocab_size=len(self.tokenizer))
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **hp.text_encoder))
            self.vae = AutoencoderKL(**hp.vae)
        if hp.unet_from:
            self.unet = UNet2DConditionModel.from_pretrained(hp.unet_from, subfolder="unet", torch_dtype=torch.float32)
        else:
            self.unet = UNet2DConditionModel(**hp.unet)
        self.ema = {name: copy.deepcopy(getattr(self, name)).requires_grad_(False).eval()
                    for name in ("unet", "text_encoder")}
        self.noise_scheduler = DDPMScheduler(**SD_BETAS, num_train_timesteps=1000)
        self.caption_ids = CaptionIds(self.tokenizer, hp.words)
        self.attention_store = None
        if hp.attention_weight > 0 or hp.pixel_weight > 0:  # after the EMA copy: the exported UNet keeps diffusers' processors
            self.attention_store = AttentionStore(blocks=("down", "up"), resolutions=hp.attention_resolutions,
                                                  with_grad=True)
            self.hub = AttentionHub(self.unet, [self.attention_store])
        self.built = True

    @property
    def autoencoder_steps(self) -> int:
        """Length of the first stage: the whole autoencoder from scratch, or its decoder (init_from)."""
        return self.hparams.vae_steps if self.hparams.init_from is None else self.hparams.decoder_steps

    @property
    def in_vae_stage(self) -> bool:
        return self.global_step < self.autoencoder_steps

    # ----- losses ----------------------------------------------------------------------------------
    def vae_loss(self, pixels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        decoder_only = self.hparams.init_from is not None
        with torch.set_grad_enabled(not decoder_only):
            posterior = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        error = (recon.float() - pixels.float()).abs()
        rec = error.mean()
        if decoder_only:
            self.log("vae/l1", rec)
            if self.hparams.object_weight > 0 and masks is not None:
                objects = masks.sum(1, keepdim=True).clamp(max=1)
                return (error * (1 + self.hparams.object_weight * objects)).mean()
            return rec
        kl = posterior.kl().mean()
        self.log_dict({"vae/l1": rec, "vae/kl": kl})
        return rec + self.hparams.kl_weight * kl

    def diffusion_loss(self, pixels: torch.Tensor, prompts: list[str], masks: torch.Tensor | None = None,
                       roles: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        drop = torch.rand(len(prompts)) < self.hparams.uncond_p
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = self.caption_ids(prompts).to(self.device, non_blocking=True)
        text = self.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        self.log("train/loss", loss)
        if self.attention_store is not None:
            # a dropped caption names nothing; an asynchronous copy: a blocking one would wait for the GPU's queue
            roles = roles.masked_fill(drop.to(roles.device, non_blocking=True)[:, None], -1)
            token, pixel = self.attention_loss(masks, roles)
            loss = loss + self.hparams.attention_weight * token + self.hparams.pixel_weight * pixel
        return loss

    def attention_loss(self, masks: torch.Tensor, roles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TokenCompose's token loss averaged over the recorded layers, and its pixel loss on each of
        `pixel_resolutions`' layer-averaged maps, averaged over them (the store is emptied)."""
        losses, shares, by_size = [], [], {}
        for place, maps in self.attention_store.select():
            regions = region_masks(masks, self.attention_store.hw[place])
            loss, share = token_attention_loss(maps, regions, roles)
            losses.append(loss)
            shares.append(share)
            by_size.setdefault(self.attention_store.hw[place], (regions, []))[1].append(maps)
        self.attention_store.reset()
        token = torch.stack(losses).mean()
        pixel = token.new_zeros(())
        if self.hparams.pixel_weight > 0:
            sides = self.hparams.pixel_resolutions or self.hparams.attention_resolutions
            pixel = torch.stack([token_pixel_loss(torch.stack(maps).mean(0), regions, roles)
                                 for hw, (regions, maps) in by_size.items() if hw[0] in sides]).mean()
        self.log_dict({"train/attention": token, "train/attention_share": torch.stack(shares).mean(),
                       "train/attention_pixel": pixel})
        return token, pixel

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.in_vae_stage:
            return self.vae_loss(batch["pixel_values"], batch.get("masks"))
        if self.global_step == self.autoencoder_steps > 0:
            if self.hparams.init_from is None:
                self.set_latent_scale(batch["pixel_values"])
            else:
                self.vae.requires_grad_(False)
        return self.diffusion_loss(batch["pixel_values"], batch["prompt"], batch.get("masks"), batch.get("token_roles"))

    @torch.no_grad()
    def set_latent_scale(self, pixels: torch.Tensor) -> None:
        """Freeze the autoencoder and scale latents to unit variance (SD's 0.18215, measured here)."""
        self.vae.requires_grad_(False)
        std = self.vae.encode(pixels).latent_dist.sample().float().std()
        std = self.trainer.strategy.reduce(std, reduce_op="mean")
        self.vae.register_to_config(scaling_factor=float(1.0 / std))
        log.info("autoencoder frozen; latent scaling factor %.4f", self.vae.config.scaling_factor)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.in_vae_stage:
            return
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        for name, shadow in self.ema.items():
            live = [p.detach() for p in getattr(self, name).parameters()]
            torch._foreach_lerp_(list(shadow.parameters()), live, 1 - decay)

    def on_fit_start(self) -> None:
        for shadow in self.ema.values():
            shadow.to(self.device)

    # ----- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        vae_params = [p for p in self.vae.parameters() if p.requires_grad]
        model_params = [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]
        groups = [{"params": model_params, "lr": hp.lr_unet}]
        start = self.autoencoder_steps
        lambdas = [_schedule(start, hp.warmup, hp.total_steps)]
        if vae_params:
            groups.append({"params": vae_params, "lr": hp.lr_vae})
            stop = self.autoencoder_steps
            lambdas.append(lambda step: min(1.0, (step + 1) / 200) if step < stop else 0.0)
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay, betas=(0.9, 0.99))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints and export ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = {name: m.state_dict() for name, m in self.ema.items()}
        checkpoint["latent_scale"] = self.vae.config.scaling_factor

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        for name, state in checkpoint["ema"].items():
            self.ema[name].load_state_dict(state)
        self.vae.register_to_config(scaling_factor=checkpoint["latent_scale"])
        if checkpoint["global_step"] > self.autoencoder_steps:
            self.vae.requires_grad_(False)

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        """The EMA model as a diffusers StableDiffusionPipeline folder under out_dir/pipeline: the UNet and
        autoencoder in fp16 (diffusers loads them as fp32 unless told otherwise), the text encoder in fp32
        (transformers keeps a file's dtype, and a fp16 text encoder feeding a fp32 UNet fails on the CPU)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if self.in_vae_stage and (self.hparams.init_from is None or self.hparams.unet_from is None):
            log.warning("training stopped in the autoencoder stage before any UNet was trained: nothing to export")
            return []
        scheduler = DDIMScheduler(**SD_DDIM)
        pipe = StableDiffusionPipeline(vae=copy.deepcopy(self.vae).cpu().half(),
                                       text_encoder=copy.deepcopy(self.ema["text_encoder"]).cpu().float(),
                                       tokenizer=self.tokenizer, unet=copy.deepcopy(self.ema["unet"]).cpu().half(),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        out = Path(out_dir) / "pipeline"
        with atomic_dir(out) as staging:
            pipe.save_pretrained(staging)
            for config in staging.glob("*/config.json"):  # the folder it was loaded from is no part of the model
                data = json.loads(config.read_text())
                if data.pop("_name_or_path", None) is not None:
                    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        log.info("exported the EMA pipeline to %s", out)
        return [out]
