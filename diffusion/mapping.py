"""StyleDiffusion's mapping networks M_t (paper 003, Sec. 3.3.1, Table 1, Sec. 4.1).

M_t maps the image tokens E(x) [B, 197, 768] to the input of the cross-attention *value*
projections, [B, 77, d]: kernel-1 Conv1d layers whose channels are the token axis (Table 1):

    Conv0 (197 -> 77), Conv1 (77 -> 77), BatchNorm1d(77), LeakyReLU, Conv2 (77 -> 77)

All conv weights are drawn from N(0, 0.01) with zero biases (Sec. 4.1: "a Gaussian distribution
centered at 0 with 0.01 standard deviation"). Two choices the paper leaves open:

- width: the tokens keep the image feature width (768 for ViT-B/16). When the UNet's
  cross_attention_dim differs (SD2's 1024, SDXL's 2048, the tiny test model's 32), a linear
  projection feature_dim -> out_dim follows the convs (same N(0, 0.01) init); on SD1.x
  (768 = 768) there is none.
- BatchNorm runs on batch statistics always (`track_running_stats=False`): M_t is trained on one
  image, so the statistics at replay are those it was trained with, and train / eval modes agree.
  LeakyReLU's slope is not given; PyTorch's default 0.01 is used (`negative_slope`).

`film=True` is the authors' code (methods.md): the last conv has 154 output channels and the
value input is FiLM on the source text embedding c: v_in = c * out[:77] + out[77:].

`MappingNetworks` holds one M_t per sampling step (index i = 0 is the noisiest step, t = T) and
does the warm start of Algorithm 1: M_i starts from M_{i-1}'s weights. `MappingSettings` is the config's
`mapping` section (film, negative_slope, init_std; conf/style_diffusion/settings.yaml holds the values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.checks import is_number
from utils.errors import ConfigError
from utils.settings import Settings


@dataclass(frozen=True)
class MappingSettings(Settings):
    """module.mapping: MappingNetwork's film, negative_slope and init_std (the yaml's values)."""

    key = "module.mapping"
    film: bool
    negative_slope: float
    init_std: float

    def __post_init__(self):
        if not isinstance(self.film, bool):
            raise ConfigError(f"{self.key}.film={self.film!r} must be true or false")
        if not is_number(self.negative_slope):
            raise ConfigError(f"{self.key}.negative_slope={self.negative_slope!r} must be a number")
        if not (is_number(self.init_std) and self.init_std > 0):
            raise ConfigError(f"{self.key}.init_std={self.init_std!r} must be a number > 0")


class MappingNetwork(nn.Module):
    """E(x) [B, tokens_in, feature_dim] -> value input [B, tokens_out, out_dim] (Table 1)."""

    def __init__(self, tokens_in: int = 197, tokens_out: int = 77, feature_dim: int = 768,
                 out_dim: int | None = None, film: bool = False, negative_slope: float = 0.01,
                 init_std: float = 0.01):
        super().__init__()
        self.tokens_in, self.tokens_out = tokens_in, tokens_out
        self.feature_dim, self.out_dim = feature_dim, out_dim or feature_dim
        self.film, self.init_std = film, init_std
        last = 2 * tokens_out if film else tokens_out
        self.conv0 = nn.Conv1d(tokens_in, tokens_out, kernel_size=1, stride=1)
        self.conv1 = nn.Conv1d(tokens_out, tokens_out, kernel_size=1, stride=1)
        self.norm1 = nn.BatchNorm1d(tokens_out, track_running_stats=False)
        self.act1 = nn.LeakyReLU(negative_slope)
        self.conv2 = nn.Conv1d(tokens_out, last, kernel_size=1, stride=1)
        # width projection only where the image features and the UNet's text width differ
        self.proj = nn.Linear(feature_dim, self.out_dim) if self.out_dim != feature_dim else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Weights ~ N(0, init_std) (Sec. 4.1), biases 0, BatchNorm's affine at identity."""
        for layer in (self.conv0, self.conv1, self.conv2, self.proj):
            if layer is None:
                continue
            with torch.no_grad():
                nn.init.normal_(layer.weight, 0.0, self.init_std, generator=generator)
                nn.init.zeros_(layer.bias)
        self.norm1.reset_parameters()

    def forward(self, features: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv0(features.float())
        x = self.conv2(self.act1(self.norm1(self.conv1(x))))
        if self.proj is not None:
            x = self.proj(x)
        if not self.film:
            return x
        if text is None:
            raise ValueError("the FiLM mapping network needs the source text embedding c")
        scale, shift = x[:, :self.tokens_out], x[:, self.tokens_out:]
        return text.float() * scale + shift


class MappingNetworks(nn.Module):
    """One MappingNetwork per sampling step; `warm_start(i)` copies M_{i-1} into M_i (Algorithm 1)."""

    def __init__(self, num_steps: int, **network):
        super().__init__()
        self.settings = dict(network)
        self.nets = nn.ModuleList(MappingNetwork(**network) for _ in range(num_steps))

    def __len__(self) -> int:
        return len(self.nets)

    def __getitem__(self, i: int) -> MappingNetwork:
        return self.nets[i]

    def warm_start(self, i: int) -> None:
        """Start step i's network from step i-1's trained weights (step 0 keeps its initialisation)."""
        if i > 0:
            self.nets[i].load_state_dict(self.nets[i - 1].state_dict())

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh N(0, 0.01) weights for every step (the next image starts from scratch)."""
        for net in self.nets:
            net.reset_parameters(generator)
