"""StyleDiffusion (paper 003): real-image inversion into the value input of cross-attention, and
P2Plus editing.

Per image x with source prompt p (embedding c), a DDIM inversion at guidance 1 gives the trajectory
z*_0 .. z*_T and the 16x16 cross maps a*_t (datamodules/trajectories.py). Algorithm 1 then fits one
mapping network M_t per sampling step (diffusion/mapping.py) on the frozen CLIP image tokens E(x)
(diffusion/image_encoder.py): for sampling step i = 0..T-1 (t = T -> 1), starting from
z~_T = z*_T,

  1. warm start: M_i <- M_{i-1};
  2. K_i inner Adam iterations on L = L_rec + L_att (eq. 8):
       L_rec = MSE(DDIM step (eq. 6) of the w = 7.5 guided prediction from z~_t, z*_{t-1})  (eq. 5)
       L_att = MSE(16x16 cross maps of that UNet call, the trajectory's maps)            (eq. 7)
     stopping early once the loss is below early_stop + i * early_stop_growth (the authors' code);
  3. z~_{t-1} <- the guided DDIM step with the trained M_i.

The mapped embedding M_i(E(x)) is the VALUE input of every cross-attention layer of the conditional
branch (the hub processor's `value_hidden_states`); keys keep c, and the unconditional branch reads
the plain "" embedding for both keys and values.

Inner iterations. The paper writes K_t = e^{-t} K with K = 100 "the starting number of inner
iterations", t = T .. 1. Taken literally (t = 30 first) the first steps would get e^{-30} K ~ 0
iterations, contradicting "starting number"; it is read with t counted from the first sampling step
(t = i = 0 at t = T), so K_0 = K: `inner_schedule="paper"`: K_i = ceil(K e^{-i}) (100, 37, 14, 5, 2,
1, 1, ...). The authors' code decays slower, `inner_schedule="code"`: K_i = ceil(K e^{-0.1 i}).
Both give at least one iteration per step.

Optimiser. `adam="paper"` (Sec. 4.1): lr 1e-4, betas (0, 0.999), constant; `adam="code"`:
lr 1e-2 (1 - i / 100) at step i, torch's default betas (0.9, 0.999). `lr`, `betas`, `lr_decay`
override a preset. One torch Adam holds a parameter group per M_i (lr set per step); only M_i has
gradients at step i, so the other groups are untouched and each M_i's moments start fresh.

Lightning. Manual optimisation; one `training_step` is one image: the whole of Algorithm 1 for it,
each inner iteration one `optimizer.step()` (so `global_step` counts Adam updates). The trajectory
data module streams images (batch 1) and the module stops the run (`trainer.should_stop`) once every
image of the folder is done; `trainer.max_steps` is -1. Each image starts from freshly drawn
N(0, 0.01) weights, and its trained networks are exported as soon as they are done
(`out_dir/style_diffusion/<image stem>/`: mapping_networks.safetensors, with E(x) and z*_T, and
style_diffusion.json with the settings), so a run's checkpoint only holds the image in progress.

Replay and editing. `reconstruct` samples from z*_T with the source prompt, w = 7.5, M_i's values
at step i. `edit` samples [source, targets] in one batch: the source row as `reconstruct`, each
target row with the target prompt as keys and M_i's values for steps i < tau_v T, the target
prompt's own embedding as values after; a prompt-to-prompt controller (AttentionReplace for
equal word counts, else AttentionRefine) with tau_c, tau_s and P2Plus's tau_u
(`uncond_self_steps`: the unconditional branch's self-attention replaced too), and with `blend_words`
prompt-to-prompt's LocalBlend (diffusion/attention.py): target rows change only where the blend words
attend.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from datamodules.trajectories import Trajectory, step_maps
from diffusion.attention import (AttentionHub, AttentionRefine, AttentionReplace, AttentionStore, LocalBlend,
                                 prompt_words)
from diffusion.backbone import Backbone, Conditioning
from diffusion.image_encoder import ENCODER_KEY, ImageEncoder, ensure_encoder
from diffusion.mapping import MappingNetworks
from diffusion.sampling import DDIMSchedule, ddim_sample, guided_epsilon
from lightning_modules.base import DiffusionModule
from utils.errors import ArtifactError, ConfigError
from utils.io import write_json, write_safetensors

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mapping_networks.safetensors"
INFO_FILE = "style_diffusion.json"
INNER_RATES = {"paper": 1.0, "code": 0.1}  # K_i = ceil(K exp(-rate i))
ADAM_PRESETS = {"paper": {"lr": 1e-4, "betas": (0.0, 0.999), "lr_decay": 0.0},    # Sec. 4.1
                "code": {"lr": 1e-2, "betas": (0.9, 0.999), "lr_decay": 1e-2}}    # lr 1e-2 (1 - i/100)


def inner_iterations(i: int, K: int = 100, schedule: str = "paper") -> int:
    """K_i of sampling step i (0 = the noisiest): ceil(K exp(-rate i)), rate 1 (paper) or 0.1 (code)."""
    if schedule not in INNER_RATES:
        raise ConfigError(f"module.inner.schedule={schedule!r} is unknown; use one of {sorted(INNER_RATES)}")
    return max(1, math.ceil(K * math.exp(-INNER_RATES[schedule] * i)))


def adam_settings(preset: str = "paper", lr: float | None = None, betas: Sequence[float] | None = None,
                  lr_decay: float | None = None) -> dict:
    """{lr, betas, lr_decay} of a preset (paper | code) with explicit values overriding it."""
    if preset not in ADAM_PRESETS:
        raise ConfigError(f"module.adam.preset={preset!r} is unknown; use one of {sorted(ADAM_PRESETS)}")
    out = dict(ADAM_PRESETS[preset])
    for key, value in (("lr", lr), ("betas", betas), ("lr_decay", lr_decay)):
        if value is not None:
            out[key] = tuple(float(b) for b in value) if key == "betas" else float(value)
    return out


# ----- value injection -----------------------------------------------------------------------------
def value_rows(uncond: Conditioning, cond_values: torch.Tensor, guided: bool) -> torch.Tensor:
    """The processor's value input for a batch: [uncond's "" embedding; cond_values] under CFG."""
    if not guided:
        return cond_values
    u = uncond.expand(cond_values.shape[0]).hidden_states
    return torch.cat([u.to(cond_values.dtype), cond_values])


def mapped_epsilon(backbone: Backbone, hub: AttentionHub, latents: torch.Tensor, t: torch.Tensor,
                   cond: Conditioning, uncond: Conditioning, values: torch.Tensor,
                   guidance_scale: float) -> torch.Tensor:
    """Guided epsilon whose conditional branch reads `values` as the cross-attention value input."""
    guided = guidance_scale != 1.0
    kwargs = {"value_hidden_states": value_rows(uncond, values, guided)}
    return guided_epsilon(backbone, latents, t, cond, uncond, guidance_scale, hub, kwargs)


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


# ----- replay and editing --------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(backbone: Backbone, hub: AttentionHub, inversion: StyleInversion,
                guidance_scale: float | None = None) -> torch.Tensor:
    """z~_0: sampling from z*_T with the source prompt and M_i's values at step i."""
    w = inversion.guidance_scale if guidance_scale is None else guidance_scale
    cond, uncond = backbone.encode_prompt([inversion.prompt]), backbone.encode_prompt([""])
    values = inversion.values(cond)

    def value_input(i: int) -> dict:  # step i's conditional values: M_i(E(x))
        return {"value_hidden_states": value_rows(uncond, values[i], w != 1.0)}

    return ddim_sample(backbone, cond, inversion.latent_T.to(backbone.device), uncond, inversion.num_steps, w,
                       hub=hub, cross_attention_kwargs=value_input)


def edit_controller(tokenizer, source: str, targets: Sequence[str], mode: str = "auto", tau_c: float = 0.6,
                    tau_s: float = 0.8, tau_u: float | None = 0.5):
    """The prompt-to-prompt controller of an edit: replace (equal word counts), refine, or auto."""
    if mode == "auto":
        counts = {len(p.split()) for p in [source, *targets]}  # the words replacement_mapper aligns
        mode = "replace" if len(counts) == 1 else "refine"
    kinds = {"replace": AttentionReplace, "refine": AttentionRefine}
    if mode not in kinds:
        raise ConfigError(f"edit controller {mode!r} is unknown; use auto, replace or refine")
    return kinds[mode].from_prompts(tokenizer, source, list(targets), cross_steps=tau_c, self_steps=tau_s,
                                    uncond_self_steps=tau_u)


BlendWords = Sequence[str | Sequence[str]]  # one entry per prompt, the source's first: a word or a list of words


def check_blend_words(prompts: Sequence[str], blend_words: BlendWords) -> list[list[str]]:
    """blend_words as one list of words per prompt; a one-line ConfigError unless each is made of its prompt's words."""
    names = ["source", *(["target"] if len(prompts) == 2 else [f"target {k}" for k in range(1, len(prompts))])]
    if not isinstance(blend_words, (list, tuple)) or len(blend_words) != len(prompts):
        raise ConfigError(f"blend_words={blend_words!r} needs {len(prompts)} entries, the source prompt's words "
                          f"then each target's, e.g. [cat,dog] or [[cat],[dog,hat]]")
    lists = [[str(w) for w in entry] if isinstance(entry, (list, tuple)) else [str(entry)] for entry in blend_words]
    for name, prompt, words in zip(names, prompts, lists):
        for word in words:
            if word not in prompt_words(prompt):
                raise ConfigError(f"blend word {word!r} is not in the {name} prompt {prompt!r}; blend_words lists "
                                  f"the source prompt's words, then the target's")
    return lists


def edit_blend(tokenizer, prompts: Sequence[str], blend_words: BlendWords | None,
               threshold: float = 0.3) -> LocalBlend | None:
    """Prompt-to-prompt's LocalBlend over [source, *targets]; None (off) when blend_words is None.

    blend_words: one entry per prompt, the source's first, each a word or a list of words of that prompt:
    ["cat", "dog"] for "a cat" -> "a dog", [["cat"], ["cat", "hat"]] for "a cat" -> "a cat with a hat".
    """
    if blend_words is None:
        return None
    return LocalBlend.from_prompts(tokenizer, list(prompts), check_blend_words(prompts, blend_words),
                                   threshold=threshold)


@torch.no_grad()
def edit(backbone: Backbone, hub: AttentionHub, inversion: StyleInversion, targets: Sequence[str] | str,
         tau_v: float = 0.6, tau_c: float = 0.6, tau_s: float = 0.8, tau_u: float | None = 0.5,
         controller: str = "auto", guidance_scale: float | None = None, blend_words: BlendWords | None = None,
         blend_threshold: float = 0.3, sdedit_strength: float | None = None) -> torch.Tensor:
    """Latents [1 + n, C, h, w]: the source's replay, then each target prompt's edit (Sec. 3.4).

    Target rows use the target prompt as keys; their values are M_i(E(x)) for steps i < tau_v T and
    the target prompt's embedding after. The controller edits the conditional maps (tau_c, tau_s) and,
    P2Plus, the unconditional branch's self-attention for steps < tau_u T. With `blend_words` (see
    `edit_blend`) LocalBlend keeps each target row to where its words and the source's attend.

    `sdedit_strength` s: StyleDiffusion + SDEdit (Sec. 5.2.5) instead of prompt-to-prompt. The target
    rows follow the source's replay (the inversion's own noisy latents, not fresh noise) until step
    round((1 - s) T), then denoise with their prompt and the same value rule, with no attention control.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    w = inversion.guidance_scale if guidance_scale is None else guidance_scale
    n, steps = len(targets), inversion.num_steps
    cond = backbone.encode_prompt([inversion.prompt, *targets])
    uncond = backbone.encode_prompt([""])
    source_cond = Conditioning(cond.hidden_states[:1])
    values = inversion.values(source_cond)
    target_text = cond.hidden_states[1:].float()

    def rows(i: int) -> torch.Tensor:
        mapped = i < tau_v * steps
        tgt = values[i].expand(n, *values[i].shape[1:]) if mapped else target_text
        return value_rows(uncond, torch.cat([values[i], tgt.to(values[i].dtype)]), w != 1.0)

    from diffusion.editing import sdedit_start

    sdedit = sdedit_strength is not None
    follow = sdedit_start(steps, sdedit_strength) if sdedit else 0  # the first step the targets take themselves
    p2p = None if sdedit else edit_controller(backbone.tokenizers[0], inversion.prompt, targets, controller, tau_c,
                                              tau_s, tau_u)
    blend = edit_blend(backbone.tokenizers[0], [inversion.prompt, *targets], blend_words, blend_threshold)

    def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
        if i < follow:  # x is the input of step i + 1 <= follow: the targets take the source's latent
            x = x[:1].expand_as(x).clone()
        return x if blend is None else blend.blend(i, x)

    start = inversion.latent_T.to(backbone.device).expand(1 + n, *inversion.latent_T.shape[1:])
    with hub.using(*[c for c in (p2p, blend) if c is not None]):  # the blend after p2p: it reads the edited maps
        return ddim_sample(backbone, cond, start, uncond, steps, w, hub=hub,
                           cross_attention_kwargs=lambda i: {"value_hidden_states": rows(i)},
                           step_callback=after_step if follow or blend is not None else None)


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


# ----- the module ----------------------------------------------------------------------------------
class StyleDiffusionModule(DiffusionModule):
    """Algorithm 1 of StyleDiffusion, one image per training step (see the module docstring)."""

    def __init__(self, backbone: dict, image_encoder: dict, num_steps: int = 30, guidance_scale: float = 7.5,
                 mapping: dict | None = None, inner: dict | None = None, adam: dict | None = None,
                 early_stop: float = 1e-5, early_stop_growth: float = 2e-5, attention_weight: float = 1.0,
                 editing: dict | None = None, out_dir: str | None = None, seed: int = 0):
        super().__init__(backbone, optimizer=None, lr_scheduler=None, seed=seed)
        self.automatic_optimization = False
        self.encoder_config = {"path": None, "build": None, **dict(image_encoder)}
        if not self.encoder_config["path"]:
            raise ConfigError(f"{ENCODER_KEY} is not set; give a local CLIP vision model folder")
        self.num_steps, self.guidance_scale = int(num_steps), float(guidance_scale)
        self.mapping_config = {"film": False, "negative_slope": 0.01, "init_std": 0.01, **dict(mapping or {})}
        self.inner = {"K": 100, "schedule": "paper", **dict(inner or {})}
        inner_iterations(0, self.inner["K"], self.inner["schedule"])  # check the schedule's name now
        self.adam = adam_settings(**{"preset": "paper", **dict(adam or {})})
        self.early_stop, self.early_stop_growth = float(early_stop), float(early_stop_growth)
        self.attention_weight = float(attention_weight)
        self.editing = {"tau_v": 0.6, "tau_c": 0.6, "tau_s": 0.8, "tau_u": 0.5, "controller": "auto",
                        "blend_words": None, "blend_threshold": 0.3, "sdedit_strength": None, **dict(editing or {})}
        self.out_dir = Path(out_dir) if out_dir else None
        self.save_hyperparameters({"backbone": self.backbone_config, "image_encoder": self.encoder_config,
                                   "num_steps": num_steps, "guidance_scale": guidance_scale,
                                   "mapping": self.mapping_config, "inner": self.inner, "adam": self.adam,
                                   "early_stop": early_stop, "early_stop_growth": early_stop_growth,
                                   "attention_weight": attention_weight, "editing": self.editing,
                                   "seed": seed}, logger=False)
        self.encoder: ImageEncoder | None = None
        self.mappings: MappingNetworks | None = None
        self.map_blocks: tuple[str, ...] = ("down", "up")
        self.done: set[int] = set()
        self.exported: list[Path] = []
        self.latest: StyleInversion | None = None
        self._standalone_optimizer: torch.optim.Optimizer | None = None

    # ----- model ----------------------------------------------------------------------------------
    def build(self, backbone: Backbone) -> None:
        self.encoder = ensure_encoder(self.encoder_config["path"], self.encoder_config.get("build"),
                                      self.encoder_config.get("key", ENCODER_KEY))
        self.encoder.to(backbone.device)
        width = backbone.unet.config.cross_attention_dim
        self.mappings = MappingNetworks(
            self.num_steps, tokens_in=self.encoder.num_tokens, tokens_out=backbone.tokenizers[0].model_max_length,
            feature_dim=self.encoder.hidden_size, out_dim=width, **self.mapping_config).to(backbone.device)
        log.info("StyleDiffusion: %d mapping networks, E(x) %d x %d -> values 77 x %d%s", self.num_steps,
                 self.encoder.num_tokens, self.encoder.hidden_size, width,
                 "" if width == self.encoder.hidden_size else " (with a width projection)")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam, a parameter group per M_i (its lr is set when step i is trained)."""
        groups = [{"params": list(net.parameters()), "lr": self.adam["lr"]} for net in self.mappings.nets]
        return torch.optim.Adam(groups, lr=self.adam["lr"], betas=tuple(self.adam["betas"]))

    def _optimizer(self):
        """(optimizer, backward): Lightning's under a trainer, a private Adam otherwise (scripts, tests)."""
        if self._trainer is not None:
            return self.optimizers(), self.manual_backward
        if self._standalone_optimizer is None:
            self._standalone_optimizer = self.configure_optimizers()
        return self._standalone_optimizer, lambda loss: loss.backward()

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        datamodule.prepare(self.backbone)  # DDIM trajectories and maps (cached)
        self.map_blocks = tuple(datamodule.hparams.get("map_blocks", self.map_blocks))
        if datamodule.hparams.get("num_steps", self.num_steps) != self.num_steps:
            raise ConfigError(f"data.num_steps={datamodule.hparams.num_steps} differs from module.num_steps="
                              f"{self.num_steps}; the trajectory and the mapping networks need the same T")

    # ----- Algorithm 1 ----------------------------------------------------------------------------
    def step_threshold(self, i: int) -> float:
        return self.early_stop + i * self.early_stop_growth

    def fit_image(self, pixels: torch.Tensor, prompt: str, trajectory: Trajectory, name: str = "image",
                  generator: torch.Generator | None = None) -> StyleInversion:
        """Algorithm 1 on one image ([1, 3, H, W] or [3, H, W] in [-1, 1]) and its trajectory."""
        backbone, hub = self.backbone, self.attention_hub()
        if trajectory.num_steps != self.num_steps:
            raise ConfigError(f"the trajectory has {trajectory.num_steps} steps, module.num_steps is "
                              f"{self.num_steps}; invert with data.num_steps={self.num_steps}")
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        device, n = self.device, self.num_steps
        features = self.encoder(pixels.to(device))
        cond, uncond = backbone.encode_prompt([prompt]), backbone.encode_prompt([""])
        latents = trajectory.latents.to(device)
        maps = trajectory.maps.to(device)
        resolution = maps.shape[1]
        schedule = DDIMSchedule(backbone.scheduler.config, n)
        optimizer, backward = self._optimizer()
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.mappings.reset_parameters(generator)
        for p in self.mappings.parameters():
            torch_optimizer.state.pop(p, None)  # fresh Adam moments for a new image
        store = AttentionStore(cross=True, blocks=self.map_blocks, resolutions=[resolution], cond_only=True,
                               with_grad=True)
        x = latents[n][None].to(backbone.dtype)
        iterations, losses = [], []
        for i in range(n):
            t = schedule.timesteps[i].to(device)
            a_from, a_to = schedule.alpha(i), schedule.alpha(i + 1)
            target, target_map = latents[n - 1 - i][None].float(), Trajectory(latents, maps).step_map(i)
            self.mappings.warm_start(i)
            net = self.mappings[i]
            torch_optimizer.param_groups[i]["lr"] = self.adam["lr"] * (1 - i * self.adam["lr_decay"])
            threshold, done, loss_value = self.step_threshold(i), 0, float("nan")
            with torch.enable_grad():
                for _ in range(inner_iterations(i, self.inner["K"], self.inner["schedule"])):
                    store.reset()
                    values = net(features, cond.hidden_states)
                    with hub.using(store), hub.sampling_state(step=i, num_steps=n, cfg=False):
                        eps = mapped_epsilon(backbone, hub, x, t, cond, uncond, values, self.guidance_scale)
                    rec = F.mse_loss(schedule.step(x, eps, a_from, a_to), target)  # eq. (5)
                    att = F.mse_loss(step_maps(store, resolution)[0].float(), target_map[None].float())  # eq. (7)
                    loss = rec + self.attention_weight * att  # eq. (8)
                    optimizer.zero_grad(set_to_none=True)
                    backward(loss)
                    optimizer.step()
                    loss_value, done = loss.item(), done + 1
                    if loss_value < threshold:
                        break
            store.reset()
            iterations.append(done)
            losses.append(loss_value)
            with torch.no_grad(), hub.sampling_state(step=i, num_steps=n, cfg=False):
                eps = mapped_epsilon(backbone, hub, x, t, cond, uncond, net(features, cond.hidden_states),
                                     self.guidance_scale)
                x = schedule.step(x, eps, a_from, a_to).to(backbone.dtype)
        optimizer.zero_grad(set_to_none=True)
        inversion = StyleInversion(prompt, features.detach().cpu(), latents[n][None].cpu(), self.mappings,
                                   self.guidance_scale, name, iterations, losses)
        self.latest = inversion
        return inversion

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["prompt"]) != 1:
            raise ConfigError(f"StyleDiffusion fits one image at a time; set data.batch_size=1 "
                              f"(got {len(batch['prompt'])})")
        index = int(batch["index"][0])
        datamodule = self.trainer.datamodule
        if index not in self.done:
            name = self._image_name(datamodule, index)
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + index)
            trajectory = Trajectory(batch["latents"][0], batch["maps"][0])
            inversion = self.fit_image(batch["pixel_values"], batch["prompt"][0], trajectory, name, generator)
            self.log_dict({"train/iterations": float(sum(inversion.iterations)),
                           "train/final_loss": float(inversion.losses[-1])}, batch_size=1)
            if self.out_dir is not None and self.trainer.is_global_zero:
                self.exported += self._export(self.out_dir, inversion)
            self.done.add(index)
        total = len(getattr(datamodule, "records", None) or [])
        if total and len(self.done) >= total:
            self.trainer.should_stop = True

    @property
    def batches_done(self) -> int:
        """The data stream's position on resume (a batch takes many optimizer steps): the stream visits
        the images in a fresh order each pass, one per batch, so the batches done are the images done."""
        return len(self.done)

    @staticmethod
    def _image_name(datamodule, index: int) -> str:
        records = getattr(datamodule, "records", None)
        return records[index].image.stem if records else f"{index:04d}"

    # ----- replay, editing, artifacts -------------------------------------------------------------
    def _inversion(self, image: StyleInversion | str | Path | None) -> StyleInversion:
        if image is None:
            if self.latest is None:
                raise ArtifactError("no image has been inverted yet; train first or pass an exported folder")
            return self.latest
        return image if isinstance(image, StyleInversion) else load_inversion(image)

    @torch.no_grad()
    def reconstruct(self, image: StyleInversion | str | Path | None = None, decode: bool = True) -> torch.Tensor:
        """The replay of an inverted image (default: the latest), [1, 3, H, W] in [0, 1] (latents if not decode)."""
        z = reconstruct(self.backbone, self.attention_hub(), self._inversion(image))
        return self.backbone.decode_latents(z) if decode else z

    @torch.no_grad()
    def edit(self, targets: Sequence[str] | str, image: StyleInversion | str | Path | None = None,
             decode: bool = True, **settings) -> torch.Tensor:
        """[source replay, edits...] of an inverted image; settings override module.editing."""
        cfg = {**self.editing, **settings}
        z = edit(self.backbone, self.attention_hub(), self._inversion(image), targets, cfg["tau_v"], cfg["tau_c"],
                 cfg["tau_s"], cfg["tau_u"], cfg["controller"], blend_words=cfg["blend_words"],
                 blend_threshold=cfg["blend_threshold"], sdedit_strength=cfg["sdedit_strength"])
        return self.backbone.decode_latents(z) if decode else z

    def _export(self, root: Path, inversion: StyleInversion) -> list[Path]:
        extra = {"backbone": str(self.backbone_config.get("path")),
                 "image_encoder": str(self.encoder_config["path"]), "inner": self.inner,
                 "adam": {**self.adam, "betas": list(self.adam["betas"])}, "attention_weight": self.attention_weight,
                 "early_stop": [self.early_stop, self.early_stop_growth], "editing": self.editing}
        paths = save_inversion(root / "style_diffusion" / inversion.name, inversion, extra)
        log.info("wrote %s", paths[0].parent)
        return paths

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        """Every image exported during the run, plus the latest one under out_dir if it went elsewhere."""
        out = Path(out_dir)
        if self.latest is not None and (self.out_dir is None or self.out_dir != out):
            self.exported += self._export(out, self.latest)
        return list(dict.fromkeys(self.exported))

    # ----- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["style_diffusion_done"] = sorted(self.done)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.done = set(checkpoint.get("style_diffusion_done", []))
