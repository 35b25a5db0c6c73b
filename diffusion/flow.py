"""Rectified-flow backbones (Stable Diffusion 3, FLUX.1) and the mechanics every flow method shares.

Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 2-3)
joins clean latents x0 (t = 0) and Gaussian noise (t = 1) by straight lines,
x_t = (1 - t) x0 + t noise, and the transformer predicts their velocity v = noise - x0. Sampling
integrates dx/dt = v from t = 1 down to 0 with Euler steps x_{t'} = x_t + (t' - t) v(x_t, t);
inversion integrates the same ODE upwards. Here t is the scheduler's sigma; the transformers take
sigma * 1000 as their timestep, as the diffusers pipelines pass it.

`FlowBackbone` reproduces StableDiffusion3Pipeline's and FluxPipeline's text encoding, schedules
and VAE normalisation, so `euler_sample` gives the stock pipelines' images. It shares the UNet `Backbone`'s
interface (diffusion/backbone.py): `tokenizers` / `text_encoders`, `encode_prompt`, `encode_images`,
`decode_latents`, `resolution`, and the training calls `sample_timesteps`, `add_noise`, `predict`,
`training_target`, so methods written against that interface (textual inversion) train either kind.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.builds import ensure_built_pipeline
from diffusion.conditioning import Conditioning
from diffusion.dtypes import resolve_dtype, weight_device, weight_dtype
from diffusion.model_index import flow_kind, hub_model_index
from diffusion.vae import VAELatents
from utils.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # T5 tokens per prompt, each pipeline's default
# Textual-inversion file keys of the text encoders, in `FlowBackbone.text_encoders` order (the multi-encoder layout
# diffusers documents for SDXL, extended by T5).
EMBEDDING_KEYS = {"sd3": ("clip_l", "clip_g", "t5"), "flux": ("clip_l", "t5")}
FLUX_TRAINING_GUIDANCE = 3.5  # the guidance embedding's input in training: diffusers' train_dreambooth_flux default


def avoid_cudnn_attention() -> None:
    """Keep scaled_dot_product_attention off cuDNN's fused kernel for this process: its backward fails on FLUX's
    training shapes (torch 2.11, H100: "Expected mha_graph.execute(...).is_good()", then an illegal memory access;
    pytorch/pytorch#122695). The flash and memory-efficient kernels take over. Process-wide, because a transformer
    with gradient checkpointing re-runs its attention inside the backward, outside any context manager."""
    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("scaled_dot_product_attention: cuDNN's fused kernel off (its backward fails on flow transformers)")


# ----- FLUX's latent packing (FluxPipeline._pack_latents / _unpack_latents) --------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's transformer reads 2x2 latent patches as tokens."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of pack_latents for latents of size height x width."""
    b, _, channels = packed.shape
    patches = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's rotary position ids of the packed tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowBackbone(VAELatents, nn.Module):
    """A frozen rectified-flow text-to-image model: CLIP and T5 encoders, a transformer, a VAE, a scheduler."""

    def __init__(self, kind: str, transformer, vae, clip_encoders: Sequence[nn.Module], clip_tokenizers: Sequence,
                 t5_encoder: nn.Module, t5_tokenizer, scheduler, max_sequence_length: int | None = None,
                 name: str = "flow_backbone", resolution: int | None = None,
                 training_guidance: float = FLUX_TRAINING_GUIDANCE):
        super().__init__()
        if kind not in FLOW_PIPELINES:
            raise ConfigError(f"model.kind={kind!r} is unknown for a flow backbone; use auto, sd3 or flux")
        self.kind = kind
        self.transformer = transformer
        self.vae = vae
        self.clip_encoders = nn.ModuleList(clip_encoders)
        self.clip_tokenizers = list(clip_tokenizers)
        self.t5_encoder = t5_encoder
        self.t5_tokenizer = t5_tokenizer
        # transformers 5 gives T5 two embedding modules with one tied weight (`shared`, which get_input_embeddings
        # returns, and `encoder.embed_tokens`, which the forward reads); one module lets a token table grow in
        # place and a lookup hook on it see every lookup (resize_token_embeddings makes the same change).
        t5_encoder.set_input_embeddings(t5_encoder.get_input_embeddings())
        self.scheduler = scheduler
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[kind]
        self.name = name
        self._resolution = resolution
        self.training_guidance = training_guidance
        self.requires_grad_(False)
        self.eval()
        avoid_cudnn_attention()

    def train(self, mode: bool = True):  # frozen parts never leave eval mode (no dropout)
        return super().train(False)

    # ----- facts -------------------------------------------------------------------------------
    @property
    def is_sdxl(self) -> bool:
        return False

    @property
    def tokenizers(self) -> list:
        """CLIP tokenizers, then T5's (the order of `text_encoders`)."""
        return [*self.clip_tokenizers, self.t5_tokenizer]

    @property
    def text_encoders(self) -> list[nn.Module]:
        """CLIP-L (+ CLIP-G for SD3), then T5: every encoder a prompt passes through."""
        return [*self.clip_encoders, self.t5_encoder]

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """A textual-inversion file's key for each of `text_encoders`."""
        return EMBEDDING_KEYS[self.kind]

    @property
    def resolution(self) -> int:
        """The image size sampled by default: the model config's, else the pipeline's default."""
        if self._resolution:
            return int(self._resolution)
        if self.kind == "sd3":
            return self.transformer.config.sample_size * self.vae_scale_factor
        return 128 * self.vae_scale_factor  # FluxPipeline.default_sample_size

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.transformer)

    @property
    def device(self) -> torch.device:
        return weight_device(self.transformer)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def embeds_guidance(self) -> bool:
        """FLUX.1-dev takes the guidance scale as an input instead of running an unconditional pass."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """The transformer's image tokens for latents (B, C, H, W); FLUX's schedule shifts with it."""
        patch = 2 if self.kind == "flux" else self.transformer.config.patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    # ----- text --------------------------------------------------------------------------------
    def encode_prompt(self, prompts: str | Sequence[str]) -> Conditioning:
        """Prompts -> the conditioning each stock pipeline's encode_prompt gives.

        SD3: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width, then T5's
        states after them along the tokens; pooled = both CLIP projections side by side.
        FLUX: T5's last hidden states; pooled = CLIP's pooled output.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5_states = self._t5_states(prompts)
        if self.kind == "flux":
            return Conditioning(t5_states, self._clip_outputs(0, prompts)[1])
        (states_l, pooled_l), (states_g, pooled_g) = self._clip_outputs(0, prompts), self._clip_outputs(1, prompts)
        clip_states = torch.cat([states_l, states_g], dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return Conditioning(torch.cat([clip_states, t5_states], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))

    def _clip_outputs(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states, pooled text) of CLIP encoder `index`."""
        # Both pipelines pad every CLIP prompt to the first tokenizer's length (77).
        ids = self.clip_tokenizers[index](prompts, padding="max_length", truncation=True, return_tensors="pt",
                                          max_length=self.clip_tokenizers[0].model_max_length).input_ids
        # asynchronous copies: a blocking one would make the host wait for the GPU's queue at every step
        out = self.clip_encoders[index](ids.to(self.device, non_blocking=True), output_hidden_states=True)
        pooled = out.text_embeds if self.kind == "sd3" else out.pooler_output
        return out.hidden_states[-2], pooled

    def _t5_states(self, prompts: list[str]) -> torch.Tensor:
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt").input_ids
        return self.t5_encoder(ids.to(self.device, non_blocking=True))[0]

    # ----- the transformer ---------------------------------------------------------------------
    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                         guidance: float | None = None) -> torch.Tensor:
        """The velocity v = noise - x0 at latents (B, C, H, W) and flow time `sigma` (a scalar or (B,))."""
        latents = latents.to(self.dtype)  # the pipelines keep latents in the text states' (the weights') dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        timestep = (sigma * self.num_train_timesteps).expand(latents.shape[0])
        cond = cond.expand(latents.shape[0])
        if self.kind == "flux":
            return self._flux_velocity(latents, timestep, cond, guidance)
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                                pooled_projections=cond.pooled, return_dict=False)[0]

    def _flux_velocity(self, latents, timestep, cond: Conditioning, guidance: float | None) -> torch.Tensor:
        if self.embeds_guidance and guidance is None:
            raise ValueError("this FLUX transformer embeds the guidance scale; pass guidance=<scale> (FLUX.1-dev: 3.5)")
        height, width = latents.shape[-2:]
        batch = latents.shape[0]
        guidance_input = None
        if self.embeds_guidance:
            guidance_input = torch.full([1], float(guidance), device=latents.device, dtype=torch.float32).expand(batch)
        packed = self.transformer(
            hidden_states=pack_latents(latents),
            timestep=timestep.to(latents.dtype) / 1000,  # FluxPipeline's division, so results match it exactly
            guidance=guidance_input, pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden_states,
            txt_ids=torch.zeros(cond.hidden_states.shape[1], 3, device=latents.device, dtype=cond.hidden_states.dtype),
            img_ids=latent_image_ids(height, width, latents.device, latents.dtype), return_dict=False)[0]
        return unpack_latents(packed, height, width)

    # ----- training (the interface DiffusionModule.diffusion_loss calls) ----------------------------
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One flow time t in (0, 1) per sample: logit-normal, t = sigmoid(n) with n ~ N(m = 0, s = 1) (Esser et
        al. 2024, Sec. 3.1, their best sampler: more training in the middle of the path, where the velocity is
        hardest to predict), then the scheduler's static shift (`training_shift`)."""
        device = generator.device if generator is not None else self.device
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
        shift = self.training_shift
        return shift * t / (1 + (shift - 1) * t)

    @property
    def training_shift(self) -> float:
        """The shift s of t -> s t / (1 + (s - 1) t) in training. SD3: its scheduler's static shift (3.0, Esser et
        al. 2024, Sec. 5.3.2), which diffusers' train_dreambooth_sd3 (weighting_scheme="logit_normal") applies by
        reading its logit-normal draw off the scheduler's shifted sigmas. FLUX shifts with the image size at
        sampling only: its scheduler's training sigmas, and so diffusers' FLUX scripts, are unshifted (s = 1)."""
        config = self.scheduler.config
        return 1.0 if config.use_dynamic_shifting else float(config.shift)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noisy_latents(latents, noise, t)

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity v = noise - x0 the transformer regresses on (Esser et al. 2024, eq. 3)."""
        return noise - latents

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """The velocity at flow time t, FLUX's guidance embedding fed `training_guidance` (as diffusers' FLUX
        training scripts do)."""
        if cross_attention_kwargs is not None:
            raise ValueError("flow backbones take no cross_attention_kwargs; their attention has no hooks here")
        guidance = self.training_guidance if self.embeds_guidance else None
        return self.predict_velocity(latents, t, cond, guidance=guidance)

    # ----- the schedule ------------------------------------------------------------------------
    def sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """The stock pipeline's noise levels for `num_steps` Euler steps: num_steps + 1 values from ~1 down to 0.

        SD3 shifts the scheduler's own grid (already shifted once at construction, as diffusers does) by its
        static `shift`; FLUX shifts 1, ..., 1/num_steps by mu, which grows linearly with the image's token count
        (`image_seq_len`, see image_seq_len()).
        """
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = self.scheduler.__class__.from_config(self.scheduler.config)
        config = scheduler.config
        mu = None
        if config.use_dynamic_shifting:
            mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                                 config.base_shift, config.max_shift)
        start = np.linspace(1.0, 1 / num_steps, num_steps) if self.kind == "flux" else None
        scheduler.set_timesteps(num_steps, sigmas=start, mu=mu)
        return scheduler.sigmas


# ----- the training objective and the ODE ---------------------------------------------------------
def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise (Esser et al. 2024, eq. 2 with the rectified-flow a_t = 1 - t, b_t = t);
    `sigma` is a scalar or one t per sample."""
    sigma = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
    sigma = sigma.view(-1, *[1] * (latents.ndim - 1)) if sigma.ndim else sigma
    return (1 - sigma) * latents + sigma * noise


def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error to the velocity target v = noise - x0 (Esser et al. 2024, eq. 3 with a_t = 1 - t,
    b_t = t), each element scaled by `weight` (broadcast to the latents; e.g. a per-sample timestep weighting) as
    diffusers' SD3 / FLUX training examples do."""
    error = (velocity.float() - (noise.float() - latents.float())) ** 2
    if weight is not None:
        error = weight.float() * error
    return error.mean()


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x_{t'} = x_t + (t' - t) v, in fp32 as FlowMatchEulerDiscreteScheduler.step computes it."""
    return (latents.float() + (sigma_next - sigma) * velocity.float()).to(velocity.dtype)


def guided_velocity(backbone: FlowBackbone, latents: torch.Tensor, sigma, cond: Conditioning,
                    guidance_scale: float, negative_cond: Conditioning | None = None) -> torch.Tensor:
    """The velocity the stock pipeline steps with.

    FLUX.1-dev: guidance_scale is fed to the transformer's guidance embedding, one conditional pass.
    SD3: classifier-free guidance, v_uncond + s (v_cond - v_uncond), with negative_cond as the unconditional
    input (the pipeline encodes "" for it), in one batched pass; guidance_scale <= 1 runs the conditional pass only.
    """
    if backbone.embeds_guidance:
        if negative_cond is not None:
            raise ValueError("FLUX embeds its guidance; negative_cond has no use here, pass None")
        return backbone.predict_velocity(latents, sigma, cond, guidance=guidance_scale)
    if guidance_scale <= 1:
        return backbone.predict_velocity(latents, sigma, cond)
    if negative_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs negative_cond (encode '' for the pipeline's default)")
    batch = latents.shape[0]
    both = Conditioning.cat([negative_cond.expand(batch), cond.expand(batch)])
    uncond, conditional = backbone.predict_velocity(torch.cat([latents, latents]), sigma, both).chunk(2)
    return uncond + guidance_scale * (conditional - uncond)


@torch.no_grad()
def euler_sample(backbone: FlowBackbone, cond: Conditioning, latents: torch.Tensor, sigmas: torch.Tensor,
                 guidance_scale: float, negative_cond: Conditioning | None = None,
                 step_context: Callable[[int], ContextManager] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from sigmas[0] (noise, the given latents) down to sigmas[-1] (0, clean latents);
    `step_context(i)` wraps step i's velocity (attention control: which step the maps belong to)."""
    for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        with step_context(step) if step_context else contextlib.nullcontext():
            velocity = guided_velocity(backbone, latents, sigma, cond, guidance_scale, negative_cond)
        latents = euler_step(latents, velocity, sigma, sigma_next)
    return latents


@torch.no_grad()
def flow_generate(backbone: FlowBackbone, prompts: list[str], seeds: Sequence[int], num_steps: int = 28,
                  guidance_scale: float = 3.5, negative_prompt: str = "", encode=None, resolution: int | None = None,
                  decode: bool = True) -> torch.Tensor:
    """Images in [0, 1] (latents with decode=False) as the stock pipeline samples them: Euler steps over its
    shifted sigmas; SD3 with classifier-free guidance against `negative_prompt` (the pipeline's default is ""),
    FLUX.1-dev with `guidance_scale` as its guidance embedding. Each sample's noise comes from its own seed, so a
    sample does not depend on what else is in the batch; `encode` replaces the backbone's prompt encoding."""
    device = backbone.device
    size = (resolution or backbone.resolution) // backbone.vae_scale_factor
    noise = torch.cat([torch.randn(1, backbone.latent_channels, size, size, device=device,
                                   generator=torch.Generator(device).manual_seed(seed)) for seed in seeds])
    if backbone.kind == "flux" and not backbone.embeds_guidance:
        guidance_scale = 1.0  # FLUX.1-schnell is guidance-distilled: FluxPipeline ignores guidance_scale
    cond = (encode or backbone.encode_prompt)(list(prompts))
    negative = None
    if not backbone.embeds_guidance and guidance_scale > 1:
        negative = backbone.encode_prompt([negative_prompt])
    sigmas = backbone.sigmas(num_steps, backbone.image_seq_len(noise))
    latents = euler_sample(backbone, cond, noise, sigmas, guidance_scale, negative)
    return backbone.decode_latents(latents) if decode else latents


@torch.no_grad()
def flow_invert(backbone: FlowBackbone, cond: Conditioning, latents: torch.Tensor, sigmas: torch.Tensor,
                guidance_scale: float = 1.0, negative_cond: Conditioning | None = None,
                controller_gamma: float = 0.0, target_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents -> noise: the sampling ODE run forwards, Euler steps over the reversed `sigmas` (0 up to 1).

    controller_gamma > 0 is RF-Inversion's controlled forward ODE (Rout et al. 2024, "Semantic Image Inversion
    and Editing using Rectified Stochastic Differential Equations", arXiv:2410.10792, Algorithm 1): the velocity is
    v + gamma ((y1 - x_t) / (1 - t) - v), pulled towards the straight path to a fixed noise sample
    y1 = `target_noise`; the paper uses the unconditional velocity (pass the encoded "" as `cond`).
    gamma = 0 is plain inversion, gamma = 1 lands exactly on y1.
    """
    if not 0.0 <= controller_gamma <= 1.0:
        raise ValueError(f"controller_gamma={controller_gamma} is outside [0, 1]")
    if controller_gamma > 0 and target_noise is None:
        raise ValueError("controller_gamma > 0 needs target_noise (the noise sample y1 to steer towards)")
    ascending = sigmas.flip(0)
    for sigma, sigma_next in zip(ascending[:-1], ascending[1:]):
        velocity = guided_velocity(backbone, latents, sigma, cond, guidance_scale, negative_cond)
        if controller_gamma > 0:  # sigma < sigma_next <= 1, so 1 - sigma > 0
            towards_target = (target_noise.float() - latents.float()) / (1 - sigma)
            velocity = velocity + controller_gamma * (towards_target.to(velocity.dtype) - velocity)
        latents = euler_step(latents, velocity, sigma, sigma_next)
    return latents


# ----- loading ------------------------------------------------------------------------------------
def load_flow_backbone(path: str | None, kind: str = "auto", dtype: str | torch.dtype | None = None,
                       build: str | None = None, name: str | None = None, max_sequence_length: int | None = None,
                       revision: str | None = None, key: str = "model.path", resolution: int | None = None,
                       training_guidance: float = FLUX_TRAINING_GUIDANCE, gradient_checkpointing: bool = False,
                       **_ignored) -> FlowBackbone:
    """Load an SD3 or FLUX.1 backbone from a diffusers-format folder or hub id, frozen in `dtype`.

    `kind="auto"` reads the pipeline class from model_index.json; `build` (tiny_sd3, tiny_flux) creates the tiny
    test model at `path` when it is missing. `gradient_checkpointing`: the transformer recomputes its blocks'
    activations in the backward: less memory for methods that backpropagate through it, slower steps.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if not path:
        raise ConfigError(f"{key} is not set; give a diffusers-format SD3 or FLUX folder or hub id")
    if kind != "auto" and kind not in FLOW_PIPELINES:
        raise ConfigError(f"model.kind={kind!r} is unknown for a flow backbone; use auto, sd3 or flux")
    if build:
        ensure_built_pipeline(path, build)
    found = _pipeline_kind(_read_model_index(str(path), revision, key), path, key)
    if kind not in ("auto", found):
        raise ModelLoadError(f"{key}={path} holds a {found} pipeline, not model.kind={kind}")
    pipeline_class = StableDiffusion3Pipeline if found == "sd3" else FluxPipeline
    try:
        pipe = pipeline_class.from_pretrained(str(path), dtype=resolve_dtype(dtype), revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{key}={path} could not be loaded ({str(e).splitlines()[0]}); "
                             f"point it at a complete diffusers-format {FLOW_PIPELINES[found]} folder") from e
    backbone = flow_backbone_from_pipeline(found, pipe, max_sequence_length, name or Path(str(path)).name,
                                           resolution=resolution, training_guidance=training_guidance,
                                           gradient_checkpointing=gradient_checkpointing)
    log.info("loaded %s flow backbone from %s (%s)", found, path, backbone.dtype)
    return backbone


def flow_backbone_from_pipeline(kind: str, pipe, max_sequence_length: int | None, name: str,
                                gradient_checkpointing: bool = False, **settings) -> FlowBackbone:
    """A FlowBackbone around a loaded (or built in memory) StableDiffusion3Pipeline / FluxPipeline's parts;
    `gradient_checkpointing` as in `load_flow_backbone`."""
    if gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    if kind == "sd3":
        clip_encoders, clip_tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
        t5_encoder, t5_tokenizer = pipe.text_encoder_3, pipe.tokenizer_3
    else:
        clip_encoders, clip_tokenizers = [pipe.text_encoder], [pipe.tokenizer]
        t5_encoder, t5_tokenizer = pipe.text_encoder_2, pipe.tokenizer_2
    if t5_encoder is None:
        raise ModelLoadError(f"{name} has no T5 text encoder; flow backbones need the full pipeline")
    return FlowBackbone(kind, pipe.transformer, pipe.vae, clip_encoders, clip_tokenizers, t5_encoder, t5_tokenizer,
                        pipe.scheduler, max_sequence_length, name, **settings)


def _read_model_index(path: str, revision: str | None, key: str) -> dict:
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{key}={path} has no model_index.json; point it at a diffusers pipeline folder")
        return json.loads(index.read_text())
    if local.exists() or len(path.split("/")) != 2:
        raise ModelLoadError(f"{key}={path} does not exist; point it at a diffusers SD3 or FLUX folder or hub id")
    return hub_model_index(path, revision, key)


def _pipeline_kind(index: dict, path, key: str) -> str:
    kind = flow_kind(index)
    if kind is None:
        raise ModelLoadError(f"{key}={path} is a {index.get('_class_name') or 'unnamed'} pipeline; flow backbones "
                             f"are SD3 or FLUX")
    return kind
