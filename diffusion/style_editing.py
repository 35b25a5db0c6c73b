"""StyleDiffusion (paper 003): replay and editing of an inverted image (a `StyleInversion`, Algorithm 1's result).

`reconstruct` samples from z*_T with the source prompt, w = 7.5, M_i's values at step i. `edit` samples
[source, targets] in one batch: the source row as `reconstruct`, each target row with the target prompt as
keys and M_i's values for steps i < tau_v T, the target prompt's own embedding as values after; a
prompt-to-prompt controller (AttentionReplace for equal word counts, else AttentionRefine) with tau_c,
tau_s and P2Plus's tau_u (`uncond_self_steps`: the unconditional branch's self-attention replaced too),
and with `blend_words` prompt-to-prompt's LocalBlend (diffusion/prompt_to_prompt.py): target rows change
only where the blend words attend.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffusion.attention import AttentionHub
from diffusion.backbone import Backbone, Conditioning
from diffusion.prompt_to_prompt import BlendWords, edit_blend, edit_controller
from diffusion.sampling import ddim_sample, sdedit_start
from diffusion.style_inversion import StyleInversion, value_rows


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
