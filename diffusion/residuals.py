"""Personalized residuals (paper 002): low-rank offsets dW_i = A_i B_i on chosen layers of a frozen UNet,
and localized attention-guided (LAG) sampling.

The residuals are a PEFT LoRA adapter with one rank per layer (r_i = ratio * m_i, alpha_i = r_i so
W'_i = W_i + A_i B_i exactly), so the file is diffusers' LoRA format and `load_lora_weights` reads it
for normal sampling. LAG (eq. 3) needs no second copy of a layer: the adapter's output is multiplied
by the block's mask, W x + M * dW x = (1 - M) W x + M (W + dW) x, exactly W x where M = 0.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from diffusion.attention import AttentionHub, TokenMask, last_cross_layers, word_token_indices
from diffusion.cuda_graphs import replayable_hook
from diffusion.lora import add_lora, set_lora_scale
from utils.errors import ArtifactError, ConfigError
from utils.io import read_info_beside

ADAPTER = "residual"
# Table 3's targets; '+' combines them ("kv+proj_out")
TARGETS = {
    "proj_out": r"attentions\.\d+\.proj_out",  # the paper's: each transformer block's output projection
    "proj_in": r"attentions\.\d+\.proj_in",
    "kv": r"attentions\.\d+\.transformer_blocks\.\d+\.attn2\.(to_k|to_v)",  # cross-attention K/V (Custom Diffusion)
}
INITS = ("random", "zero")


def target_layers(unet: nn.Module, targets: str) -> dict[str, nn.Module]:
    """The UNet's layers that `targets` ('proj_out', 'kv+proj_out', ...) names, by module name."""
    parts = [p.strip() for p in targets.split("+")]
    unknown = [p for p in parts if p not in TARGETS]
    if unknown or not parts:
        raise ConfigError(f"residual target {unknown[0] if unknown else targets!r} is unknown; use one of "
                          f"{sorted(TARGETS)} or a '+' combination such as kv+proj_out")
    pattern = re.compile(rf"(.*\.)?({'|'.join(TARGETS[p] for p in parts)})")
    layers = {name: m for name, m in unet.named_modules()
              if pattern.fullmatch(name) and isinstance(m, (nn.Linear, nn.Conv2d))}
    if not layers:
        raise ConfigError(f"residual targets {targets!r} match no layer of this UNet")
    return layers


def layer_width(layer: nn.Module) -> int:
    """m_i of a layer: its width (proj_out is m x m; for a non-square K/V map, the smaller side)."""
    if isinstance(layer, nn.Conv2d):
        return min(layer.in_channels, layer.out_channels)
    return min(layer.in_features, layer.out_features)


def residual_ranks(layers: dict[str, nn.Module], rank_ratio: float = 0.05, rank: int | None = None) -> dict[str, int]:
    """r_i per layer: a fixed `rank`, or round(rank_ratio * m_i) and at least 1 (Sec. 4.1: r_i = 0.05 m_i)."""
    if rank is not None:
        if int(rank) < 1:
            raise ConfigError(f"module.rank={rank} must be at least 1 (or null to use module.rank_ratio)")
        return {name: int(rank) for name in layers}
    if not 0 < float(rank_ratio) <= 1:
        raise ConfigError(f"module.rank_ratio={rank_ratio} must be in (0, 1]")
    return {name: max(1, round(float(rank_ratio) * layer_width(m))) for name, m in layers.items()}


def add_residuals(unet: nn.Module, targets: str = "proj_out", rank_ratio: float = 0.05, rank: int | None = None,
                  init: str = "random", seed: int = 0, adapter_name: str = ADAPTER
                  ) -> tuple[list[nn.Parameter], dict[str, int]]:
    """Add the residual adapter; return its trainable (fp32) parameters and the rank of each layer.

    init: random (Sec. 4.1: "each of the low-rank matrices are randomly initialized": A and B drawn as
    a fresh nn.Linear / nn.Conv2d layer's weights, seeded) or zero (B = 0, so training starts at the base
    model, the usual LoRA start)."""
    if init not in INITS:
        raise ConfigError(f"module.init={init!r} is unknown; use one of {INITS}")
    layers = target_layers(unet, targets)
    ranks = residual_ranks(layers, rank_ratio, rank)
    names = [re.escape(n) for n in ranks]
    params = add_lora(unet, max(ranks.values()), max(ranks.values()), f"({'|'.join(names)})",
                      adapter_name=adapter_name, init=init == "zero",
                      rank_pattern={n: r for n, r in ranks.items()}, alpha_pattern={n: r for n, r in ranks.items()})
    if init == "random":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params:  # kaiming-uniform(a=sqrt(5)) bounds, as nn.Linear / nn.Conv2d draw their weights
                bound = 1.0 / p[0].numel() ** 0.5
                p.copy_(torch.empty(p.shape, device="cpu").uniform_(-bound, bound, generator=g))  # seeded on the CPU
    return params, ranks


def lora_b_modules(unet: nn.Module, adapter_name: str = ADAPTER) -> dict[str, nn.Module]:
    """Each adapted layer's B (the residual's output side), by the adapted layer's name."""
    from peft.tuners.lora import LoraLayer

    return {name: m.lora_B[adapter_name] for name, m in unet.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_B}


def concept_selection(tokenizer, prompts: Sequence[str], token_ids: Sequence[int], class_word: str | None,
                      length: int | None = None) -> torch.Tensor:
    """[batch, keys] 0/1: the positions of the concept in each prompt, the V* token(s) and the class word."""
    length = length or tokenizer.model_max_length
    out = torch.zeros(len(prompts), length)
    wanted = set(int(i) for i in token_ids)
    for b, prompt in enumerate(prompts):
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        positions = [k for k, i in enumerate(ids) if i in wanted]
        if class_word and class_word in prompt.split():
            positions += word_token_indices(tokenizer, prompt, class_word)
        if not positions:
            raise ConfigError(f"prompt {prompt!r} names neither the concept token nor its class word; LAG needs "
                              f"one of them to find the concept")
        out[b, positions] = 1.0
    return out


class ResidualSampler:
    """The residual adapter at sampling time: a strength, and LAG for a batch of prompts.

    LAG (Sec. 3.3): in each transformer block the conditional cross-attention of V* and the class
    token, summed and binarised at its median, masks the residuals of the block's output projection
    (the unconditional half of a CFG batch reuses the conditional mask; a block of several transformer
    layers, as on SDXL, uses its last layer's map, and only that layer's attention is read). Other targets
    (K/V, proj_in, which run before the block's attention has a map) keep their residual everywhere.
    """

    def __init__(self, backbone, token_ids: Sequence[int], class_word: str | None, adapter_name: str = ADAPTER):
        self.backbone, self.token_ids, self.class_word = backbone, list(token_ids), class_word
        self.adapter_name = adapter_name
        self.masked = {name: b for name, b in lora_b_modules(backbone.unet, adapter_name).items()
                       if name.endswith("proj_out")}

    @contextlib.contextmanager
    def applied(self, prompts: Sequence[str], lag: bool = False, strength: float = 1.0
                ) -> Iterator[AttentionHub | None]:
        """Inside the block the residual runs at `strength`; with lag, masked by the concept's attention.
        Yields the attention hub to pass to the sampler (None without LAG)."""
        unet = self.backbone.unet
        set_lora_scale(unet, strength, self.adapter_name)
        if not lag:
            try:
                yield None
            finally:
                set_lora_scale(unet, 1.0, self.adapter_name)
            return
        selection = concept_selection(self.backbone.tokenizers[0], prompts, self.token_ids, self.class_word)
        hub = AttentionHub(unet)
        token_mask = hub.add(TokenMask(selection=selection.to(self.backbone.device),
                                       layers=last_cross_layers(hub.places.values())))  # the maps a mask keeps
        handles = [b.register_forward_hook(self._mask_hook(name.rsplit(".", 1)[0], token_mask))
                   for name, b in self.masked.items()]
        try:
            yield hub
        finally:
            hub.restore()
            for h in handles:
                h.remove()
            set_lora_scale(unet, 1.0, self.adapter_name)

    @staticmethod
    def _mask_hook(block_name: str, token_mask: TokenMask):
        @replayable_hook  # the block's mask is the tensor its attention writes on every call
        def hook(module, args, out):
            mask = token_mask.mask_for(block_name)
            if mask is None:  # the block's attention has not run (a call outside the sampler): residual everywhere
                return out
            if out.ndim == 3:  # linear proj_out on tokens [B, h*w, C]
                mask = mask.flatten(2).transpose(1, 2)
            return out * mask.to(out.dtype)
        return hook


# ----- artifacts ---------------------------------------------------------------------------------
INFO_FILE = "residuals.json"


def read_residual_info(path: str | Path) -> dict | None:
    """The residuals.json beside an artifact file (or in a run folder); None for another artifact."""
    return read_info_beside(path, INFO_FILE, required=("method", "file", "embeddings", "token", "class_word", "targets",
                                                       "parameters"))


def load_residuals(backbone, path: str | Path) -> tuple[ResidualSampler, str]:
    """A residuals run (its folder or a file in it) added to `backbone`: V*'s embedding and the residual
    adapter. Returns the sampler (strength, LAG) and what stands for the concept in prompts ('V* class')."""
    from diffusion.lora import load_lora
    from diffusion.tokens import load_embedding_ids

    path = Path(path)
    info = read_residual_info(path)
    if info is None:
        raise ArtifactError(f"{path} has no {INFO_FILE} beside it; pass a method=residuals run")
    folder = path if path.is_dir() else path.parent
    names, written = load_embedding_ids(backbone, folder / info["embeddings"], token=info["token"])
    load_lora(backbone.unet, folder / info["file"], adapter_name=info.get("adapter_name", ADAPTER))
    sampler = ResidualSampler(backbone, written[0], info["class_word"], info.get("adapter_name", ADAPTER))
    return sampler, f"{' '.join(names)} {info['class_word']}"
