"""Real-image editing methods compared on the same terms (StyleDiffusion, paper 003, Sec. 4.3).

Every method takes (backbone, z_0 [1, C, h, w], source prompt, target prompt, num_steps,
guidance_scale, settings) and returns latents [2, C, h, w] = [reconstruction of the source, the edit],
both rows sampled in one batch with the same start latent, steps and guidance:

- `ddim_word_swap`: DDIM inversion at guidance 1 with the source prompt, then guided sampling of
  [source, target] from z_N with the plain "" unconditional embedding and no attention control.
- `sdedit`: z_0 noised to strength s with a seeded generator, then [source, target] denoised from
  there. The start step is round((1 - s) N): s = 0 runs no step and returns z_0 itself (both rows);
  s = 1 starts at step 0 from pure noise (no trace of z_0: the text-to-image sample of that seed);
  in between z_s = sqrt(a) z_0 + sqrt(1 - a) eps with a = alpha_bar of the start step.
- `null_text_p2p` / `null_text_p2plus`: null-text inversion (methods.md: N = 50, w = 7.5, up to 10
  Adam steps per sampling step at lr 1e-2 (1 - i/100), warm start, early stop at 1e-5 + i 2e-5), then
  [source, target] sampled with the per-step unconditional embeddings under a prompt-to-prompt
  controller: AttentionReplace for equal word counts, else AttentionRefine, cross-attention edited for
  steps < tau_c N and self-attention for steps < tau_s N (prompt-to-prompt's defaults 0.8 / 0.4:
  methods.md gives no taus for this baseline). P2Plus also replaces the unconditional branch's
  self-attention for steps < tau_u N (0.5).
- `negative_prompt_p2p`: negative-prompt inversion (every step's unconditional embedding is the source
  prompt's) with the same controller as `null_text_p2p`.
- `style_diffusion`: the DDIM trajectory of z_0 (guidance 1, 16x16 cross maps), Algorithm 1
  (`diffusion.style_inversion.StyleDiffusionFitter`) on it, then `diffusion.style_editing.edit` with P2Plus
  and the authors' code defaults tau_v 0.6, tau_c 0.6, tau_s 0.8, tau_u 0.5. T = 30 in the paper.
  The image encoder reads `settings.pixels` (the image in [-1, 1]) or, without them, the decoded z_0.
- `style_diffusion_sdedit`: StyleDiffusion + SDEdit (Sec. 5.2.5): the same inversion, then the target
  follows the source's replay until step round((1 - s) T) (s = `settings.strength`) and denoises from
  that latent with its prompt (the same tau_v value rule), with no attention control.

LocalBlend (prompt-to-prompt): the P2P-family methods and both StyleDiffusion ones (`BLEND_METHODS`)
take `settings.blend_words`, the source prompt's words then the target's (["cat", "dog"], or lists of
words), and `settings.blend_threshold`; the edited row then changes only inside the union of both
words' attention masks (diffusion.prompt_to_prompt.edit_blend; None = off).

`METHODS` maps each name to its function; `DEFAULT_STEPS` gives each method's step count of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from diffusion.attention import AttentionHub
from diffusion.backbone import Backbone
from diffusion.image_encoder import ensure_encoder
from diffusion.inversion import invert_latents, negative_prompt_inversion, null_text_inversion
from diffusion.prompt_to_prompt import check_blend_words, edit_blend, edit_controller
from diffusion.sampling import DDIMSchedule, ddim_invert, ddim_sample, sdedit_start
from diffusion.style_editing import edit as style_edit
from diffusion.style_inversion import FitSettings, StyleDiffusionFitter
from utils.errors import ConfigError


@dataclass
class EditSettings:
    """What the methods read besides prompts, steps and guidance (each reads only its own part)."""

    controller: str = "auto"  # prompt-to-prompt controller: auto (replace for equal word counts, else refine)
    tau_c: float = 0.8        # P2P baselines: cross-attention edited for steps < tau_c N
    tau_s: float = 0.4        # P2P baselines: self-attention replaced for steps < tau_s N
    tau_u: float = 0.5        # P2Plus (null_text_p2plus): unconditional self-attention for steps < tau_u N
    blend_words: list | None = None  # P2P family: LocalBlend's [source words, target words] (word or list); None: off
    blend_threshold: float = 0.3     # LocalBlend's mask threshold (prompt-to-prompt's code)
    strength: float = 0.5     # SDEdit: the noise level z_0 is taken to (0: none, 1: pure noise)
    seed: int = 0             # SDEdit's noise; StyleDiffusion's mapping-network initialisation
    null_text: dict = field(default_factory=dict)        # null_text_inversion keyword arguments
    style_diffusion: dict = field(default_factory=dict)  # see STYLE_DEFAULTS
    pixels: torch.Tensor | None = None   # StyleDiffusion: the image [1, 3, H, W] in [-1, 1] for E(x)

    @classmethod
    def create(cls, settings: "EditSettings | dict | None") -> "EditSettings":
        if isinstance(settings, cls):
            return settings
        return cls(**dict(settings or {}))


# the edit's own settings; Algorithm 1's (inner, adam, early_stop, ...) default to FitSettings', the mapping
# networks' to MappingNetwork's and the taus (editing: tau_v, tau_c, tau_s, tau_u) to style_editing.edit's
STYLE_DEFAULTS = {"image_encoder": {"path": None, "build": None}, "map_resolution": 16, "map_blocks": ("down", "up")}
FIT_KEYS = ("inner", "adam", "early_stop", "early_stop_growth", "attention_weight")
TAUS = ("tau_v", "tau_c", "tau_s", "tau_u")


def _pair(backbone: Backbone, source: str, target: str):
    return backbone.encode_prompt([source]), backbone.encode_prompt([source, target])


def _check(z0: torch.Tensor, source: str, target: str) -> None:
    if z0.ndim != 4 or z0.shape[0] != 1:
        raise ValueError(f"editing takes one image's latents [1, C, h, w], got {tuple(z0.shape)}")
    for name, prompt in (("source", source), ("target", target)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"the {name} prompt is empty; give the words that describe the image")


def p2p_controller(backbone: Backbone, source: str, target: str, s: EditSettings, tau_u: float | None):
    """The prompt-to-prompt controller of the P2P baselines (s.controller, s.tau_c, s.tau_s; P2Plus with tau_u)."""
    return edit_controller(backbone.tokenizers[0], source, [target], s.controller, s.tau_c, s.tau_s, tau_u)


def _blend(backbone: Backbone, source: str, target: str, s: EditSettings):
    """The LocalBlend of s.blend_words (None when off); built before any inversion, so a bad word stops at once."""
    return edit_blend(backbone.tokenizers[0], [source, target], s.blend_words, s.blend_threshold)


def sample_controlled(backbone, cond, start, uncond, num_steps, guidance_scale, controller,
                      blend=None) -> torch.Tensor:
    """[source, target] sampled from one start latent under `controller` (and LocalBlend `blend`)."""
    controllers = [controller] if blend is None else [controller, blend]  # the blend after p2p: the edited maps
    with AttentionHub(backbone.unet, controllers) as hub:
        return ddim_sample(backbone, cond, start.expand(2, *start.shape[1:]), uncond, num_steps, guidance_scale,
                           hub=hub, step_callback=None if blend is None else blend.blend)


# ----- the methods ---------------------------------------------------------------------------------
@torch.no_grad()
def ddim_word_swap(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 50,
                   guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """DDIM inversion (w = 1, source prompt), then [source, target] sampled from z_N at w, no control."""
    _check(z0, source, target)
    cond_src, cond = _pair(backbone, source, target)
    z_n = ddim_invert(backbone, z0, cond_src, num_steps)[-1]
    return ddim_sample(backbone, cond, z_n.expand(2, *z_n.shape[1:]), backbone.encode_prompt([""]), num_steps,
                       guidance_scale)


@torch.no_grad()
def sdedit(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 50,
           guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """z_0 noised to `settings.strength` (seeded), then [source, target] denoised from the start step."""
    _check(z0, source, target)
    s = EditSettings.create(settings)
    start = sdedit_start(num_steps, s.strength)
    if start >= num_steps:
        return z0.expand(2, *z0.shape[1:]).clone()
    generator = torch.Generator(z0.device).manual_seed(int(s.seed))
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=torch.float32)
    if start == 0:
        x = noise  # strength 1: the image is ignored
    else:
        a = DDIMSchedule(backbone.scheduler.config, num_steps).alpha(start).to(z0.device, torch.float32)
        x = a.sqrt() * z0.float() + (1 - a).sqrt() * noise
    _, cond = _pair(backbone, source, target)
    return ddim_sample(backbone, cond, x.to(z0.dtype).expand(2, *z0.shape[1:]), backbone.encode_prompt([""]),
                       num_steps, guidance_scale, start_step=start)


def _null_text(backbone, z0, source, target, num_steps, guidance_scale, settings, tau_u) -> torch.Tensor:
    _check(z0, source, target)
    s = EditSettings.create(settings)
    controller, blend = p2p_controller(backbone, source, target, s, tau_u), _blend(backbone, source, target, s)
    cond_src, cond = _pair(backbone, source, target)
    trajectory = ddim_invert(backbone, z0, cond_src, num_steps)
    schedule = null_text_inversion(backbone, trajectory, cond_src, num_steps, guidance_scale,
                                   **dict(s.null_text or {}))  # Mokady et al.'s settings by default
    with torch.no_grad():
        return sample_controlled(backbone, cond, trajectory[-1], schedule, num_steps, guidance_scale, controller,
                                  blend)


def null_text_p2p(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 50,
                  guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """Null-text inversion + prompt-to-prompt (tau_c, tau_s)."""
    return _null_text(backbone, z0, source, target, num_steps, guidance_scale, settings, None)


def null_text_p2plus(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 50,
                     guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """Null-text inversion + P2Plus (prompt-to-prompt with the unconditional self-attention for tau_u)."""
    s = EditSettings.create(settings)
    return _null_text(backbone, z0, source, target, num_steps, guidance_scale, s, s.tau_u)


@torch.no_grad()
def negative_prompt_p2p(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 50,
                        guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """Negative-prompt inversion (the source embedding as every step's uncond) + prompt-to-prompt."""
    _check(z0, source, target)
    s = EditSettings.create(settings)
    controller, blend = p2p_controller(backbone, source, target, s, None), _blend(backbone, source, target, s)
    cond_src, cond = _pair(backbone, source, target)
    trajectory = ddim_invert(backbone, z0, cond_src, num_steps)
    return sample_controlled(backbone, cond, trajectory[-1], negative_prompt_inversion(cond_src, num_steps),
                              num_steps, guidance_scale, controller, blend)


def style_diffusion(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 30,
                    guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """StyleDiffusion: Algorithm 1 on z_0's trajectory, then the P2Plus edit (the replay and the target)."""
    return _style_diffusion(backbone, z0, source, target, num_steps, guidance_scale, settings, sdedit=False)


def style_diffusion_sdedit(backbone: Backbone, z0: torch.Tensor, source: str, target: str, num_steps: int = 30,
                           guidance_scale: float = 7.5, settings: EditSettings | dict | None = None) -> torch.Tensor:
    """StyleDiffusion + SDEdit (Sec. 5.2.5): Algorithm 1, then the target leaves the replay at step
    round((1 - settings.strength) T) and denoises with its prompt, without attention control."""
    return _style_diffusion(backbone, z0, source, target, num_steps, guidance_scale, settings, sdedit=True)


@torch.no_grad()
def _style_diffusion(backbone, z0, source, target, num_steps, guidance_scale, settings, sdedit: bool):
    _check(z0, source, target)
    s = EditSettings.create(settings)
    if sdedit:
        sdedit_start(num_steps, s.strength)  # a bad strength stops before Algorithm 1
    if s.blend_words is not None:
        check_blend_words([source, target], s.blend_words)  # before Algorithm 1, not after it
    cfg = {**STYLE_DEFAULTS, **dict(s.style_diffusion or {})}
    encoder = {"path": None, "build": None, "key": "image_encoder.path", **dict(cfg["image_encoder"] or {})}
    if not encoder["path"]:
        raise ConfigError("image_encoder.path is not set; give a local CLIP vision model folder "
                          "(or image_encoder.build=base|tiny to build a random one there)")
    fit = FitSettings(num_steps, guidance_scale, map_blocks=cfg["map_blocks"],
                      **{k: cfg[k] for k in FIT_KEYS if k in cfg})  # a bad schedule or preset stops here
    taus = {k: v for k, v in dict(cfg.get("editing") or {}).items() if k in TAUS}
    image_encoder = ensure_encoder(encoder["path"], encoder["build"], encoder["key"]).to(backbone.device)
    fitter = StyleDiffusionFitter.create(backbone, image_encoder, fit, **dict(cfg.get("mapping") or {}))
    trajectory = invert_latents(backbone, z0, source, num_steps, cfg["map_resolution"], cfg["map_blocks"])
    pixels = s.pixels if s.pixels is not None else backbone.decode_latents(z0) * 2 - 1
    generator = torch.Generator(backbone.device).manual_seed(int(s.seed))
    with AttentionHub(backbone.unet) as hub:  # the UNet gets its processors back
        inversion = fitter.fit(hub, pixels.to(backbone.device, torch.float32), source, trajectory, "image", generator)
        return style_edit(backbone, hub, inversion, [target], **taus, controller=s.controller,
                          guidance_scale=guidance_scale, blend_words=s.blend_words, blend_threshold=s.blend_threshold,
                          sdedit_strength=s.strength if sdedit else None)


EditMethod = Callable[..., torch.Tensor]
METHODS: dict[str, EditMethod] = {
    "ddim_word_swap": ddim_word_swap,
    "sdedit": sdedit,
    "null_text_p2p": null_text_p2p,
    "null_text_p2plus": null_text_p2plus,
    "negative_prompt_p2p": negative_prompt_p2p,
    "style_diffusion": style_diffusion,
    "style_diffusion_sdedit": style_diffusion_sdedit,
}
BLEND_METHODS = ("null_text_p2p", "null_text_p2plus", "negative_prompt_p2p", "style_diffusion",
                 "style_diffusion_sdedit")  # the methods that read blend_words
# steps of each method in the paper's comparison: 50 for the null-text / P2P family (methods.md), T = 30
# for StyleDiffusion (Sec. 4.1) and the same 50 for the other baselines
DEFAULT_STEPS = {name: 50 for name in METHODS} | {"style_diffusion": 30, "style_diffusion_sdedit": 30}
