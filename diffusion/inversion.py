"""Real-image inversion under classifier-free guidance: null-text and negative-prompt inversion.

Both start from a plain DDIM trajectory [z_0, ..., z_N] (`diffusion.sampling.ddim_invert` at
guidance 1, z_N noisiest) and choose, for every sampling step i, the unconditional embedding that
guided sampling from z_N uses, so that sampling at guidance w retraces the trajectory:

- null-text inversion (Mokady et al.; methods.md, "StyleDiffusion (paper 003)"): per step,
  optimise the embedding with Adam so the guided DDIM step lands on the trajectory's next latent;
- negative-prompt inversion (Miyake et al.): no optimisation, the source prompt's embedding.

The result is an `UncondSchedule`: one unconditional `Conditioning` per sampling step, callable
as `(step index, timestep) -> Conditioning`, the schedule `ddim_sample` takes as its `uncond`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion.backbone import Backbone, Conditioning
from diffusion.sampling import CondSchedule, DDIMSchedule, ddim_sample, guided_epsilon


@dataclass
class UncondSchedule:
    """The unconditional conditioning of each sampling step (index 0 = the noisiest step).

    `iterations[i]` and `losses[i]` record the optimisation of step i (the inner Adam steps taken
    and the last reconstruction loss measured); they are 0 and nan where nothing was optimised.
    """

    embeddings: list[Conditioning]
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, step: int) -> Conditioning:
        return self.embeddings[step]

    def __call__(self, step: int, timestep: int) -> Conditioning:
        return self.embeddings[step]


def reconstruct(backbone: Backbone, trajectory: list[torch.Tensor], cond: Conditioning,
                uncond: Conditioning | CondSchedule, num_steps: int, guidance_scale: float = 7.5) -> torch.Tensor:
    """z_0 as guided sampling from the trajectory's z_N sees it (compare with trajectory[0])."""
    _check_trajectory(trajectory, num_steps)
    return ddim_sample(backbone, cond, trajectory[-1], uncond, num_steps, guidance_scale)


def _check_trajectory(trajectory: list[torch.Tensor], num_steps: int) -> None:
    if len(trajectory) != num_steps + 1:
        raise ValueError(f"a {num_steps}-step inversion needs {num_steps + 1} latents [z_0, ..., z_N], "
                         f"got {len(trajectory)}")


def _optimise_step(backbone: Backbone, x: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   eps_c: torch.Tensor, start: torch.Tensor, like: Conditioning, a_from: torch.Tensor,
                   a_to: torch.Tensor, schedule: DDIMSchedule, guidance_scale: float, lr: float,
                   inner_steps: int, threshold: float) -> tuple[torch.Tensor, int, float]:
    """Adam on the unconditional hidden states of one step: (embedding, iterations, last loss).

    The loss is MSE(DDIM step of eps_u + w (eps_c - eps_u) from x, target); it stops once the loss
    measured before an update is below `threshold` (that update is still applied, as Mokady et al.).
    """
    embedding = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    loss, done = float("nan"), 0
    with torch.enable_grad():
        while done < inner_steps:
            c = Conditioning(embedding.to(backbone.dtype), like.pooled, like.time_ids)
            eps_u = backbone.to_epsilon(backbone.predict(x, t, c), x, t.expand(x.shape[0])).float()
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            mse = F.mse_loss(schedule.step(x, eps, a_from, a_to), target.float())
            optimizer.zero_grad(set_to_none=True)
            mse.backward()
            optimizer.step()
            loss, done = mse.item(), done + 1
            if loss < threshold:
                break
    return embedding.detach(), done, loss


def null_text_inversion(backbone: Backbone, trajectory: list[torch.Tensor], cond: Conditioning, num_steps: int,
                        guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                        lr_decay: float = 1e-2, early_stop: float = 1e-5, early_stop_growth: float = 2e-5,
                        uncond: Conditioning | None = None, progress: bool = False) -> UncondSchedule:
    """Per-step unconditional embeddings that make guided sampling retrace a DDIM trajectory.

    Mokady et al. (methods.md): for sampling step i = 0..N-1 from z_N, Adam at lr (1 - i lr_decay)
    on the unconditional hidden states, warm-started from step i-1's result (step 0 from `uncond`,
    default the "" embedding), for up to `inner_steps` updates, stopping early once the loss is below
    early_stop + i early_stop_growth; the loss is MSE between the guided DDIM step from the current
    latent and trajectory[N-1-i]. The latent then advances with the optimised embedding, so
    `ddim_sample` with the result as its uncond repeats these latents. Only the hidden states are optimised
    (SDXL's pooled text and size ids stay those of `uncond`). `trajectory` is one image's (batch 1).
    """
    _check_trajectory(trajectory, num_steps)
    if trajectory[0].shape[0] != 1:
        raise ValueError(f"null-text inversion optimises one image's embedding; "
                         f"got a batch of {trajectory[0].shape[0]}")
    uncond = backbone.encode_prompt([""]) if uncond is None else uncond
    schedule = DDIMSchedule(backbone.scheduler.config, num_steps)
    embedding = uncond.hidden_states.float()
    result = UncondSchedule([])
    x = trajectory[-1]
    for i in tqdm(range(num_steps), disable=not progress, desc="null-text inversion", leave=False):
        t = schedule.timesteps[i].to(x.device)
        a_from, a_to = schedule.alpha(i), schedule.alpha(i + 1)
        with torch.no_grad():
            eps_c = backbone.to_epsilon(backbone.predict(x, t, cond), x, t.expand(x.shape[0])).float()
        embedding, done, loss = _optimise_step(
            backbone, x, trajectory[num_steps - 1 - i], t, eps_c, embedding, uncond, a_from, a_to, schedule,
            guidance_scale, lr * (1 - i * lr_decay), inner_steps, early_stop + i * early_stop_growth)
        step_uncond = Conditioning(embedding.to(uncond.hidden_states.dtype), uncond.pooled, uncond.time_ids)
        result.embeddings.append(step_uncond)
        result.iterations.append(done)
        result.losses.append(loss)
        with torch.no_grad():
            eps = guided_epsilon(backbone, x, t, cond, step_uncond, guidance_scale)
            x = schedule.step(x, eps, a_from, a_to).to(trajectory[-1].dtype)
    return result


def negative_prompt_inversion(cond: Conditioning, num_steps: int) -> UncondSchedule:
    """Negative-prompt inversion (Miyake et al.): every step's unconditional embedding is the source
    prompt's, so guided sampling from z_N of a DDIM trajectory follows the guidance-1 sampler."""
    return UncondSchedule([cond] * num_steps, [0] * num_steps, [float("nan")] * num_steps)
