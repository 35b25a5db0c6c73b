"""Prompt Sliders (Sridhar & Vasconcelos, 2024): a concept slider learnt as one token embedding S*.

Textual slider, eq. (5) in (4): the token, scaled by alpha ~ U[alpha_min, alpha_max], is appended to
the target prompt c_t and its prediction regressed on

    eps(alpha) = eps(z_t, c_t) + alpha * eta * sum_{p in P} (eps(z_t, c+, p) - eps(z_t, c-, p))

with the frozen model's predictions (one batched UNet call). On a rectified-flow backbone (SD3, FLUX) eq. (5) is
the same with the velocity v = noise - z_0 in place of eps, all at the same x_t (see `eq5_prediction`), and the
token lives in every text encoder (CLIP-L, CLIP-G, T5). Erasing, eq. (7), subtracts the difference and learns the
embedding of the word itself (token.train_existing). Eq. (4) draws z_t from images of the target: with no image
set, they are the frozen model's own samples of each target prompt (`pool.size` per prompt, generated when
training starts, by the backbone's own sampler), noised to t ~ U{0..T-1} (on a flow backbone: t as it trains).
Visual slider, eq. (6): image pairs A/B with the same noise and timestep, +alpha S for A, -alpha S for B.

variant=reference_code follows the authors' code instead: no alpha in training; z_t by partially
denoising noise with the current token (k ~ U{1..49} of 50 DDIM steps, guidance 3); the target at
guidance 1; at inference the strength scales the text encoder's output at the token and the token is
zeroed for t > 800.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from tqdm.auto import tqdm

from diffusion.backbone import FLOW_KINDS, Backbone, Conditioning
from diffusion.flow import FlowBackbone
from diffusion.sampling import DDIMSchedule, ddim_sample, generate, initial_noise
from diffusion.sliders import SLIDER_INFO, SliderSet, TokenSlider
from diffusion.tokens import PlaceholderTokens, fill_template
from lightning_modules.base import DiffusionModule
from utils.errors import ConfigError
from utils.io import write_json
from utils.settings import Settings

log = logging.getLogger(__name__)
EMBEDDINGS_FILE = "learned_embeds.safetensors"
MODES = ("textual", "visual")
VARIANTS = ("paper", "reference_code")


def eq5_prediction(backbone: Backbone | FlowBackbone, latents: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """What eq. (5) combines and regresses: eps on a UNet (a v-prediction converted to eps), the velocity
    v = noise - z_0 on a rectified-flow backbone. With x_t = (1 - t) z_0 + t noise, eps = x_t + (1 - t) v: the
    eq. (5) target in velocities is the eps target at the same x_t, its loss weighted by (1 - t)^2."""
    out = backbone.predict(latents, t, cond)
    return out if isinstance(backbone, FlowBackbone) else backbone.to_epsilon(out, latents, t)


def slider_target(eps_neutral: torch.Tensor, eps_positive: torch.Tensor, eps_negative: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """eq. (5) / (7): eps(c_t) + scale * (eps(c+) - eps(c-)), scale = +-alpha * eta per sample."""
    return eps_neutral + scale.view(-1, 1, 1, 1) * (eps_positive - eps_negative)


@dataclass(frozen=True)
class PoolSettings(Settings):
    """module.pool: how the latent pool samples each target prompt (conf/method/prompt_slider.yaml's values)."""

    key = "module.pool"
    size: int
    num_steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ReferenceCodeSettings(Settings):
    """module.reference_code: the authors' code's z_t and inference cut-off (variant=reference_code)."""

    key = "module.reference_code"
    denoise_steps: int
    denoise_guidance: float
    zero_above: int


class LatentPool:
    """The frozen model's samples of each target prompt (the z_0 of eq. 4 when there is no image set),
    from seeds derived from (seed, prompt): the same pool whenever and in whatever order it is made."""

    def __init__(self, size: int, num_steps: int, guidance_scale: float, seed: int):
        self.size, self.num_steps, self.guidance_scale, self.seed = size, num_steps, guidance_scale, seed
        self.latents: dict[str, torch.Tensor] = {}

    def fill(self, backbone: Backbone, prompts: list[str], resolution: int | None, progress: bool = False) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.latents]
        for prompt in tqdm(missing, desc="latent pool", disable=not progress or not missing):
            digest = int(hashlib.sha256(prompt.encode()).hexdigest()[:12], 16)
            seeds = [(self.seed * 1_000_003 + digest + i) % (2 ** 63) for i in range(self.size)]
            self.latents[prompt] = generate(backbone, [prompt] * self.size, seed=seeds, num_steps=self.num_steps,
                                            guidance_scale=self.guidance_scale, resolution=resolution, decode=False)

    def draw(self, backbone: Backbone, prompt: str, generator: torch.Generator, resolution: int | None) -> torch.Tensor:
        self.fill(backbone, [prompt], resolution)  # a prompt the data module did not announce
        pool = self.latents[prompt]
        pick = torch.randint(len(pool), (1,), generator=generator, device=generator.device)
        return pool[pick.to(pool.device)][0]  # a tensor index: no wait for the GPU


class TextCache:
    """Conditionings of prompts the frozen text encoder reads, computed once per prompt."""

    def __init__(self):
        self.cache: dict[str, Conditioning] = {}

    def __call__(self, backbone: Backbone, prompts: list[str], context=contextlib.nullcontext) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad(), context():
                cond = backbone.encode_prompt(missing)
            for k, p in enumerate(missing):
                self.cache[p] = cond.map(lambda x, k=k: x[k:k + 1])
        cached = [self.cache[p] for p in prompts]
        return Conditioning.cat(cached)


@torch.no_grad()
def denoise_partially(backbone: Backbone, cond: Conditioning, uncond: Conditioning, num_steps: int,
                      guidance_scale: float, g: torch.Generator, host: torch.Generator,
                      resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept Sliders' z_t: fresh noise (from `g`) denoised k ~ U{1..N-1} of N DDIM steps (one k per sample,
    from the CPU generator `host`: the sampling loop needs k on the host), and t_k."""
    schedule = DDIMSchedule(backbone.scheduler.config, num_steps)
    out, ts = [], []
    for i, k in enumerate(torch.randint(1, num_steps, (len(cond),), generator=host).tolist()):
        noise = initial_noise(backbone, 1, g, backbone.device, resolution)
        c = cond.map(lambda x, i=i: x[i:i + 1])
        out.append(ddim_sample(backbone, c, noise, uncond, num_steps, guidance_scale, stop_step=k))
        ts.append(schedule.timesteps[k])
    return torch.cat(out).to(backbone.dtype), torch.stack(ts).to(backbone.device, non_blocking=True)


class SliderModule(DiffusionModule):
    # eq. (5) on SD3 / FLUX: the frozen velocities under c_t, c+, c- at one x_t, the token's velocity regressed on
    # their combination (textual, variant=paper only; `_check_backbone_kind` refuses the others)
    flow_backbones = True

    def __init__(self, backbone: dict, token: dict, optimizer: Callable, lr_scheduler: Callable | None = None,
                 mode: str = "textual", variant: str = "paper", alpha_min: float = 0.0, alpha_max: float = 3.0,
                 resolution: int | None = None, *, pool: dict, reference_code: dict, info: dict | None = None,
                 seed: int = 0):
        super().__init__(backbone, optimizer, lr_scheduler, seed)
        if mode not in MODES:
            raise ConfigError(f"module.mode={mode!r} is unknown; use one of {MODES}")
        if variant not in VARIANTS:
            raise ConfigError(f"module.variant={variant!r} is unknown; use one of {VARIANTS}")
        if not alpha_min <= alpha_max:
            raise ConfigError(f"module.alpha_min={alpha_min} is above module.alpha_max={alpha_max}")
        if mode == "visual" and variant != "paper":
            raise ConfigError("variant=reference_code trains textual sliders only; use variant=paper with mode=visual")
        self.token_config = dict(token)
        self.mode, self.variant = mode, variant
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        self.resolution = resolution
        pool = PoolSettings.from_config(pool)
        self.pool = LatentPool(pool.size, pool.num_steps, pool.guidance_scale, seed)
        self.reference_code = ReferenceCodeSettings.from_config(reference_code)
        self.info = dict(info or {})  # the templates and settings written beside the artifact
        self.save_hyperparameters({"backbone": self.backbone_config, "token": self.token_config, "mode": mode,
                                   "variant": variant, "alpha": [alpha_min, alpha_max], "seed": seed}, logger=False)
        self.tokens: PlaceholderTokens | None = None
        self.sliders: SliderSet | None = None
        self._frozen_text = TextCache()
        self._check_backbone_kind(self.backbone_config.get("kind", "auto"))  # now that mode and variant are known

    def _check_backbone_kind(self, kind: str) -> None:
        super()._check_backbone_kind(kind)
        variant = getattr(self, "variant", None)  # None while the base class checks the kind alone
        if kind in FLOW_KINDS and variant is not None and (self.mode, variant) != ("textual", "paper"):
            setting = f"module.variant={variant}" if variant != "paper" else f"module.mode={self.mode}"
            raise ConfigError(f"{setting} runs on UNet backbones, not model.kind={kind}; use module.mode=textual "
                              f"module.variant=paper (eq. 5) on SD3 / FLUX")

    # ----- model ----------------------------------------------------------------------------------
    def build(self, backbone: Backbone) -> None:
        cfg = self.token_config
        # one 768-d vector on SDXL too: the CLIP-L encoder, the part SD1.x shares (Sec. 4.5); on SD3 / FLUX every
        # encoder (CLIP-L, CLIP-G, T5) reads the prompt into the transformer, so the token lives in each
        encoders = None if isinstance(backbone, FlowBackbone) else [0]
        self.tokens = PlaceholderTokens(backbone, cfg["name"], num_vectors=cfg.get("num_vectors", 1),
                                        initializer=cfg.get("initializer"),
                                        train_existing=cfg.get("train_existing", False), encoders=encoders)
        slider = TokenSlider(self.tokens.expand(self.tokens.token), list(self.tokens.rows),
                             appended=not self.tokens.train_existing, scaling=self.scaling,
                             zero_above=self.reference_code.zero_above if self.variant == "reference_code" else None)
        self.sliders = SliderSet([slider])

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.resolution is None:  # the templates' training resolution, when they name one
            self.resolution = getattr(datamodule, "resolution", None)
        if self.mode == "textual" and self.variant == "paper" and hasattr(datamodule, "target_prompts"):
            prompts = datamodule.target_prompts()
            log.info("latent pool: %d samples of each of %d target prompts", self.pool.size, len(prompts))
            with self.tokens.original():  # an erased word keeps its meaning in the images of c_t
                self.pool.fill(self.backbone, prompts, self.resolution, progress=self.trainer.is_global_zero)

    @property
    def scaling(self) -> str:
        return "output" if self.variant == "reference_code" else "embedding"

    def trained_prompt(self, target: str) -> str:
        """c_t with the slider token (an erased word is already in it)."""
        if self.tokens.train_existing:
            if self.tokens.token not in target:
                raise ConfigError(f"erasing {self.tokens.token!r}: the template target {target!r} must contain it")
            return target
        return f"{target} {self.tokens.expand(self.tokens.token)}"

    def frozen_text(self, prompts: list[str]) -> Conditioning:
        """The frozen text encoder's conditioning (with an erased word's original rows)."""
        return self._frozen_text(self.backbone, prompts, self.tokens.original)

    def draw_alpha(self, n: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=g, device=g.device)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * u

    # ----- training ---------------------------------------------------------------------------------
    def textual_loss(self, batch: dict) -> torch.Tensor:
        backbone, g = self.backbone, self.step_generator()
        n = len(batch["target"])
        if self.variant == "reference_code":
            latents, t = self.partially_denoised(batch["target"], g)
            alpha = torch.ones(n, device=self.device)
            token_scale = None  # the token as it is: alpha only scales its output at inference
        else:
            with self.tokens.original():  # an erased word keeps its meaning in the images of c_t
                z0 = torch.stack([self.pool.draw(backbone, p, g, self.resolution) for p in batch["target"]])
            noise = torch.randn(z0.shape, generator=g, device=self.device, dtype=torch.float32)
            t = backbone.sample_timesteps(n, g).to(self.device)  # UNet: U{0..T-1} (eq. 4); flow: its training t
            latents = backbone.add_noise(z0.float(), noise, t).to(backbone.dtype)
            alpha = self.draw_alpha(n, g)
            token_scale = alpha
        # eq. (5): target = eps(x_t, c_t) + alpha * eta * (eps(x_t, c+, p) - eps(x_t, c-, p)), one frozen call; on
        # SD3 / FLUX   target = v(x_t, c_t) + alpha * eta * (v(x_t, c+, p) - v(x_t, c-, p)), velocities at one x_t
        with torch.no_grad(), record_function("slider/frozen_unet"):
            cond = self.frozen_text(list(batch["neutral"]) + list(batch["positive"]) + list(batch["unconditional"]))
            x, tt = latents.repeat(3, 1, 1, 1), t.repeat(3)
            eps_n, eps_p, eps_m = eq5_prediction(backbone, x, tt, cond).float().chunk(3)
            scale = batch["sign"].to(self.device).float() * batch["guidance_scale"].to(self.device).float() * alpha
            target = slider_target(eps_n, eps_p, eps_m, scale)
        with self.tokens.scaled(token_scale), record_function("slider/encode_prompt"):
            cond = backbone.encode_prompt([self.trained_prompt(p) for p in batch["target"]])
        with record_function("slider/trained_unet"):  # eps (v) of x_t under c_t + alpha S
            pred = eq5_prediction(backbone, latents, t, cond).float()
        return F.mse_loss(pred, target)

    @torch.no_grad()
    def partially_denoised(self, targets: list[str], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' z_t: noise partially denoised with the current token at guidance 3, and its t."""
        cfg = self.reference_code
        cond = self.backbone.encode_prompt([self.trained_prompt(p) for p in targets])
        return denoise_partially(self.backbone, cond, self.frozen_text([""]), cfg.denoise_steps,
                                 cfg.denoise_guidance, g, self.step_generator(offset=1, device="cpu"),
                                 self.resolution)

    def visual_loss(self, batch: dict) -> torch.Tensor:
        """eq. (6): ||eps - eps(z_t^A, c_t + alpha S)||^2 + ||eps - eps(z_t^B, c_t - alpha S)||^2."""
        backbone, g = self.backbone, self.step_generator()
        keys = batch.get("image_key")
        a = self.image_latents(batch["pixel_values"], g, keys)
        b = self.image_latents(batch["pair_0"], g, None if keys is None else [f"{k}:pair_0" for k in keys])
        n = a.shape[0]
        noise = torch.randn(a.shape, generator=g, device=self.device, dtype=a.dtype)
        t = torch.randint(0, backbone.num_train_timesteps, (n,), generator=g, device=self.device)
        alpha = self.draw_alpha(n, g)
        latents = torch.cat([a, b])
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        with self.tokens.scaled(torch.cat([alpha, -alpha])):
            cond = backbone.encode_prompt([self.tokens.expand(p) for p in list(batch["prompt"]) * 2])
        pred = backbone.predict(backbone.add_noise(latents, noise2, t2), t2, cond)
        return F.mse_loss(pred.float(), backbone.training_target(latents, noise2, t2).float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.visual_loss(batch) if self.mode == "visual" else self.textual_loss(batch)
        self.log("train/loss", loss, batch_size=len(batch.get("target", batch.get("prompt"))))
        return loss

    # ----- sampling ---------------------------------------------------------------------------------
    def sampling_prompt(self, template: str, class_word: str) -> str:
        return self.sliders.prompt(fill_template(template, class_word))

    @contextlib.contextmanager
    def sampling_setting(self, strength: float | None = None, **setting) -> Iterator[None]:
        """strength: the slider's alpha at sampling time (None: 1, the token as trained)."""
        with super().sampling_setting(**setting), self.sliders.strengths(strength):
            yield

    def prompt_encoder(self) -> Callable | None:
        return self.sliders.encoder(self.backbone)

    # ----- artifacts --------------------------------------------------------------------------------
    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        meta = {"method": "prompt_slider", **self.backbone_identity(), "step": self.global_step}
        # SD3 / FLUX: one key per text encoder ({"clip_l", "clip_g", "t5"}), as textual inversion writes them
        keys = self.backbone.embedding_keys if isinstance(self.backbone, FlowBackbone) else None
        path = self.tokens.save(out / EMBEDDINGS_FILE, sdxl=self.backbone.is_sdxl, metadata=meta, keys=keys)
        slider = self.sliders.sliders[0]
        info = out / SLIDER_INFO
        write_json(info, {**meta, "file": EMBEDDINGS_FILE, "token": self.tokens.token, "names": self.tokens.names,
                          "erase": self.tokens.train_existing, "mode": self.mode, "variant": self.variant,
                          "scaling": slider.scaling, "zero_above": slider.zero_above,
                          "alpha": [self.alpha_min, self.alpha_max], **self.info})
        log.info("wrote %s (%d bytes) and %s", path, path.stat().st_size, info)
        return [path, info]

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if self.tokens is not None:
            self.tokens.write_back()
