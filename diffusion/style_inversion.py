"""StyleDiffusion (paper 003): real-image inversion into the value input of cross-attention (Algorithm 1).

Per image x with source prompt p (embedding c), a DDIM inversion at guidance 1 gives the trajectory
z*_0 .. z*_T and the 16x16 cross maps a*_t (`diffusion.inversion.invert_image`). Algorithm 1 then fits one
mapping network M_t per sampling step (diffusion/mapping.py) on the frozen CLIP image tokens E(x)
(diffusion/image_encoder.py): for sampling step i = 0..T-1 (t = T -> 1), starting from z~_T = z*_T,

  1. warm start: M_i <- M_{i-1};
  2. K_i inner Adam iterations on L = L_rec + L_att (eq. 8):
       L_rec = MSE(DDIM step (eq. 6) of the w = 7.5 guided prediction from z~_t, z*_{t-1})  (eq. 5)
       L_att = MSE(16x16 cross maps of that UNet call, the trajectory's maps)            (eq. 7)
     stopping early once the loss is below early_stop + i * early_stop_growth (the authors' code);
  3. z~_{t-1} <- the guided DDIM step with the trained M_i.

Only the conditional branch reads M_i, and z~_t and t stay fixed through step i's iterations, so the
unconditional prediction is computed once per step (no gradients) and each inner iteration runs the
conditional branch alone at batch 1: the same loss and gradients as one guided call, half the UNet work.
On a GPU with a frozen UNet that call, with its backward to the values, replays CUDA graphs
(`ValueBranch`; cuda_graphs=False runs it eager): at batch 1 it is bound by kernel launches.

The mapped embedding M_i(E(x)) is the VALUE input of every cross-attention layer of the conditional
branch (the hub processor's `value_hidden_states`); keys keep c, and the unconditional branch reads
the plain "" embedding for both keys and values.

Inner iterations. The paper writes K_t = e^{-t} K with K = 100 "the starting number of inner
iterations", t = T .. 1. Taken literally (t = 30 first) the first steps would get e^{-30} K ~ 0
iterations, contradicting "starting number"; it is read with t counted from the first sampling step
(t = i = 0 at t = T), so K_0 = K: `inner.schedule="paper"`: K_i = ceil(K e^{-i}) (100, 37, 14, 5, 2,
1, 1, ...). The authors' code decays slower, `inner.schedule="code"`: K_i = ceil(K e^{-0.1 i}).
Both give at least one iteration per step.

Optimiser. `adam.preset="paper"` (Sec. 4.1): lr 1e-4, betas (0, 0.999), constant; `"code"`:
lr 1e-2 (1 - i / 100) at step i, torch's default betas (0.9, 0.999). `lr`, `betas`, `lr_decay`
override a preset. One torch Adam holds a parameter group per M_i (lr set per step); only M_i has
gradients at step i, so the other groups are untouched and each M_i's moments start fresh.

`StyleDiffusionFitter` runs it on one image at a time with its own Adam; a training loop hands it its
optimizer and backward instead (lightning_modules/style_diffusion.py). Each image starts from freshly
drawn N(0, 0.01) weights. The result, a `StyleInversion`, is replayed and edited by
diffusion/style_editing.py and written / read by `save_inversion` / `load_inversion`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusion.attention import AttentionHub, AttentionStore
from diffusion.backbone import Backbone, Conditioning
from diffusion.cuda_graphs import GraphedCalls, graphs_available
from diffusion.image_encoder import ImageEncoder
from diffusion.inversion import Trajectory, optimise_until_below, step_maps
from diffusion.mapping import MappingNetworks, MappingSettings
from diffusion.sampling import DDIMSchedule
from utils.checks import check_whole, is_number
from utils.errors import ArtifactError, ConfigError
from utils.io import write_json, write_safetensors
from utils.settings import Settings, check_choice

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mapping_networks.safetensors"
INFO_FILE = "style_diffusion.json"
SETTINGS_YAML = Path(__file__).resolve().parents[1] / "conf" / "style_diffusion" / "settings.yaml"
INNER_RATES = {"paper": 1.0, "code": 0.1}  # K_i = ceil(K exp(-rate i))
# the named Adam presets (module.adam.preset): the paper's numbers and the authors' code's
ADAM_PRESETS = {"paper": {"lr": 1e-4, "betas": (0.0, 0.999), "lr_decay": 0.0},    # Sec. 4.1
                "code": {"lr": 1e-2, "betas": (0.9, 0.999), "lr_decay": 1e-2}}    # authors' code: lr 1e-2 (1 - i/100)


def inner_iterations(i: int, K: int, schedule: str) -> int:
    """K_i of sampling step i (0 = the noisiest): ceil(K exp(-rate i)), rate 1 (paper) or 0.1 (code)."""
    if schedule not in INNER_RATES:
        raise ConfigError(f"module.inner.schedule={schedule!r} is unknown; use one of {sorted(INNER_RATES)}")
    return max(1, math.ceil(K * math.exp(-INNER_RATES[schedule] * i)))


def adam_settings(preset: str, lr: float | None = None, betas: Sequence[float] | None = None,
                  lr_decay: float | None = None) -> dict:
    """{lr, betas, lr_decay} of a preset (paper | code) with explicit values overriding it."""
    if preset not in ADAM_PRESETS:
        raise ConfigError(f"module.adam.preset={preset!r} is unknown; use one of {sorted(ADAM_PRESETS)}")
    out = dict(ADAM_PRESETS[preset])
    for key, value in (("lr", lr), ("betas", betas), ("lr_decay", lr_decay)):
        if value is not None:
            out[key] = tuple(float(b) for b in value) if key == "betas" else float(value)
    return out


@dataclass(frozen=True)
class InnerSettings(Settings):
    """module.inner: Algorithm 1's starting number of inner iterations K and the schedule (paper | code)."""

    key = "module.inner"
    K: int
    schedule: str

    def __post_init__(self):
        check_whole(f"{self.key}.K", self.K, 1)
        check_choice(f"{self.key}.schedule", self.schedule, tuple(INNER_RATES))


@dataclass(frozen=True)
class AdamSettings(Settings):
    """module.adam: a preset of ADAM_PRESETS (paper | code) and the values that override it (None: the preset's)."""

    key = "module.adam"
    preset: str
    lr: float | None
    betas: Sequence[float] | None
    lr_decay: float | None

    def __post_init__(self):
        check_choice(f"{self.key}.preset", self.preset, tuple(ADAM_PRESETS))
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise ConfigError(f"{self.key}.{name}={value!r} must be a number (or null: the preset's)")
        if self.betas is not None and not (len(self.betas) == 2 and all(is_number(b) for b in self.betas)):
            raise ConfigError(f"{self.key}.betas={self.betas!r} must be two numbers (or null: the preset's)")

    def resolved(self) -> dict:
        """{lr, betas, lr_decay}: the preset's values with the set ones replacing them."""
        return adam_settings(self.preset, self.lr, self.betas, self.lr_decay)


@dataclass
class FitSettings:
    """What Algorithm 1 reads besides the image: T, w, the inner-iteration schedule, Adam, early stop, loss weight.

    `inner` and `adam` take the config's sections (dicts, checked by `from_config`, or the settings); a bad
    schedule or preset stops here, before any model is loaded. `from_yaml` gives conf/style_diffusion/settings.yaml's
    values to callers without a config.
    """

    num_steps: int
    guidance_scale: float
    inner: InnerSettings
    adam: AdamSettings
    early_stop: float
    early_stop_growth: float
    attention_weight: float
    map_blocks: tuple[str, ...] = ("down", "up")  # the UNet blocks whose 16x16 maps L_att compares (the trajectory's)

    def __post_init__(self):
        self.num_steps, self.guidance_scale = int(self.num_steps), float(self.guidance_scale)
        self.inner = InnerSettings.from_config(self.inner)
        self.adam = AdamSettings.from_config(self.adam)
        self.early_stop, self.early_stop_growth = float(self.early_stop), float(self.early_stop_growth)
        self.attention_weight = float(self.attention_weight)
        self.map_blocks = tuple(self.map_blocks)

    @classmethod
    def from_yaml(cls, num_steps: int, guidance_scale: float, **overrides) -> FitSettings:
        """conf/style_diffusion/settings.yaml's Algorithm 1, `overrides` replacing its values (nested dicts merge)."""
        from omegaconf import OmegaConf

        yaml = OmegaConf.load(SETTINGS_YAML)
        fields = ("inner", "adam", "early_stop", "early_stop_growth", "attention_weight")
        values = OmegaConf.to_container(OmegaConf.merge({k: yaml[k] for k in fields}, overrides))
        return cls(num_steps, guidance_scale, **values)

    @property
    def optimizer(self) -> dict:
        """Adam's resolved {lr, betas, lr_decay}."""
        return self.adam.resolved()

    def inner_iterations(self, i: int) -> int:
        return inner_iterations(i, self.inner.K, self.inner.schedule)

    def step_lr(self, i: int) -> float:
        adam = self.optimizer
        return adam["lr"] * (1 - i * adam["lr_decay"])

    def step_threshold(self, i: int) -> float:
        return self.early_stop + i * self.early_stop_growth


# ----- value injection -----------------------------------------------------------------------------
def value_rows(uncond: Conditioning, cond_values: torch.Tensor, guided: bool) -> torch.Tensor:
    """The processor's value input for a batch: [uncond's "" embedding; cond_values] under CFG."""
    if not guided:
        return cond_values
    u = uncond.expand(cond_values.shape[0]).hidden_states
    return torch.cat([u.to(cond_values.dtype), cond_values])


class ValueBranch:
    """One branch of Algorithm 1's UNet call: (z~_t, t, conditioning, values) -> (epsilon, the r x r cross maps
    averaged over the chosen blocks' layers [r, r, K]), the conditioning's hidden states as keys and `values` as
    the cross-attention value input, through the hub. On a GPU with a frozen UNet (and cuda_graphs) each call, and
    with gradients on its backward to the values, replays a CUDA graph captured at the first call of its signature.
    """

    def __init__(self, backbone: Backbone, hub: AttentionHub, blocks: Sequence[str], resolution: int,
                 cuda_graphs: bool = True):
        self.backbone, self.hub, self.resolution = backbone, hub, resolution
        self.store = AttentionStore(cross=True, blocks=blocks, resolutions=[resolution], with_grad=True)
        self.graphs = GraphedCalls(self._call, name="StyleDiffusion graph", log_level=logging.DEBUG) \
            if cuda_graphs and graphs_available(backbone) else None

    def _call(self, x: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              *added: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store.reset()
        with self.hub.using(self.store), self.hub.sampling_state(cfg=False):
            out = self.backbone.predict(x, t, Conditioning(keys, *added), {"value_hidden_states": values})
        maps = step_maps(self.store, self.resolution)[0, 0]
        self.store.reset()
        return self.backbone.to_epsilon(out, x, t), maps

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                 values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.backbone.dtype
        args = [x.to(dtype), t.reshape(1).expand(x.shape[0]), cond.hidden_states.to(dtype), values.to(dtype)]
        if cond.pooled is not None:
            args += [cond.pooled.to(dtype), cond.time_ids.to(dtype)]
        return (self._call if self.graphs is None else self.graphs)(*args)


@dataclass
class StyleInversion:
    """One image's inversion: what replay and editing need."""

    prompt: str
    features: torch.Tensor  # E(x) [1, tokens, dim]
    latent_T: torch.Tensor  # z*_T [1, C, h, w]
    mappings: MappingNetworks
    guidance_scale: float = 7.5
    name: str = "image"
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.mappings)

    @torch.no_grad()
    def values(self, cond: Conditioning) -> list[torch.Tensor]:
        """M_i(E(x)) of every step (FiLM variants read the source embedding `cond`), on the networks' device."""
        features = self.features.to(next(self.mappings.parameters()).device)
        return [net(features, cond.hidden_states) for net in self.mappings.nets]


# ----- Algorithm 1 ----------------------------------------------------------------------------------
class StyleDiffusionFitter:
    """Algorithm 1 on one image at a time, around a frozen backbone and image encoder; trains `mappings`.

    `fit` steps its own Adam (created on first use) unless given an optimizer and a backward function (a
    training loop's); either way each image starts from fresh weights and fresh Adam moments.
    """

    def __init__(self, backbone: Backbone, encoder: ImageEncoder, mappings: MappingNetworks, settings: FitSettings,
                 cuda_graphs: bool = True):
        self.backbone, self.encoder, self.mappings, self.settings = backbone, encoder, mappings, settings
        self.cuda_graphs = cuda_graphs  # replay the UNet calls from CUDA graphs where they can (`ValueBranch`)
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def create(cls, backbone: Backbone, encoder: ImageEncoder, settings: FitSettings,
               mapping: MappingSettings | dict | None = None, cuda_graphs: bool = True) -> "StyleDiffusionFitter":
        """A fitter with T mapping networks sized for the encoder's tokens and the UNet's width (`mapping`:
        MappingNetwork's film, negative_slope, init_std; None: MappingNetwork's Table 1 network), on the
        backbone's device; cuda_graphs=False keeps its UNet calls eager on a GPU."""
        mapping = {} if mapping is None else MappingSettings.from_config(mapping).as_dict()
        width = backbone.unet.config.cross_attention_dim
        mappings = MappingNetworks(
            settings.num_steps, tokens_in=encoder.num_tokens, tokens_out=backbone.tokenizers[0].model_max_length,
            feature_dim=encoder.hidden_size, out_dim=width, **mapping).to(backbone.device)
        log.info("StyleDiffusion: %d mapping networks, E(x) %d x %d -> values 77 x %d%s", settings.num_steps,
                 encoder.num_tokens, encoder.hidden_size, width,
                 "" if width == encoder.hidden_size else " (with a width projection)")
        return cls(backbone, encoder, mappings, settings, cuda_graphs)

    def new_optimizer(self) -> torch.optim.Adam:
        """One Adam, a parameter group per M_i (its lr is set when step i is trained)."""
        adam = self.settings.optimizer
        groups = [{"params": list(net.parameters()), "lr": adam["lr"]} for net in self.mappings.nets]
        return torch.optim.Adam(groups, lr=adam["lr"], betas=tuple(adam["betas"]))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The fitter's own Adam, for callers without a training loop."""
        if self._optimizer is None:
            self._optimizer = self.new_optimizer()
        return self._optimizer

    def fit(self, hub: AttentionHub, pixels: torch.Tensor, prompt: str, trajectory: Trajectory, name: str = "image",
            generator: torch.Generator | None = None, optimizer: torch.optim.Optimizer | None = None,
            backward: Callable[[torch.Tensor], None] | None = None) -> StyleInversion:
        """Algorithm 1 on one image ([1, 3, H, W] or [3, H, W] in [-1, 1]) and its trajectory, driving the
        UNet through `hub`; M_t start from weights drawn with `generator`."""
        backbone, s, n = self.backbone, self.settings, self.settings.num_steps
        if trajectory.num_steps != n:
            raise ConfigError(f"the trajectory has {trajectory.num_steps} steps, module.num_steps is "
                              f"{n}; invert with data.num_steps={n}")
        optimizer = self.optimizer if optimizer is None else optimizer
        backward = backward or (lambda loss: loss.backward())
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        device = backbone.device
        features = self.encoder(pixels.to(device))
        cond, uncond = backbone.encode_prompt([prompt]), backbone.encode_prompt([""])
        latents, maps = trajectory.latents.to(device), trajectory.maps.to(device)
        resolution = maps.shape[1]
        schedule = DDIMSchedule(backbone.scheduler.config, n, device)
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # a training loop may wrap it
        self.mappings.reset_parameters(generator)
        for p in self.mappings.parameters():
            torch_optimizer.state.pop(p, None)  # fresh Adam moments for a new image
        branch = ValueBranch(backbone, hub, s.map_blocks, resolution, self.cuda_graphs)
        guided = s.guidance_scale != 1.0
        x = latents[n][None].to(backbone.dtype)
        iterations, losses = [], []
        for i in range(n):
            t = schedule.timestep(i)
            a_from, a_to = schedule.alpha(i), schedule.alpha(i + 1)
            target, target_map = latents[n - 1 - i][None].float(), Trajectory(latents, maps).step_map(i)
            self.mappings.warm_start(i)
            net = self.mappings[i]
            torch_optimizer.param_groups[i]["lr"] = s.step_lr(i)
            with hub.sampling_state(step=i, num_steps=n):
                with torch.no_grad():  # "" keys and values
                    eps_u = branch(x, t, uncond, uncond.hidden_states)[0].float() if guided else None

                def guided_eps(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    eps_c, cond_maps = branch(x, t, cond, values)
                    eps = eps_u + s.guidance_scale * (eps_c.float() - eps_u) if guided else eps_c.float()
                    return eps, cond_maps

                def loss_and_gradient() -> torch.Tensor:
                    eps, cond_maps = guided_eps(net(features, cond.hidden_states))
                    rec = F.mse_loss(schedule.step(x, eps, a_from, a_to), target)  # eq. (5)
                    att = F.mse_loss(cond_maps.float(), target_map.float())  # eq. (7)
                    loss = rec + s.attention_weight * att  # eq. (8)
                    optimizer.zero_grad(set_to_none=True)
                    backward(loss)
                    return loss

                with torch.enable_grad():
                    done, loss_value = optimise_until_below(loss_and_gradient, optimizer.step,
                                                            s.inner_iterations(i), s.step_threshold(i))
                with torch.no_grad():
                    eps = guided_eps(net(features, cond.hidden_states))[0]
                    x = schedule.step(x, eps, a_from, a_to).to(backbone.dtype)
            iterations.append(done)
            losses.append(loss_value)
        optimizer.zero_grad(set_to_none=True)
        return StyleInversion(prompt, features.detach().cpu(), latents[n][None].cpu(), self.mappings,
                              s.guidance_scale, name, iterations, losses)


# ----- artifacts -----------------------------------------------------------------------------------
def save_inversion(folder: str | Path, inversion: StyleInversion, extra: dict | None = None) -> list[Path]:
    """mapping_networks.safetensors (M_t weights, E(x), z*_T) and style_diffusion.json (settings)."""
    folder = Path(folder)
    tensors = {f"mappings.{k}": v for k, v in inversion.mappings.state_dict().items()}
    tensors.update(features=inversion.features, latent_T=inversion.latent_T)
    weights, info = folder / WEIGHTS_FILE, folder / INFO_FILE
    write_safetensors(weights, tensors, metadata={"method": "style_diffusion", "prompt": inversion.prompt})
    write_json(info, {"method": "style_diffusion", "image": inversion.name, "prompt": inversion.prompt,
                      "num_steps": inversion.num_steps, "guidance_scale": inversion.guidance_scale,
                      "mapping": inversion.mappings.settings, "iterations": inversion.iterations,
                      "losses": inversion.losses, "file": WEIGHTS_FILE, **(extra or {})})
    return [weights, info]


def load_inversion(folder: str | Path) -> StyleInversion:
    """A StyleInversion written by `save_inversion`."""
    folder = Path(folder)
    info_path, weights = folder / INFO_FILE, folder / WEIGHTS_FILE
    if not info_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{folder} lacks {INFO_FILE} or {WEIGHTS_FILE}; give a folder StyleDiffusion exported")
    info = json.loads(info_path.read_text())
    tensors = load_file(str(weights))
    mappings = MappingNetworks(int(info["num_steps"]), **info["mapping"])
    mappings.load_state_dict({k[len("mappings."):]: v for k, v in tensors.items() if k.startswith("mappings.")})
    return StyleInversion(info["prompt"], tensors["features"], tensors["latent_T"], mappings,
                          float(info["guidance_scale"]), info.get("image", "image"), info.get("iterations", []),
                          info.get("losses", []))
