"""Real-image inversion: null-text and negative-prompt inversion under classifier-free guidance, and
the DDIM trajectory with its cross-attention maps that StyleDiffusion fits to.

Both start from a plain DDIM trajectory [z_0, ..., z_N] (`diffusion.sampling.ddim_invert` at
guidance 1, z_N noisiest) and choose, for every sampling step i, the unconditional embedding that
guided sampling from z_N uses, so that sampling at guidance w retraces the trajectory:

- null-text inversion (Mokady et al.; methods.md, "StyleDiffusion (paper 003)"): per step,
  optimise the embedding with Adam so the guided DDIM step lands on the trajectory's next latent;
- negative-prompt inversion (Miyake et al.): no optimisation, the source prompt's embedding.

The result is an `UncondSchedule`: one unconditional `Conditioning` per sampling step, callable
as `(step index, timestep) -> Conditioning`, the schedule `ddim_sample` takes as its `uncond`.

StyleDiffusion (paper 003, Sec. 3.3.1 and Alg. 1; T = 30, Sec. 4) needs more of the inversion at
guidance 1 with the source prompt: `invert_image` returns a `Trajectory`,

- `latents` [N+1, C, h, w]: z*_0 (the VAE latent of the image) ... z*_N (noisiest), the order of
  `ddim_invert`; sampling step i goes from latents[N-i] to latents[N-1-i];
- `maps` [N, r, r, K]: the r x r (16) cross-attention maps of inversion step k (the UNet call on
  z*_k at the timestep of sampling step N-1-k), averaged over heads and over the down / up layers
  of that resolution, over all K text keys (token positions 0..76: start, words, end, padding).
  `Trajectory.step_map(i)` pairs them with sampling steps as the authors' code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion.attention import AttentionHub, AttentionStore
from diffusion.backbone import Backbone, Conditioning
from diffusion.cuda_graphs import graphed_unet
from diffusion.sampling import CondSchedule, DDIMSchedule, ddim_invert, ddim_sample


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
    trajectory = _checked_trajectory(backbone, trajectory, num_steps)
    return ddim_sample(backbone, cond, trajectory[-1], uncond, num_steps, guidance_scale)


def _checked_trajectory(backbone: Backbone, trajectory: list[torch.Tensor], num_steps: int) -> list[torch.Tensor]:
    """The trajectory on the backbone's device (a `Trajectory` keeps its latents on the CPU)."""
    if len(trajectory) != num_steps + 1:
        raise ValueError(f"a {num_steps}-step inversion needs {num_steps + 1} latents [z_0, ..., z_N], "
                         f"got {len(trajectory)}")
    return [z.to(backbone.device) for z in trajectory]


def _read_later(value: torch.Tensor) -> Callable[[], float]:
    """A device scalar copied to the host now, without waiting: the returned call waits for that copy alone
    (not for work queued after it) and gives the number."""
    if value.device.type != "cuda":
        return value.item
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(value.device))

    def read() -> float:
        copied.synchronize()
        return host.item()
    return read


def optimise_until_below(loss_and_gradient: Callable[[], torch.Tensor], update: Callable[[], None],
                         max_updates: int, threshold: float) -> tuple[int, float]:
    """The inner loop of both inversions: up to `max_updates` updates, each from the gradient that
    `loss_and_gradient()` (zero the gradients, forward, backward; returns the loss) leaves; it stops once the loss
    measured before an update is below `threshold` (that update is still applied, as Mokady et al.). Returns
    (updates, last loss).

    The next update's forward and backward are queued before a loss is read, so the GPU never idles while the
    host checks it; when the check stops the loop, that one gradient goes unused.
    """
    done, loss = 0, float("nan")
    pending = loss_and_gradient() if max_updates > 0 else None
    while pending is not None:
        read_loss = _read_later(pending.detach())
        update()  # from `pending`'s gradient, applied whatever its loss
        done += 1
        pending = loss_and_gradient() if done < max_updates else None
        loss = read_loss()
        if loss < threshold:
            break
    return done, loss


def _optimise_step(backbone: Backbone, x: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   eps_c: torch.Tensor, start: torch.Tensor, like: Conditioning, a_from: torch.Tensor,
                   a_to: torch.Tensor, schedule: DDIMSchedule, guidance_scale: float, lr: float,
                   inner_steps: int, threshold: float) -> tuple[torch.Tensor, int, float]:
    """Adam on the unconditional hidden states of one step: (embedding, iterations, last loss); the loss is
    MSE(DDIM step of eps_u + w (eps_c - eps_u) from x, target), the early stop `optimise_until_below`'s."""
    embedding = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)

    def loss_and_gradient() -> torch.Tensor:
        c = Conditioning(embedding.to(backbone.dtype), like.pooled, like.time_ids)
        eps_u = backbone.to_epsilon(backbone.predict(x, t, c), x, t.expand(x.shape[0])).float()
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        mse = F.mse_loss(schedule.step(x, eps, a_from, a_to), target.float())
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        return mse

    with torch.enable_grad():
        done, loss = optimise_until_below(loss_and_gradient, optimizer.step, inner_steps, threshold)
    return embedding.detach(), done, loss


def null_text_inversion(backbone: Backbone, trajectory: list[torch.Tensor], cond: Conditioning, num_steps: int,
                        guidance_scale: float = 7.5, inner_steps: int = 10, lr: float = 1e-2,
                        lr_decay: float = 1e-2, early_stop: float = 1e-5, early_stop_growth: float = 2e-5,
                        uncond: Conditioning | None = None, progress: bool = False,
                        cuda_graphs: bool = True) -> UncondSchedule:
    """Per-step unconditional embeddings that make guided sampling retrace a DDIM trajectory.

    Mokady et al. (methods.md): for sampling step i = 0..N-1 from z_N, Adam at lr (1 - i lr_decay)
    on the unconditional hidden states, warm-started from step i-1's result (step 0 from `uncond`,
    default the "" embedding), for up to `inner_steps` updates, stopping early once the loss is below
    early_stop + i early_stop_growth; the loss is MSE between the guided DDIM step from the current
    latent and trajectory[N-1-i]. The latent then advances with the optimised embedding, so
    `ddim_sample` with the result as its uncond repeats these latents. Only the hidden states are optimised
    (SDXL's pooled text and size ids stay those of `uncond`). `trajectory` is one image's (batch 1).
    On a GPU the UNet calls replay CUDA graphs (`graphed_unet`: a batch-1 step is bound by kernel launches);
    cuda_graphs=False runs them eager.
    """
    trajectory = _checked_trajectory(backbone, trajectory, num_steps)
    if trajectory[0].shape[0] != 1:
        raise ValueError(f"null-text inversion optimises one image's embedding; "
                         f"got a batch of {trajectory[0].shape[0]}")
    uncond = backbone.encode_prompt([""]) if uncond is None else uncond
    x = trajectory[-1]
    schedule = DDIMSchedule(backbone.scheduler.config, num_steps, x.device)
    embedding = uncond.hidden_states.float()
    result = UncondSchedule([])
    with graphed_unet(backbone, cuda_graphs):
        for i in tqdm(range(num_steps), disable=not progress, desc="null-text inversion", leave=False):
            t = schedule.timestep(i)
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
            with torch.no_grad():  # the guided step with the optimised embedding; eps_c is this step's already
                eps_u = backbone.to_epsilon(backbone.predict(x, t, step_uncond), x, t.expand(x.shape[0])).float()
                x = schedule.step(x, eps_u + guidance_scale * (eps_c - eps_u), a_from, a_to).to(trajectory[-1].dtype)
    return result


def negative_prompt_inversion(cond: Conditioning, num_steps: int) -> UncondSchedule:
    """Negative-prompt inversion (Miyake et al.): every step's unconditional embedding is the source
    prompt's, so guided sampling from z_N of a DDIM trajectory follows the guidance-1 sampler."""
    return UncondSchedule([cond] * num_steps, [0] * num_steps, [float("nan")] * num_steps)


# ----- StyleDiffusion's targets: the trajectory with its cross-attention maps -------------------------
@dataclass
class Trajectory:
    """One image's DDIM inversion: latents [N+1, C, h, w] (z*_0 .. z*_N) and maps [N, r, r, K]."""

    latents: torch.Tensor
    maps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.maps.shape[0]

    def latent_list(self) -> list[torch.Tensor]:
        """[z*_0, ..., z*_N] as batch-1 tensors, what `ddim_invert` returns and the inversions above take."""
        return list(self.latents.unsqueeze(1).unbind(0))

    def step_map(self, i: int) -> torch.Tensor:
        """The inverted maps sampling step i is regressed on: those recorded on z*_{N-i}, its input
        latent (the reference code's pairing; step 0 takes the last inversion step's maps)."""
        return self.maps[min(self.num_steps - i, self.num_steps - 1)]


def step_maps(store: AttentionStore, resolution: int) -> torch.Tensor:
    """[calls, batch, r, r, K]: per UNet call, the recorded cross maps of that resolution averaged over layers."""
    layers = [torch.stack(maps) for place, maps in store.maps.items()
              if place.is_cross and store.hw[place] == (resolution, resolution)]
    if not layers:
        raise ValueError(f"no cross-attention maps recorded at {resolution}x{resolution}; the UNet has no "
                         f"cross-attention layer of that size in the chosen blocks")
    mean = torch.stack(layers).mean(0)
    return mean.reshape(*mean.shape[:2], resolution, resolution, mean.shape[-1])


@torch.no_grad()
def invert_image(backbone: Backbone, pixels: torch.Tensor, prompt: str, num_steps: int, map_resolution: int = 16,
                 map_blocks: Sequence[str] = ("down", "up"), encode_seed: int = 0) -> Trajectory:
    """DDIM inversion at guidance 1 of one image [3, H, W] in [-1, 1], recording the conditional
    branch's cross-attention maps (heads averaged) of every step. A hub already installed on the
    UNet is stacked over for the duration and comes back after."""
    generator = torch.Generator(backbone.device).manual_seed(encode_seed)
    z0 = backbone.encode_images(pixels[None].to(backbone.device), generator).float()
    return invert_latents(backbone, z0, prompt, num_steps, map_resolution, map_blocks)


def invert_latents(backbone: Backbone, z0: torch.Tensor, prompt: str, num_steps: int, map_resolution: int = 16,
                   map_blocks: Sequence[str] = ("down", "up")) -> Trajectory:
    """`invert_image` from the image's latents z_0 [1, C, h, w]."""
    store = AttentionStore(cross=True, blocks=tuple(map_blocks), resolutions=[map_resolution], cond_only=True,
                           average_heads=True)
    with AttentionHub(backbone.unet, [store]) as hub:
        trajectory = ddim_invert(backbone, z0, backbone.encode_prompt([prompt]), num_steps, guidance_scale=1.0,
                                 hub=hub)
    maps = step_maps(store, map_resolution)[:, 0]
    return Trajectory(torch.cat(trajectory).float().cpu(), maps.float().cpu())
