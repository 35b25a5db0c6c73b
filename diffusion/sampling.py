"""DDIM sampling with classifier-free guidance, partial denoising (SDEdit's start step), and DDIM inversion.

One DDIM update (`DDIMSchedule.step`) serves both directions, so an inverted trajectory and its
reconstruction use the same timesteps and the same alphas. With guidance, the conditional and
unconditional predictions come from one batched UNet call ([uncond; cond]).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from diffusion.attention import AttentionHub
from diffusion.backbone import Backbone, Conditioning
from diffusion.cuda_graphs import graphed_sampling
from diffusion.flow import FlowBackbone, flow_generate
from utils.errors import ConfigError


class DDIMSchedule:
    """Timesteps (descending) and alphas of an N-step DDIM run with the backbone's beta schedule.

    The alphas, and the timesteps' copy that `timestep` reads, live on `device`: a sampling or inversion step
    then moves nothing from the host, and a blocking host-to-device copy (which waits for all queued GPU work)
    never stalls the loop. The copies here are asynchronous too: a training step may make a schedule each time
    (Concept Sliders' partial denoising)."""

    def __init__(self, scheduler_config, num_steps: int, device: torch.device | str | None = None):
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_steps)
        self.num_steps = num_steps
        self.timesteps = scheduler.timesteps.long()  # t_0 > t_1 > ... (index 0 is the noisiest), on the host
        self.device_timesteps = self.timesteps.to(device, non_blocking=True)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device, non_blocking=True)
        self.final_alpha = scheduler.final_alpha_cumprod.to(device, non_blocking=True)

    def timestep(self, index: int) -> torch.Tensor:
        """t of step `index` on the schedule's device (a 0-dim tensor)."""
        return self.device_timesteps[index]

    def alpha(self, index: int) -> torch.Tensor:
        """alpha_bar at the timestep of step `index`; index == num_steps is the clean end."""
        if index >= self.num_steps:
            return self.final_alpha
        return self.alphas_cumprod[int(self.timesteps[index])]

    def step(self, x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor,
             eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Move x from noise level a_from to a_to along the predicted x0 (eq. 12 of DDIM)."""
        a_from, a_to = a_from.to(x.device, torch.float32), a_to.to(x.device, torch.float32)
        x, eps = x.float(), eps.float()
        x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        sigma = eta * ((1 - a_to) / (1 - a_from) * (1 - a_from / a_to)).clamp(min=0).sqrt() if eta else 0.0
        out = a_to.sqrt() * x0 + (1 - a_to - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta and noise is not None:
            out = out + sigma * noise
        return out


def guided_epsilon(backbone: Backbone, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning | None, guidance_scale: float, hub: AttentionHub | None = None,
                   cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """eps_u + w (eps_c - eps_u) from one batched UNet call; plain eps_c when w == 1 or no uncond."""
    guided = uncond is not None and guidance_scale != 1.0
    x = torch.cat([latents, latents]) if guided else latents
    c = Conditioning.cat([uncond.expand(len(cond)), cond]) if guided else cond
    if hub is not None:
        hub.state.cfg = guided
    out = backbone.to_epsilon(backbone.predict(x, t, c, cross_attention_kwargs), x, t.expand(x.shape[0]))
    if not guided:
        return out
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


CondSchedule = Callable[[int, int], Conditioning]  # (step index, timestep) -> the conditioning of that step


@torch.no_grad()
def ddim_sample(backbone: Backbone, cond: Conditioning | CondSchedule, latents: torch.Tensor,
                uncond: Conditioning | CondSchedule | None = None, num_steps: int = 50, guidance_scale: float = 7.5,
                eta: float = 0.0, start_step: int = 0, stop_step: int | None = None,
                generator: torch.Generator | None = None, hub: AttentionHub | None = None,
                cross_attention_kwargs: dict | Callable[[int], dict] | None = None,
                step_callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
                progress: bool = False, cuda_graphs: bool = True) -> torch.Tensor:
    """Denoise `latents` from step `start_step` to `stop_step` (default: the end) of an N-step DDIM run.

    Partial denoising stops early (Prompt / Concept Sliders); `step_callback(i, latents)` may
    return replacement latents (e.g. local blending); `cond` and `uncond` may change with the step
    (schedules: a null-text inversion's unconditional embeddings), and so may the UNet's
    `cross_attention_kwargs` (a callable of the step index: StyleDiffusion's per-step value inputs).
    Deterministic for a given generator. On a GPU the loop's UNet calls replay CUDA graphs where the UNet's
    set-up allows (`graphed_sampling`: a batch-1 step is bound by kernel launches); cuda_graphs=False runs eager.
    """
    schedule = DDIMSchedule(backbone.scheduler.config, num_steps, latents.device)
    stop = num_steps if stop_step is None else stop_step
    x = latents
    with graphed_sampling(backbone, cuda_graphs, calls=stop - start_step):
        for i in tqdm(range(start_step, stop), disable=not progress, desc="ddim", leave=False):
            t = schedule.timestep(i)
            if hub is not None:
                hub.state.step, hub.state.num_steps = i, num_steps
            c = cond(i, int(schedule.timesteps[i])) if callable(cond) else cond
            u = uncond(i, int(schedule.timesteps[i])) if callable(uncond) else uncond
            kwargs = cross_attention_kwargs(i) if callable(cross_attention_kwargs) else cross_attention_kwargs
            eps = guided_epsilon(backbone, x, t, c, u, guidance_scale, hub, kwargs)
            noise = None
            if eta:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x = schedule.step(x, eps, schedule.alpha(i), schedule.alpha(i + 1), eta, noise).to(latents.dtype)
            if step_callback is not None:
                replaced = step_callback(i, x)
                x = x if replaced is None else replaced
    if hub is not None:
        hub.state.step = hub.state.num_steps = None
        hub.state.cfg = False
    return x


def sdedit_start(num_steps: int, strength: float) -> int:
    """The sampling step SDEdit starts at: round((1 - strength) N) (N: no step, 0: the noisiest)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"sdedit strength={strength} is outside [0, 1]; 0 keeps the image, 1 ignores it")
    return round((1.0 - strength) * num_steps)


@torch.no_grad()
def ddim_invert(backbone: Backbone, latents: torch.Tensor, cond: Conditioning, num_steps: int = 50,
                uncond: Conditioning | None = None, guidance_scale: float = 1.0, hub: AttentionHub | None = None,
                progress: bool = False, cuda_graphs: bool = True) -> list[torch.Tensor]:
    """DDIM inversion: [z_0, z_1, ..., z_N] with z_N the noisiest; ddim_sample(z_N) retraces it.

    Step k uses the prediction at the timestep of sampling step N-1-k, the same pairs of noise
    levels as sampling visits in reverse (prompt-to-prompt's null-text inversion does the same).
    CUDA graphs as in `ddim_sample`.
    """
    schedule = DDIMSchedule(backbone.scheduler.config, num_steps, latents.device)
    trajectory = [latents]
    x = latents
    with graphed_sampling(backbone, cuda_graphs, calls=num_steps):
        for k in tqdm(range(num_steps), disable=not progress, desc="ddim inversion", leave=False):
            i = num_steps - 1 - k  # the sampling step this inversion step undoes
            t = schedule.timestep(i)
            if hub is not None:
                hub.state.step, hub.state.num_steps = i, num_steps
            eps = guided_epsilon(backbone, x, t, cond, uncond, guidance_scale, hub)
            x = schedule.step(x, eps, schedule.alpha(i + 1), schedule.alpha(i)).to(latents.dtype)
            trajectory.append(x)
    if hub is not None:
        hub.state.step = hub.state.num_steps = None
        hub.state.cfg = False
    return trajectory


def initial_noise(backbone: Backbone, batch: int, generator: torch.Generator | None = None,
                  device=None, resolution: int | None = None) -> torch.Tensor:
    size = (resolution or backbone.resolution) // backbone.vae_scale_factor
    shape = (batch, backbone.unet.config.in_channels, size, size)
    return torch.randn(shape, generator=generator, device=device or backbone.device, dtype=torch.float32)


@torch.no_grad()
def generate(backbone: Backbone | FlowBackbone, prompts: list[str], seed: int | Sequence[int] = 0, num_steps: int = 50,
             guidance_scale: float = 7.5, negative_prompt: str = "", hub: AttentionHub | None = None,
             progress: bool = False, encode: Callable[[list[str]], Conditioning | CondSchedule] | None = None,
             resolution: int | None = None, decode: bool = True, cuda_graphs: bool = True) -> torch.Tensor:
    """Images in [0, 1], [B, 3, H, W], for prompts in one batch (latents with decode=False).

    `seed` is one seed per prompt, or an int s meaning s, s+1, ...: each sample's noise comes from
    its own seed, so a sample does not depend on what else is in the batch. `encode` replaces the
    backbone's prompt encoding (e.g. a slider that edits the text states, or changes them with t).
    A rectified-flow backbone (SD3, FLUX) samples with its pipeline's Euler steps (diffusion.flow.flow_generate).
    """
    device = backbone.device
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if isinstance(backbone, FlowBackbone):
        if hub is not None:
            raise ConfigError("attention controllers hook UNet backbones only; sample this SD3 / FLUX model "
                              "without a method that edits attention")
        return flow_generate(backbone, prompts, seeds, num_steps, guidance_scale, negative_prompt, encode, resolution,
                             decode)
    noise = torch.cat([initial_noise(backbone, 1, torch.Generator(device).manual_seed(s), device, resolution)
                       for s in seeds])
    cond = (encode or backbone.encode_prompt)(prompts)
    uncond = backbone.encode_prompt([negative_prompt])
    latents = ddim_sample(backbone, cond, noise, uncond, num_steps, guidance_scale, hub=hub, progress=progress,
                          cuda_graphs=cuda_graphs)
    return backbone.decode_latents(latents) if decode else latents
