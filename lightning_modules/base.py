"""What every method module shares: the frozen backbone, seeded per-step randomness, and
checkpoints that hold only what is trained.

The backbone is loaded in `configure_model` (once the trainer's precision is known) and kept
frozen in the compute dtype; subclasses add their trainable parameters in `build` (fp32).
Checkpoints drop the frozen weights (gigabytes for SDXL) and keep the trained ones, the optimizer
and the loop state, so resuming is exact.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from diffusion.attention import AttentionHub
from diffusion.backbone import FLOW_KINDS, Backbone, check_backbone_path, load_backbone, model_identity
from diffusion.dtypes import dtype_for_precision, resolve_dtype
from diffusion.flow import FlowBackbone
from diffusion.tokens import fill_template
from diffusion.sampling import generate
from utils.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)
POSTERIOR_CACHE_SIZE = 1024  # images (and their flips) whose VAE posteriors a module keeps


@dataclass
class LossBatch:
    """Images in [-1, 1], their prompts, the generator of their noise and timesteps (None: the step's) and the
    images' keys (DiffusionModule.image_latents)."""
    pixels: torch.Tensor
    prompts: Sequence[str]
    generator: torch.Generator | None = None
    keys: Sequence[str] | None = None


class DiffusionModule(L.LightningModule):
    # Trains on rectified-flow backbones (SD3, FLUX) too: a method whose loss and sampling use only the interface
    # both backbones share (diffusion_loss, sample); methods that hook the UNet's attention or layers do not.
    flow_backbones = False

    def __init__(self, backbone: dict, optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable | None = None, seed: int = 0):
        super().__init__()
        self.backbone_config = dict(backbone)
        check_backbone_path(**self.backbone_config)
        self._check_backbone_kind(self.backbone_config.get("kind", "auto"))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.backbone: Backbone | FlowBackbone | None = None
        self._hub: AttentionHub | None = None
        self.strict_loading = False  # frozen weights are not in our checkpoints; on_load_checkpoint checks the rest
        self._posteriors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # image_key -> VAE posterior

    # ----- model -----------------------------------------------------------------------------------
    def compute_dtype(self) -> torch.dtype:
        if self.backbone_config.get("dtype"):
            return resolve_dtype(self.backbone_config["dtype"])
        try:
            return dtype_for_precision(self.trainer.precision)
        except RuntimeError:  # not attached to a trainer
            return torch.float32

    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        config = {k: v for k, v in self.backbone_config.items() if k != "dtype"}
        self.backbone = load_backbone(**config, dtype=self.compute_dtype())
        self._check_backbone_kind(self.backbone.kind if isinstance(self.backbone, FlowBackbone) else "sd")
        self.build(self.backbone)
        trained = sum(p.numel() for p in self.trainable_parameters())
        log.info("%s: %d trainable parameters", type(self).__name__, trained)

    def _check_backbone_kind(self, kind: str) -> None:
        if kind in FLOW_KINDS and not self.flow_backbones:
            raise ConfigError(f"{type(self).__name__} runs on Stable Diffusion UNet backbones (SD1.x / SD2.x / SDXL), "
                              f"not model.kind={kind}; train textual_inversion on SD3 / FLUX, or choose a UNet model")

    def backbone_identity(self) -> dict[str, str]:
        """The backbone as artifact files name it: config name, folder name, fingerprint (no absolute path)."""
        return model_identity(self.backbone_config.get("name"), self.backbone_config.get("path"))

    def build(self, backbone: Backbone) -> None:
        """Create the trainable parts (fp32) around the frozen backbone."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def attention_hub(self) -> AttentionHub:
        """The UNet's attention hub, installed on first use; teardown gives the UNet its processors back."""
        if self._hub is None:
            self._hub = AttentionHub(self.backbone.unet)
        return self._hub

    def teardown(self, stage: str) -> None:
        if self._hub is not None:
            self._hub.restore()
            self._hub = None

    # ----- optimisation ----------------------------------------------------------------------------
    def optimizer_params(self) -> list:
        """What the optimizer trains: parameters, or parameter groups (a method whose weights join later)."""
        return self.trainable_parameters()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.optimizer_params())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def step_generator(self, offset: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """A generator seeded by (seed, global step, rank): resumed runs draw the same numbers. On the module's
        device by default; `device="cpu"` for choices the host must know (how many steps, which tokens), which
        a GPU generator could only give by making the host wait for the GPU's queue."""
        seed = (self.seed * 1_000_003 + self.global_step * 65_537 + self.global_rank * 257 + offset) % (2 ** 63)
        return torch.Generator(device=self.device if device is None else device).manual_seed(seed)

    def image_latents(self, pixels: torch.Tensor, g: torch.Generator | None,
                      keys: Sequence[str] | None = None) -> torch.Tensor:
        """Latents of a batch of training images, a posterior sample each drawn from `g`. With `keys` (an image
        set's `image_key`: which image, flipped or not) each image's posterior is encoded once and kept: the
        frozen VAE gives a fixed image the same posterior every step, and the sample drawn from it is the one a
        fresh encoding would draw."""
        backbone = self.backbone
        if keys is None:
            return backbone.encode_images(pixels, generator=g)
        missing = [i for i, key in enumerate(keys) if key not in self._posteriors]
        if len(self._posteriors) + len(missing) > POSTERIOR_CACHE_SIZE:  # a large set: keep the latest ones
            self._posteriors.clear()
            missing = list(range(len(keys)))
        if missing:
            # stacked rows: a list index would be copied to the GPU, a copy that waits for the GPU's queue
            mean, std = backbone.image_posterior(torch.stack([pixels[i] for i in missing]))
            self._posteriors.update({keys[i]: (m, s) for i, m, s in zip(missing, mean, std)})
        mean, std = (torch.stack(parts) for parts in zip(*(self._posteriors[key] for key in keys)))
        return backbone.posterior_latents(mean, std, g)

    def diffusion_loss(self, pixels: torch.Tensor, prompts: Sequence[str],
                       generator: torch.Generator | None = None, keys: Sequence[str] | None = None) -> torch.Tensor:
        """The latent diffusion loss || eps - eps_theta(z_t, t, c(y)) ||^2 (the v / epsilon target the
        scheduler predicts) of images in [-1, 1] under their prompts, with one random timestep each; on a
        rectified-flow backbone (SD3, FLUX) the flow-matching loss || (noise - z) - v_theta(z_t, t, c(y)) ||^2
        with logit-normal t (Esser et al. 2024, eq. 3 and Sec. 3.1). Noise and timesteps come from `generator`
        (default: this step's), timesteps as the backbone samples them; `keys` name the images (image_latents)."""
        return self.diffusion_losses([LossBatch(pixels, prompts, generator, keys)])[0]

    def diffusion_losses(self, batches: Sequence[LossBatch]) -> list[torch.Tensor]:
        """`diffusion_loss` of each batch, from one UNet call over all of them (as DreamBooth's prior preservation
        joins instance and class images): one graph replay a step, where two calls of one signature would leave
        the second eager. Each batch draws its noise and timesteps from its own generator, as alone."""
        backbone, parts = self.backbone, []
        for batch in batches:
            g = batch.generator or self.step_generator()
            latents = self.image_latents(batch.pixels, g, batch.keys)
            noise = torch.randn(latents.shape, generator=g, device=self.device, dtype=latents.dtype)
            parts.append((latents, noise, backbone.sample_timesteps(latents.shape[0], g)))
        joined = len({latents.shape[1:] for latents, _, _ in parts}) == 1  # else latents of other sizes: a call each
        losses = []
        for group in [range(len(parts))] if joined else [[i] for i in range(len(parts))]:
            latents, noise, t = (torch.cat(x) for x in zip(*(parts[i] for i in group)))
            prompts = [p for i in group for p in batches[i].prompts]
            pred = backbone.predict(backbone.add_noise(latents, noise, t), t, backbone.encode_prompt(prompts))
            target = backbone.training_target(latents, noise, t)
            sizes = [len(parts[i][0]) for i in group]
            losses += [F.mse_loss(p.float(), q.float()) for p, q in zip(pred.split(sizes), target.split(sizes))]
        return losses

    # ----- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        missing = sorted(self.trainable_keys() - set(state))
        if missing:
            raise ArtifactError(f"checkpoint lacks trained weights {missing[:3]}; it was written by another "
                                f"method or config: resume with the same method, model and token settings")
        params = dict(self.named_parameters())
        for key in sorted(self.trainable_keys()):
            if tuple(state[key].shape) != tuple(params[key].shape):
                raise ArtifactError(f"checkpoint's {key} has shape {tuple(state[key].shape)}, this run's "
                                    f"{tuple(params[key].shape)}: it was trained on another backbone or with other "
                                    f"settings; resume with the same model and settings")

    # ----- sampling (the callbacks' interface) ----------------------------------------------------
    def sampling_prompt(self, template: str, class_word: str) -> str:
        """The prompt the model reads for a template whose '{}' stands for what the method learns (a
        method that learns no token reads the class word there)."""
        return fill_template(template, class_word)

    @contextlib.contextmanager
    def sampling_setting(self, prompts: Sequence[str] | None = None, **setting) -> Iterator[AttentionHub | None]:
        """Apply a sampling-time setting of what is trained (a slider's strength, LAG on/off) for a batch of
        prompts; yields the attention hub the sampler must drive (None when the setting needs none)."""
        if setting:
            raise ConfigError(f"{type(self).__name__} has no sampling setting {sorted(setting)}; sweep a generation "
                              f"setting (num_steps, guidance_scale, negative_prompt) instead")
        yield None

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: Sequence[int], setting: dict | None = None, num_steps: int = 25,
               guidance_scale: float = 7.5, negative_prompt: str = "") -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] of already-filled prompts, one seed each, under a setting that may
        mix generation keys (num_steps, guidance_scale, negative_prompt) with the method's own."""
        setting = dict(setting or {})
        generation = {"num_steps": num_steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
        generation.update({k: setting.pop(k) for k in list(setting) if k in generation})
        with self.sampling_setting(prompts=prompts, **setting) as hub:
            return generate(self.backbone, prompts, seed=list(seeds), encode=self.prompt_encoder(), hub=hub,
                            **generation)

    def prompt_encoder(self) -> Callable | None:
        """How sampling encodes prompts, when not as the backbone does (a slider that edits text states)."""
        return None

    # ----- artifacts -------------------------------------------------------------------------------
    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        """Write the method's artifact files (in formats other tools read); return their paths."""
        return []
