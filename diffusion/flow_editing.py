"""Real-image editing on rectified-flow backbones (SD3, FLUX.1): inversion of the flow ODE, then prompt-to-prompt.

`FlowInversionP2P` (conf/edit_method/flow_p2p.yaml) is an edit method as diffusion/editing.py defines them:

    method(backbone, z0 [1, C, h, w], source, target, num_steps, guidance_scale, seed) -> latents [2, C, h, w]

1. z_0 is carried to noise by the sampling ODE run forwards (diffusion.flow.flow_invert) with the source prompt
   at `inversion_guidance`; `gamma` > 0 is RF-Inversion's controlled forward ODE (Rout et al. 2024, Algorithm 1),
   which pulls the path towards a seeded noise sample and inverts with "" as the paper does.
2. [source, target] are Euler-sampled from that noise at `guidance_scale` under prompt-to-prompt's controller on
   the joint attention's text-to-image maps (diffusion.flow_attention): the target takes the source's maps for
   steps < tau_c N, through the word-swap mapper for equal word counts, else the refinement mapper.

Row 0 is the reconstruction, row 1 the edit; both start from the same noise and step the same sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusion.editing import KEY, EditMethod, check_controller, check_controller_prompts, fraction
from diffusion.flow import FlowBackbone, flow_invert
from diffusion.flow_attention import (FlowAttentionHub, controlled_euler_sample, flow_attention_refine,
                                      flow_attention_replace)
from utils.checks import is_number
from utils.errors import ConfigError

INVERSION_PROMPTS = ("source", "empty")


@dataclass
class FlowInversionP2P(EditMethod):
    """Flow inversion of z_0 (RF-Inversion with gamma > 0), then [source, target] under prompt-to-prompt."""

    flow_backbones = True
    controller: str            # auto | replace | refine
    tau_c: float               # the target takes the source's text-to-image maps for steps < tau_c N
    inversion_guidance: float  # SD3: classifier-free guidance while inverting (<= 1: the conditional pass alone);
                               #   FLUX.1-dev: the guidance embedding's input while inverting
    gamma: float               # RF-Inversion's controller strength in [0, 1]; 0: the plain inverted ODE
    invert_with: str           # source (the source prompt) | empty ("", RF-Inversion's unconditional velocity)

    def __post_init__(self):
        super().__post_init__()
        self.controller = check_controller(self.controller)
        self.tau_c = fraction(f"{KEY}tau_c", self.tau_c)
        self.gamma = fraction(f"{KEY}gamma", self.gamma)
        if not (is_number(self.inversion_guidance) and self.inversion_guidance >= 0):
            raise ConfigError(f"{KEY}inversion_guidance={self.inversion_guidance!r} must be a number >= 0")
        self.inversion_guidance = float(self.inversion_guidance)
        if self.invert_with not in INVERSION_PROMPTS:
            raise ConfigError(f"{KEY}invert_with={self.invert_with!r} is unknown; use source or empty")

    def check_prompts(self, source: str, target: str) -> None:
        check_controller_prompts(self.controller, source, target)

    def attention_edit(self, backbone: FlowBackbone, source: str, target: str):
        """The controller that edits the target row's maps: word swap for equal word counts, else refinement."""
        replace = self.controller == "replace" or (
            self.controller == "auto" and len(source.split()) == len(target.split()))
        build = flow_attention_replace if replace else flow_attention_refine
        return build(backbone, source, [target], cross_steps=self.tau_c)

    @torch.no_grad()
    def edit(self, backbone, z0, source, target, num_steps, guidance_scale, seed, pixels):
        controller = self.attention_edit(backbone, source, target)
        if backbone.kind == "flux" and not backbone.embeds_guidance:
            guidance_scale = 1.0  # FLUX.1-schnell is guidance-distilled: its pipeline ignores guidance_scale
        cfg = not backbone.embeds_guidance
        negative = backbone.encode_prompt([""]) if cfg else None
        sigmas = backbone.sigmas(num_steps, backbone.image_seq_len(z0))
        inversion_prompt = source if self.invert_with == "source" else ""
        target_noise = None
        if self.gamma > 0:
            generator = torch.Generator(z0.device).manual_seed(seed)
            target_noise = torch.randn(z0.shape, generator=generator, device=z0.device).to(z0.dtype)
        noise = flow_invert(backbone, backbone.encode_prompt([inversion_prompt]), z0, sigmas,
                            self.inversion_guidance, negative if cfg and self.inversion_guidance > 1 else None,
                            controller_gamma=self.gamma, target_noise=target_noise)
        cond = backbone.encode_prompt([source, target])
        with FlowAttentionHub(backbone, [controller]) as hub:
            return controlled_euler_sample(hub, backbone, cond, noise.expand(2, *noise.shape[1:]), sigmas,
                                           guidance_scale, negative if cfg and guidance_scale > 1 else None)
