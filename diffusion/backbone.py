"""Backbone loading and the few operations every method needs from a Stable Diffusion model.

`load_backbone` reads a diffusers-format folder (or a hub id) with SD1.x, SD2.x or SDXL weights,
or builds the tiny test model. The returned `Backbone` is a frozen nn.Module in the compute dtype;
methods add their own trainable parameters (in fp32) around it. An SD3 or FLUX folder (model.kind sd3 / flux,
or a model_index.json naming their pipeline) loads as a `diffusion.flow.FlowBackbone`, which shares this
interface: tokenizers / text_encoders, encode_prompt, encode_images, decode_latents, resolution, and the
training calls sample_timesteps, add_noise, predict, training_target.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from diffusion.builds import ensure_built_pipeline
from diffusion.conditioning import Conditioning
from diffusion.dtypes import resolve_dtype, weight_device, weight_dtype
from diffusion.model_index import flow_kind, hub_model_index
from diffusion.schedules import SD_BETAS
from diffusion.vae import VAELatents
from utils.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

REQUIRED = {"sd": ("unet", "vae", "text_encoder", "tokenizer"),
            "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
            "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                    "text_encoder_3", "tokenizer_3"),
            "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
FLOW_KINDS = ("sd3", "flux")  # rectified-flow backbones, loaded by diffusion.flow
MODEL_NAMES = {"sd": "Stable Diffusion", "sdxl": "Stable Diffusion", "sd3": "Stable Diffusion 3", "flux": "FLUX"}


TOKEN_CACHE_SIZE = 10_000  # prompts whose ids a backbone keeps (an evaluation's prompt set fits many times over)


class Backbone(VAELatents, nn.Module):
    """A frozen text-to-image latent diffusion model: tokenizers, text encoders, UNet, VAE, scheduler."""

    def __init__(self, unet, vae, text_encoders: Sequence[nn.Module], tokenizers: Sequence, scheduler,
                 name: str = "backbone"):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.name = name
        self.unet_graphs = None  # diffusion.cuda_graphs.UNetGraphs while enabled (callbacks/fast_unet.py)
        self._alphas_on: tuple[torch.Tensor, torch.Tensor] | None = None  # (scheduler's table, its device copy)
        self._size_ids: dict[tuple, torch.Tensor] = {}  # (resolution, device, dtype) -> SDXL's time ids
        self._token_ids: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (encoder, vocabulary size) -> ids
        self.requires_grad_(False)
        self.eval()

    # ----- facts -------------------------------------------------------------------------------
    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.unet)

    @property
    def device(self) -> torch.device:
        return weight_device(self.unet)

    @property
    def embedding_keys(self) -> tuple[str, ...] | None:
        """A textual-inversion file's key per text encoder (SDXL's clip_l / clip_g); None: one encoder, whose
        file is {token: rows}."""
        return ("clip_l", "clip_g") if self.is_sdxl else None

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def train(self, mode: bool = True):  # frozen parts never leave eval mode (no dropout)
        return super().train(False)

    # ----- text --------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], index: int = 0) -> torch.Tensor:
        """Padded token ids [B, max length] on the backbone's device (see `token_id_rows`)."""
        return self.token_id_rows(prompts, index).to(self.device, non_blocking=True)

    def token_id_rows(self, prompts: Sequence[str], index: int = 0) -> torch.Tensor:
        """Padded token ids [B, max length] on the host. Each prompt is tokenized once per vocabulary (training
        prompts repeat every few steps, and CLIP's BPE runs in Python on every call); adding a token (a
        placeholder) starts a new cache."""
        tok = self.tokenizers[index]
        cache = self._token_ids.setdefault((index, len(tok)), {})
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        if new:
            if len(cache) + len(new) > TOKEN_CACHE_SIZE:
                cache.clear()
            ids = tok(new, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            cache.update(zip(new, ids))
        return torch.stack([cache[p] for p in prompts])

    def encode_prompt(self, prompts: Sequence[str] | str) -> Conditioning:
        """Text conditioning as the pipelines compute it (SDXL: penultimate layers + pooled)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.is_sdxl:
            return Conditioning(self.text_encoders[0](self.tokenize(prompts))[0])
        states, pooled = [], None
        for i, encoder in enumerate(self.text_encoders):
            out = encoder(self.tokenize(prompts, i), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the second encoder)
        return Conditioning(torch.cat(states, dim=-1), pooled, self.size_ids(pooled.dtype).expand(len(prompts), 6))

    def size_ids(self, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's time ids [1, 6] (original size, crop (0, 0), target size at the model's resolution), made on the
        device once: a tensor built from host numbers is a blocking copy, which would stall every training step."""
        key = (self.resolution, self.device, dtype)
        if key not in self._size_ids:
            h = self.resolution
            self._size_ids[key] = torch.tensor([[h, h, 0, 0, h, h]], device=self.device, dtype=dtype)
        return self._size_ids[key]

    # ----- the UNet ----------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        """The UNet's raw output (epsilon or v, as the scheduler's prediction_type says)."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=latents.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        if self.unet_graphs is not None and cross_attention_kwargs is None:
            return self.unet_graphs(latents, t, **cond.unet_kwargs())
        return self.unet(latents.to(self.dtype), t, **cond.unet_kwargs(),
                         cross_attention_kwargs=cross_attention_kwargs).sample

    def alphas_cumprod(self, device=None) -> torch.Tensor:
        """The scheduler's alpha_bar table on `device`, copied there once (a blocking copy per call would wait
        for all queued GPU work)."""
        device = torch.device(device or self.device)
        table = self.scheduler.alphas_cumprod
        if self._alphas_on is None or self._alphas_on[0] is not table or self._alphas_on[1].device != device:
            self._alphas_on = (table, table.to(device))
        return self._alphas_on[1]

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet output is regressed on for x_t = add_noise(latents, noise, t)."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        raise ConfigError(f"prediction_type {kind!r} is not supported; use epsilon or v_prediction")

    def to_epsilon(self, output: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return output
        if kind != "v_prediction":
            raise ConfigError(f"prediction_type {kind!r} is not supported; use epsilon or v_prediction")
        a = self.alphas_cumprod(output.device)[t].float().view(-1, 1, 1, 1)
        return (a.sqrt() * output.float() + (1 - a).sqrt() * latents.float()).to(output.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training timestep per sample, uniform over the scheduler's (DDPM, Ho et al. 2020, Algorithm 1)."""
        device = generator.device if generator is not None else self.device
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)


# ----- loading ------------------------------------------------------------------------------------
def _detect_kind(path: Path | None, index: dict | None) -> str:
    """sd / sdxl / sd3 / flux from a hub model_index.json or a local folder (its model_index.json names SD3 and
    FLUX pipelines; otherwise its folders decide, as they always have)."""
    flow = flow_kind(index if index is not None else _local_index(path))
    if flow is not None:
        return flow
    if index is not None:
        return "sdxl" if "text_encoder_2" in index else "sd"
    return "sdxl" if path is not None and (path / "text_encoder_2").is_dir() else "sd"


def _local_index(path: Path | None) -> dict:
    """A local folder's model_index.json, or {} when it has none (or an unreadable one: loading names that)."""
    file = None if path is None else path / "model_index.json"
    if file is None or not file.is_file():
        return {}
    try:
        index = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


def _check_local(path: Path, key: str, kind: str) -> None:
    model = MODEL_NAMES[kind]
    if not path.exists():
        raise ModelLoadError(f"{key}={path} does not exist; point it at a diffusers-format {model} folder or a hub id")
    if not path.is_dir():
        raise ModelLoadError(f"{key}={path} is a file; point it at a diffusers-format {model} folder")
    for sub in REQUIRED[kind]:
        if not (path / sub).is_dir():
            raise ModelLoadError(f"{key}={path} has no {sub}/; point it at a diffusers-format {model} folder")
    weights = ("*.safetensors", "*.bin")
    denoiser = "transformer" if kind in FLOW_KINDS else "unet"
    for sub in (denoiser, "vae") + tuple(s for s in REQUIRED[kind] if s.startswith("text_encoder")):
        if not (path / sub / "config.json").is_file() or not any(
                next((path / sub).glob(p), None) for p in weights):
            raise ModelLoadError(f"{key}={path} has an incomplete {sub}/ (config.json or weights missing); "
                                 f"point it at a complete diffusers-format {model} folder")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def check_backbone_path(path: str | None, kind: str = "auto", build: str | None = None,
                        key: str = "model.path", **_ignored) -> None:
    """Fail fast (before any data is read) on a local path that cannot hold a backbone."""
    if not path:
        raise ConfigError(f"{key} is not set; give a diffusers-format Stable Diffusion folder or hub id")
    local = Path(str(path)).expanduser()
    if build and not local.exists():
        return  # built on load
    if local.exists() or not _looks_like_hub_id(str(path)):
        _check_local(local, key, _detect_kind(local, None) if kind == "auto" else kind)


def model_identity(name: str | None, path: str | Path | None) -> dict[str, str]:
    """A backbone named portably, for artifact files: the config name, the folder's own name (or the hub id)
    and a fingerprint of a local folder (its JSON configs and every file's relative path and size), never an
    absolute path, so that a run copied to another machine still says which model it was trained on."""
    identity = {"backbone": str(name)}
    if not path:
        return identity
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        identity["backbone_model"] = str(path) if _looks_like_hub_id(str(path)) else folder.name
        return identity
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        digest.update(f"{relative}:{file.stat().st_size}\n".encode())
        if file.suffix == ".json":
            try:
                config = json.loads(file.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(config, dict):
                config.pop("_name_or_path", None)  # where the folder was loaded from, not what it holds
            digest.update(json.dumps(config, sort_keys=True).encode())
    identity.update(backbone_model=folder.name, backbone_fingerprint=digest.hexdigest()[:16])
    return identity


def load_backbone(path: str | None, kind: str = "auto", dtype: str | torch.dtype | None = None,
                  vae_dtype: str | torch.dtype | None = None, revision: str | None = None,
                  variant: str | None = None, build: str | None = None, name: str | None = None,
                  prediction_type: str | None = None, key: str = "model.path", gradient_checkpointing: bool = False,
                  **settings):
    """Load a Stable Diffusion backbone (SD1.x / SD2.x / SDXL) from a local folder or a hub id; an SD3 or FLUX
    one (model.kind sd3 / flux, or found in model_index.json) as a diffusion.flow.FlowBackbone, which takes
    `settings` (max_sequence_length, resolution, training_guidance).

    `build` names a model to create at `path` when it is missing: the tiny test models (tiny,
    tiny_sd2, tiny_sdxl) or random-weight full-size architectures (random_sd15, random_sdxl).
    Frozen parts are cast to `dtype` (the compute dtype); `vae_dtype` overrides it for the VAE.
    `gradient_checkpointing` makes the UNet (SD3 / FLUX: the transformer) recompute its blocks' activations in
    the backward instead of keeping them: less memory for methods that backpropagate through it, slower steps.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not path:
        raise ConfigError(f"{key} is not set; give a diffusers-format Stable Diffusion folder or hub id")
    if kind != "auto" and kind not in REQUIRED:
        raise ConfigError(f"model.kind={kind!r} is unknown; use auto, sd, sdxl, sd3 or flux")
    dtype = resolve_dtype(dtype)
    vae_dtype = resolve_dtype(vae_dtype) if vae_dtype is not None else dtype
    if build:
        ensure_built_pipeline(path, build)
    local = Path(str(path)).expanduser()
    is_local = local.exists() or not _looks_like_hub_id(str(path))
    index = None
    if is_local:
        if kind == "auto":
            kind = _detect_kind(local, None)
        _check_local(local, key, kind)
        source = str(local)
    else:
        source = str(path)
        if kind == "auto":
            index = hub_model_index(source, revision, key)
            kind = _detect_kind(None, index)
    if kind in FLOW_KINDS:
        from diffusion.flow import load_flow_backbone

        return load_flow_backbone(source, kind, dtype=dtype, name=name or Path(str(path)).name, revision=revision,
                                  key=key, gradient_checkpointing=gradient_checkpointing, **settings)

    common = {"revision": revision, "variant": variant}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **common)
        encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **common)]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)]
        if kind == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", torch_dtype=dtype, **common))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{key}={path} could not be loaded ({str(e).splitlines()[0]}); "
                             f"point it at a complete diffusers-format Stable Diffusion folder") from e
    # DDIM with the checkpoint's own beta schedule; SD settings (clip_sample off) whatever it shipped with.
    try:
        sched_config = DDIMScheduler.load_config(source, subfolder="scheduler", revision=revision)
    except (OSError, ValueError):
        log.warning("%s has no scheduler/; using the Stable Diffusion beta schedule", path)
        sched_config = dict(SD_BETAS)
    overrides = {"clip_sample": False, "set_alpha_to_one": False}
    if prediction_type:
        overrides["prediction_type"] = prediction_type
    scheduler = DDIMScheduler.from_config({**sched_config, **overrides})
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    backbone = Backbone(unet, vae, encoders, tokenizers, scheduler, name=name or Path(str(path)).name)
    log.info("loaded %s backbone from %s (%s, %dpx%s)", kind, path, dtype, backbone.resolution,
             ", gradient checkpointing" if gradient_checkpointing else "")
    return backbone
