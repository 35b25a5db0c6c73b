"""Concept masks without a Trainer (paper 001, "EM concept tokens + latent masks"): the E-step and the settings.

`EMSettings`, `LossSettings` and `JointSettings` are EMMaskModule's `module.em`, `module.losses` and
`module.joint` sections, checked; conf/method/em_mask.yaml holds their defaults and cites the paper for them.

`MaskEstimator` turns a scene's image and its concept tokens into masks, bool [H, W] per token: from each
token's cross-attention (the paper) or from its denoising errors (the EM's own E-step), thresholded or
assigned by argmax, refined by DenseCRF (diffusion/masks.py), the background optionally the complement.
`iou_rows` compares masks with the ground truth, per token type (the paper's Fig. 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from diffusion.attention import AttentionHub, AttentionStore
from diffusion.backbone import Backbone
from diffusion.masks import CRFSettings, mask_iou, refine_mask, scale_maps, upsample
from utils.errors import ConfigError
from utils.settings import Settings, check_choice

VARIANTS = ("em", "fixed", "ground_truth")
WEIGHTS = ("full", "lora", "none")
ATTENTION_LOSSES = ("paper", "break_a_scene")
ASSIGNMENTS = ("threshold", "argmax")
BACKGROUNDS = ("attention", "complement")
ESTIMATES = ("attention", "denoising")
CONTRASTS = ("leave_one_out", "alone")


@dataclass(frozen=True)
class EMSettings(Settings):
    """The EM stage and its E-step (module.em)."""

    key = "module.em"
    steps: int
    every: int
    timesteps: int
    update_timesteps: int
    threshold: float
    assignment: str
    background: str
    estimate: str
    contrast: str
    denoising_timesteps: Sequence[int]
    attention_resolution: int
    chunk: int
    refine: bool

    def __post_init__(self):
        for name, choices in (("assignment", ASSIGNMENTS), ("background", BACKGROUNDS), ("estimate", ESTIMATES),
                              ("contrast", CONTRASTS)):
            check_choice(f"{self.key}.{name}", getattr(self, name), choices)


@dataclass(frozen=True)
class LossSettings(Settings):
    """The M-step's eq. (3) + attention_weight * eq. (4) (module.losses)."""

    key = "module.losses"
    attention_weight: float
    attention: str

    def __post_init__(self):
        check_choice(f"{self.key}.attention", self.attention, ATTENTION_LOSSES)


@dataclass(frozen=True)
class PriorSettings(Settings):
    """Prior preservation in the joint stage (module.joint.prior); no images_dir: off."""

    key = "module.joint.prior"
    images_dir: str | None
    prompt: str
    weight: float


@dataclass(frozen=True)
class JointSettings(Settings):
    """Tokens + UNet weights under fixed masks (module.joint, Break-a-Scene's second phase)."""

    key = "module.joint"
    nested = {"prior": PriorSettings}
    steps: int
    weights: str
    lr: float
    token_lr: float
    lora_rank: int
    lora_alpha: float
    prior: PriorSettings

    def __post_init__(self):
        check_choice(f"{self.key}.weights", self.weights, WEIGHTS)


@dataclass
class MaskEstimator:
    """The E-step over one scene: `estimate` gives its masks; `attention_maps` and `denoising_scores` the maps."""

    backbone: Backbone
    hub: Callable[[], AttentionHub]                   # the UNet's attention hub, installed on first use
    settings: EMSettings
    crf: CRFSettings
    prompt: Callable[[list[str]], str]                # the prompt naming these tokens
    positions: Callable[[str, list[str]], list[int]]  # the tokens' positions in that prompt

    def attention_store(self, prompt: str, tokens: list[str], **kwargs) -> AttentionStore:
        """The tokens' cross-attention in `prompt` at em.attention_resolution, down and up blocks."""
        return AttentionStore(cross=True, blocks=("down", "up"), resolutions=[self.settings.attention_resolution],
                              token_indices=self.positions(prompt, tokens), **kwargs)

    @torch.no_grad()
    def attention_maps(self, image: torch.Tensor, tokens: list[str], num_timesteps: int,
                       g: torch.Generator) -> torch.Tensor:
        """Each token's cross-attention [n, h, w] over the image noised at `num_timesteps` random
        timesteps (conditional branch, the em.attention_resolution layers of down and up blocks, heads averaged)."""
        backbone, res, device = self.backbone, self.settings.attention_resolution, self.backbone.device
        prompt = self.prompt(tokens)
        store = self.attention_store(prompt, tokens, average_steps=True)
        latents = backbone.encode_images(image[None].to(device), generator=g)
        t = torch.randint(0, backbone.num_train_timesteps, (num_timesteps,), generator=g, device=device)
        cond = backbone.encode_prompt([prompt])
        total = None
        for chunk in t.split(self.settings.chunk):
            noise = torch.randn((len(chunk), *latents.shape[1:]), generator=g, device=device)
            noisy = backbone.add_noise(latents.expand(len(chunk), -1, -1, -1).float(), noise, chunk)
            store.reset()
            with self.hub().using(store):
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
        backbone, device = self.backbone, self.backbone.device
        if self.settings.contrast == "alone":
            pairs = [((), (t,)) for t in tokens]
        else:
            pairs = [(tuple(o for o in tokens if o != t), tuple(tokens)) for t in tokens]
        sets = list(dict.fromkeys(s for pair in pairs for s in pair))
        conds = [backbone.encode_prompt([self.prompt(list(s)) if s else ""]) for s in sets]
        latents = backbone.encode_images(image[None].to(device), generator=g).float()
        low, high = self.settings.denoising_timesteps
        t = torch.randint(low, high, (num_timesteps,), generator=g, device=device)
        errors = torch.zeros(len(sets), *latents.shape[-2:], device=device)
        for chunk in t.split(self.settings.chunk):
            noise = torch.randn((len(chunk), *latents.shape[1:]), generator=g, device=device)
            clean = latents.expand(len(chunk), -1, -1, -1)
            noisy, target = backbone.add_noise(clean, noise, chunk), backbone.training_target(clean, noise, chunk)
            for k, cond in enumerate(conds):
                pred = backbone.predict(noisy, chunk, cond.expand(len(chunk)))
                errors[k] += (pred.float() - target.float()).pow(2).mean(1).sum(0)
        errors /= num_timesteps
        return torch.stack([errors[sets.index(without)] - errors[sets.index(named)] for without, named in pairs])

    def estimate(self, image: torch.Tensor, tokens: list[str], background: str | None, num_timesteps: int,
                 g: torch.Generator, estimate: str = "attention") -> dict[str, torch.Tensor]:
        """The scene's masks, bool [H, W]. From attention (`estimate`): each map scaled to [0, 1] (min to max)
        and thresholded at em.threshold (the paper), or each pixel given to the concept whose scaled map is
        highest (em.assignment=argmax). From denoising scores (one unit for all concepts): each pixel to the
        concept that explains it best (the hard E-step). Then refined by DenseCRF, dropped when CutLER's IoU
        rule says so. With em.background=complement the background concept gets what no other concept covers."""
        settings = self.settings
        estimator = self.denoising_scores if estimate == "denoising" else self.attention_maps
        maps = estimator(image, tokens, num_timesteps, g).cpu()
        scaled = scale_maps(maps)  # a new token's map is nearly flat: stretch it
        if estimate == "denoising":
            binaries = F.one_hot(maps.argmax(0), len(tokens)).permute(2, 0, 1).float()
        elif settings.assignment == "argmax":
            binaries = F.one_hot(scaled.argmax(0), len(tokens)).permute(2, 0, 1).float()
        else:
            binaries = (scaled >= settings.threshold).float()
        out = {}
        for token, binary in zip(tokens, binaries):
            if settings.refine:
                out[token], _ = refine_mask((image + 1) / 2, binary, self.crf)
            else:
                out[token] = upsample(binary, tuple(image.shape[-2:])) >= 0.5
        if settings.background == "complement" and background is not None and len(tokens) > 1:
            out[background] = ~torch.stack([m for t, m in out.items() if t != background]).any(0)
        return out


def draw_subset(tokens: list[str], g: torch.Generator) -> list[str]:
    """A random non-empty subset of a scene's concepts, in the scene's order (Break-a-Scene's M-step prompts).
    `g` is a CPU generator: the prompt is made on the host."""
    k = int(torch.randint(1, len(tokens) + 1, (1,), generator=g))
    chosen = torch.randperm(len(tokens), generator=g)[:k].sort().values.tolist()
    return [tokens[i] for i in chosen]


def iou_rows(kind: str, records: Sequence, truths: list[dict[str, torch.Tensor]],
             masks: list[dict[str, torch.Tensor]]) -> list[dict]:
    """One row per scene (a record with .image, a path, and .background) and token with a true mask: its role
    (subject or background), the IoU of its mask with the truth, and the mask's area (1.0: a whole-image mask)."""
    rows = []
    for record, truth, scene_masks in zip(records, truths, masks):
        for token, mask in scene_masks.items():
            if token in truth:
                rows.append({"kind": kind, "scene": record.image.stem, "token": token,
                             "role": "background" if token == record.background else "subject",
                             "iou": mask_iou(mask, truth[token] > 0.5), "area": float(mask.float().mean())})
    return rows


def iou_means(rows: list[dict]) -> dict[str, float]:
    """The rows' mean IoU per kind and role ("estimated_subject": ...), in the rows' order."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(f"{row['kind']}_{row['role']}", []).append(row["iou"])
    return {key: sum(values) / len(values) for key, values in groups.items()}


def true_masks(records: Sequence, masks: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The scenes' own masks, bool, for module.masks=ground_truth: every concept of every scene needs one."""
    missing = [(r.image.name, t) for r, m in zip(records, masks) for t in r.concepts if t not in m]
    if missing:
        raise ConfigError(f"module.masks=ground_truth: scene {missing[0][0]} has no mask for {missing[0][1]}; "
                          f"add it to scenes.json or use masks=em")
    return [{t: m > 0.5 for t, m in scene.items()} for scene in masks]
