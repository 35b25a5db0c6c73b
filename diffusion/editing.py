"""Real-image editing methods compared on the same terms (StyleDiffusion, paper 003, Sec. 4.3).

A method is a dataclass of its settings, checked on construction, whose call runs it; the yaml
conf/edit_method/<name>.yaml names the class (`_target_`) and holds every setting with its source (the one place
for defaults). edit.py builds it with Hydra (`edit_method=<name>`), Python code with `load_edit_method(name)`:

    method(backbone, z0 [1, C, h, w], source, target, num_steps=None (the method's own), guidance_scale=7.5,
           seed=0, pixels=None) -> latents [2, C, h, w] = [reconstruction of the source, the edit]

both rows sampled in one batch with the same start latent, steps and guidance. `method.check_prompts(source,
target)` stops prompts the method cannot edit (a replace controller's word counts, LocalBlend's words) before
any model loads; the call checks them again. Adding a method: one class here and its yaml.

- `DDIMWordSwap` (ddim_word_swap): DDIM inversion at guidance 1 with the source prompt, then guided sampling of
  [source, target] from z_N with the plain "" unconditional embedding and no attention control.
- `SDEdit` (sdedit): z_0 noised to `strength` s with generator seed `seed`, then [source, target] denoised from
  there. The start step is round((1 - s) N): s = 0 runs no step and returns z_0 itself (both rows); s = 1 starts
  at step 0 from pure noise (the text-to-image sample of that seed); in between
  z_s = sqrt(a) z_0 + sqrt(1 - a) eps with a = alpha_bar of the start step.
- `NullTextP2P` (null_text_p2p, null_text_p2plus): null-text inversion (`null_text`), then [source, target]
  sampled with the per-step unconditional embeddings under a prompt-to-prompt controller: AttentionReplace for
  equal word counts, else AttentionRefine, cross-attention edited for steps < tau_c N and self-attention for
  steps < tau_s N. P2Plus (`tau_u` set) also replaces the unconditional branch's self-attention for steps < tau_u N.
- `NegativePromptP2P` (negative_prompt_p2p): negative-prompt inversion (every step's unconditional embedding is
  the source prompt's) with the same controller.
- `StyleDiffusionEdit` (style_diffusion, style_diffusion_sdedit): the DDIM trajectory of z_0 (guidance 1,
  `map_resolution` cross maps), Algorithm 1 (`diffusion.style_inversion.StyleDiffusionFitter`) on it, then
  `diffusion.style_editing.edit` with P2Plus and the `editing` taus. With `sdedit` (StyleDiffusion + SDEdit,
  Sec. 5.2.5) the target follows the source's replay until step round((1 - s) T) (s: `strength`) and denoises
  from that latent with its prompt, with no attention control. The image encoder reads `pixels` (the image in
  [-1, 1]) or, without them, the decoded z_0.

LocalBlend (prompt-to-prompt): the P2P methods and StyleDiffusion take `blend_words`, the source prompt's words
then the target's (["cat", "dog"], or lists of words), and `blend_threshold`; the edited row then changes only
inside the union of both words' attention masks (diffusion.prompt_to_prompt.edit_blend; None = off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffusion.attention import AttentionHub
from diffusion.backbone import Backbone
from diffusion.flow import FlowBackbone
from diffusion.image_encoder import ImageEncoderSettings
from diffusion.inversion import invert_latents, negative_prompt_inversion, null_text_inversion
from diffusion.mapping import MappingSettings
from diffusion.prompt_to_prompt import check_blend_words, edit_blend, edit_controller
from diffusion.sampling import DDIMSchedule, ddim_invert, ddim_sample, sdedit_start
from diffusion.style_editing import edit as style_edit
from diffusion.style_inversion import FitSettings, StyleDiffusionFitter
from utils.checks import check_whole, is_number
from utils.errors import ConfigError, find_user_error
from utils.settings import Settings

KEY = "edit_method."  # where a setting sits in edit.py's config: its errors name it so
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "edit_method"
CONTROLLERS = ("auto", "replace", "refine")


# ----- checks of the settings -------------------------------------------------------------------------
def fraction(key: str, value, optional: bool = False) -> float | None:
    """A share of the steps: a number in [0, 1] (None when `optional`); `key` names the setting in errors."""
    if optional and value is None:
        return None
    if not (is_number(value) and 0 <= value <= 1):
        raise ConfigError(f"{key}={value!r} must be a number in [0, 1] (a share of the steps)")
    return float(value)


def check_threshold(value, key: str = f"{KEY}blend_threshold") -> float:
    """LocalBlend's threshold on max-normalised maps: above 1 leaves no mask (the edit returns the reconstruction)."""
    if not (is_number(value) and 0 <= value < float("inf")):
        raise ConfigError(f"{key}={value!r} must be a number >= 0 (the maps are normalised to [0, 1])")
    return float(value)


def check_strength(value, key: str = f"{KEY}strength") -> float:
    if not (is_number(value) and 0 <= value <= 1):
        raise ConfigError(f"{key}={value!r} must be a number in [0, 1]; 0 keeps the image, 1 ignores it")
    return float(value)


def check_controller(controller: str, key: str = f"{KEY}controller") -> str:
    if controller not in CONTROLLERS:
        raise ConfigError(f"{key}={controller!r} is unknown; use auto (replace for equal word counts, "
                          f"else refine), replace or refine")
    return controller


@dataclass(frozen=True)
class StyleEditingSettings(Settings):
    """StyleDiffusion's editing (module.editing): the taus of diffusion.style_editing.edit (tau_u None: plain
    prompt-to-prompt), the P2Plus controller, LocalBlend and SDEdit's strength (None: P2Plus). train.py's module
    reads them as one section (conf/style_diffusion/settings.yaml's taus, conf/method/style_diffusion.yaml's
    rest); edit.py's StyleDiffusionEdit gathers them from its settings (EditMethodEditing). Its fields are
    diffusion.style_editing.edit's keyword arguments."""

    key = "module.editing"
    where: ClassVar[dict[str, str]] = {}  # the settings that sit elsewhere than <key>.<name> in the config
    tau_v: float
    tau_c: float
    tau_s: float
    tau_u: float | None
    controller: str
    blend_words: list | str | None
    blend_threshold: float
    sdedit_strength: float | None

    def name(self, field: str) -> str:
        return self.where.get(field, f"{self.key}.{field}")

    def __post_init__(self):
        for tau in ("tau_v", "tau_c", "tau_s", "tau_u"):
            fraction(self.name(tau), getattr(self, tau), optional=tau == "tau_u")
        check_controller(self.controller, self.name("controller"))
        check_threshold(self.blend_threshold, self.name("blend_threshold"))
        if self.sdedit_strength is not None:
            check_strength(self.sdedit_strength, self.name("sdedit_strength"))


class EditMethodEditing(StyleEditingSettings):
    """The same settings as edit.py names them: the taus under edit_method.editing, the rest at the top."""

    key = f"{KEY}editing"
    where = {"controller": f"{KEY}controller", "blend_words": f"{KEY}blend_words",
             "blend_threshold": f"{KEY}blend_threshold", "sdedit_strength": f"{KEY}strength"}


def check_controller_prompts(controller: str, source: str, target: str) -> None:
    """replace swaps words one for one, so its prompts have as many words."""
    words = [len(prompt.split()) for prompt in (source, target)]
    if controller == "replace" and words[0] != words[1]:
        raise ConfigError(f"{KEY}controller=replace swaps words one for one, but source has {words[0]} words and "
                          f"target {words[1]}; use {KEY}controller=refine (or auto) when words are added or removed")


def check_inputs(z0: torch.Tensor, source: str, target: str) -> None:
    if z0.ndim != 4 or z0.shape[0] != 1:
        raise ValueError(f"editing takes one image's latents [1, C, h, w], got {tuple(z0.shape)}")
    for name, prompt in (("source", source), ("target", target)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"the {name} prompt is empty; give the words that describe the image")


# ----- shared steps -------------------------------------------------------------------------------
def _pair(backbone: Backbone, source: str, target: str):
    return backbone.encode_prompt([source]), backbone.encode_prompt([source, target])


def sample_controlled(backbone, cond, start, uncond, num_steps, guidance_scale, controller,
                      blend=None) -> torch.Tensor:
    """[source, target] sampled from one start latent under `controller` (and LocalBlend `blend`)."""
    controllers = [controller] if blend is None else [controller, blend]  # the blend after p2p: the edited maps
    with AttentionHub(backbone.unet, controllers) as hub:
        return ddim_sample(backbone, cond, start.expand(2, *start.shape[1:]), uncond, num_steps, guidance_scale,
                           hub=hub, step_callback=None if blend is None else blend.blend)


# ----- the methods ---------------------------------------------------------------------------------
@dataclass
class EditMethod:
    """What every method has: its step count (the paper's). Subclasses add their settings and `edit`."""

    num_steps: int
    flow_backbones: ClassVar[bool] = False  # True: edits SD3 / FLUX (diffusion/flow_editing.py), not UNet models

    def __post_init__(self):
        check_whole(f"{KEY}num_steps", self.num_steps, 1)

    def check_prompts(self, source: str, target: str) -> None:
        """Stop prompts this method cannot edit, before any model loads (nothing to check by default)."""

    def __call__(self, backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int | None = None,
                 guidance_scale: float = 7.5, seed: int = 0, pixels: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(z0, source, target)
        if isinstance(backbone, FlowBackbone) != self.flow_backbones:
            raise ConfigError(f"{type(self).__name__} edits {'rectified-flow' if self.flow_backbones else 'UNet'} "
                              f"models, not this {getattr(backbone, 'kind', 'sd')} one; use edit_method=flow_p2p on "
                              f"SD3 / FLUX, another method on Stable Diffusion")
        self.check_prompts(source, target)  # before any inversion
        steps = self.num_steps if num_steps is None else int(num_steps)
        return self.edit(backbone, z0, source, target, steps, float(guidance_scale), int(seed), pixels)

    def edit(self, backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int,
             guidance_scale: float, seed: int, pixels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class DDIMWordSwap(EditMethod):
    """DDIM inversion (w = 1, source prompt), then [source, target] sampled from z_N at w, no control."""

    @torch.no_grad()
    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        cond_src, cond = _pair(backbone, source, target)
        z_n = ddim_invert(backbone, z0, cond_src, num_steps)[-1]
        return ddim_sample(backbone, cond, z_n.expand(2, *z_n.shape[1:]), backbone.encode_prompt([""]), num_steps,
                           guidance_scale)


@dataclass
class SDEdit(EditMethod):
    """z_0 noised to `strength` (seeded), then [source, target] denoised from the start step."""

    strength: float

    def __post_init__(self):
        super().__post_init__()
        self.strength = check_strength(self.strength)

    @torch.no_grad()
    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        start = sdedit_start(num_steps, self.strength)
        if start >= num_steps:
            return z0.expand(2, *z0.shape[1:]).clone()
        generator = torch.Generator(z0.device).manual_seed(seed)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=torch.float32)
        if start == 0:
            x = noise  # strength 1: the image is ignored
        else:
            a = DDIMSchedule(backbone.scheduler.config, num_steps).alpha(start).to(z0.device, torch.float32)
            x = a.sqrt() * z0.float() + (1 - a).sqrt() * noise
        _, cond = _pair(backbone, source, target)
        return ddim_sample(backbone, cond, x.to(z0.dtype).expand(2, *z0.shape[1:]), backbone.encode_prompt([""]),
                           num_steps, guidance_scale, start_step=start)


@dataclass
class PromptToPromptEdit(EditMethod):
    """The P2P baselines' controller (tau_c, tau_s; P2Plus: tau_u) and LocalBlend; subclasses pick the inversion."""

    controller: str
    tau_c: float
    tau_s: float
    tau_u: float | None  # None: prompt-to-prompt; a share: P2Plus's unconditional self-attention
    blend_words: list | str | None
    blend_threshold: float

    def __post_init__(self):
        super().__post_init__()
        check_controller(self.controller)
        self.tau_c, self.tau_s = fraction(f"{KEY}tau_c", self.tau_c), fraction(f"{KEY}tau_s", self.tau_s)
        self.tau_u = fraction(f"{KEY}tau_u", self.tau_u, optional=True)
        self.blend_threshold = check_threshold(self.blend_threshold)

    def check_prompts(self, source: str, target: str) -> None:
        check_controller_prompts(self.controller, source, target)
        if self.blend_words is not None:
            check_blend_words([source, target], self.blend_words)

    def controllers(self, backbone: Backbone, source: str, target: str):
        """(the prompt-to-prompt controller, the LocalBlend or None), built before any inversion."""
        tokenizer = backbone.tokenizers[0]
        return (edit_controller(tokenizer, source, [target], self.controller, self.tau_c, self.tau_s, self.tau_u),
                edit_blend(tokenizer, [source, target], self.blend_words, self.blend_threshold))


@dataclass
class NullTextP2P(PromptToPromptEdit):
    """Null-text inversion + prompt-to-prompt (P2Plus with tau_u)."""

    null_text: dict  # null_text_inversion's keyword arguments

    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        controller, blend = self.controllers(backbone, source, target)
        cond_src, cond = _pair(backbone, source, target)
        trajectory = ddim_invert(backbone, z0, cond_src, num_steps)
        schedule = null_text_inversion(backbone, trajectory, cond_src, num_steps, guidance_scale, **self.null_text)
        with torch.no_grad():
            return sample_controlled(backbone, cond, trajectory[-1], schedule, num_steps, guidance_scale, controller,
                                     blend)


@dataclass
class NegativePromptP2P(PromptToPromptEdit):
    """Negative-prompt inversion (the source embedding as every step's uncond) + prompt-to-prompt."""

    @torch.no_grad()
    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        controller, blend = self.controllers(backbone, source, target)
        cond_src, cond = _pair(backbone, source, target)
        trajectory = ddim_invert(backbone, z0, cond_src, num_steps)
        return sample_controlled(backbone, cond, trajectory[-1], negative_prompt_inversion(cond_src, num_steps),
                                 num_steps, guidance_scale, controller, blend)


class EditMethodEncoder(ImageEncoderSettings):
    """E's folder as edit.py names it (edit_method.image_encoder)."""

    key = f"{KEY}image_encoder"


@dataclass
class StyleDiffusionEdit(EditMethod):
    """StyleDiffusion: Algorithm 1 on z_0's trajectory, then the P2Plus edit (or, with `strength`, SDEdit)."""

    image_encoder: dict      # {path, build}: E's folder, or the architecture of a random one built there
    map_resolution: int      # the trajectory's cross-attention maps (L_att)
    map_blocks: list
    mapping: dict            # MappingNetwork's settings (MappingSettings)
    inner: dict              # Algorithm 1's schedule, Adam, early stop and loss weight (FitSettings)
    adam: dict
    early_stop: float
    early_stop_growth: float
    attention_weight: float
    editing: dict            # the taus of style_editing.edit: tau_v, tau_c, tau_s, tau_u
    controller: str
    blend_words: list | str | None
    blend_threshold: float
    sdedit: bool             # False: P2Plus; True: StyleDiffusion + SDEdit at `strength`
    strength: float

    def __post_init__(self):
        super().__post_init__()
        self.strength = check_strength(self.strength)
        self.settings = EditMethodEditing.from_config({
            **dict(self.editing), "controller": self.controller, "blend_words": self.blend_words,
            "blend_threshold": self.blend_threshold, "sdedit_strength": self.strength if self.sdedit else None})
        self.mapping = MappingSettings.from_config(self.mapping)
        self.fit_settings(self.num_steps, 7.5)  # a bad schedule or preset stops here
        self.image_encoder = EditMethodEncoder.from_config(self.image_encoder)
        self.image_encoder.check_folder()

    def fit_settings(self, num_steps: int, guidance_scale: float) -> FitSettings:
        return FitSettings(num_steps, guidance_scale, inner=self.inner, adam=self.adam, early_stop=self.early_stop,
                           early_stop_growth=self.early_stop_growth, attention_weight=self.attention_weight,
                           map_blocks=tuple(self.map_blocks))

    def check_prompts(self, source: str, target: str) -> None:
        if not self.sdedit:
            check_controller_prompts(self.controller, source, target)
        if self.blend_words is not None:
            check_blend_words([source, target], self.blend_words)

    @torch.no_grad()
    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        fitter = StyleDiffusionFitter.create(backbone, self.image_encoder.load().to(backbone.device),
                                             self.fit_settings(num_steps, guidance_scale), self.mapping)
        trajectory = invert_latents(backbone, z0, source, num_steps, self.map_resolution, tuple(self.map_blocks))
        pixels = pixels if pixels is not None else backbone.decode_latents(z0) * 2 - 1
        generator = torch.Generator(backbone.device).manual_seed(seed)
        with AttentionHub(backbone.unet) as hub:  # the UNet gets its processors back
            inversion = fitter.fit(hub, pixels.to(backbone.device, torch.float32), source, trajectory, "image",
                                   generator)
            return style_edit(backbone, hub, inversion, [target], guidance_scale=guidance_scale,
                              **self.settings.as_dict())


# ----- methods by name: conf/edit_method/<name>.yaml ------------------------------------------------
def method_names() -> list[str]:
    """The edit methods there are: one yaml each in conf/edit_method/."""
    return sorted(path.stem for path in CONF_DIR.glob("*.yaml"))


def method_config(name: str, overrides: list[str] = ()):
    """conf/edit_method/<name>.yaml as edit.py composes it (model=shapes unless an override picks another),
    resolved, as a config of its own that takes no unknown key."""
    from omegaconf import OmegaConf

    from utils.config import entry_config

    if name not in method_names():
        raise ConfigError(f"edit method {name!r} is unknown; use one of {', '.join(method_names())}")
    node = entry_config("edit", [f"edit_method={name}", *overrides]).edit_method
    cfg = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def build_method(cfg) -> EditMethod:
    """The method a config node describes (its `_target_` class with its settings, checked)."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, _convert_="all")
    except Exception as e:  # Hydra wraps a bad setting's ConfigError: raise that one
        raise find_user_error(e) or e from None


def load_edit_method(name: str, **settings) -> EditMethod:
    """The method of conf/edit_method/<name>.yaml, with `settings` replacing its values (nested dicts merge)."""
    from omegaconf import OmegaConf

    return build_method(OmegaConf.merge(method_config(name), settings))
