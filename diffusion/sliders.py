"""Sliders at sampling time: each slider has a strength; several compose in one prompt.

- `TokenSlider` (Prompt Sliders): the slider token is appended to the prompt ("a photo of a person
  <age>"); an erased word is already in the prompt and nothing is appended. The paper scales the
  token's embedding by the strength (S -> alpha S, eq. 5). The authors' code instead scales the
  text encoder's output at the token's position and zeroes it for t > 800 (`scaling="output"`).
  At strength 0 the paper's form reads the prompt with a zero vector in the token's place: CLIP is
  causal, so the positions after it (end token, padding) still differ from the plain prompt.
  On SD3 / FLUX the token has rows in every text encoder (CLIP-L, CLIP-G, T5), each scaled by the strength.
- `LoraSlider` (Concept Sliders): the strength is the LoRA scale (on the UNet, or the SD3 / FLUX transformer);
  prompts are unchanged.

`SliderSet` holds the sliders of a sampling call: `prompt()` appends their tokens, `strengths()`
sets each one's strength, `encoder()` is the prompt encoding `generate` should use.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from diffusion.backbone import FLOW_KINDS, Backbone, Conditioning
from diffusion.flow import FlowBackbone
from diffusion.tokens import TokenRows
from utils.errors import ArtifactError, ConfigError
from utils.io import read_info_beside

log = logging.getLogger(__name__)
SLIDER_INFO = "slider.json"
SCALINGS = ("embedding", "output")


@dataclass
class TokenSlider:
    token: str
    rows: Sequence[TokenRows]          # the token's rows in each text encoder it lives in
    appended: bool = True              # False: an erased word, already part of the prompt
    scaling: str = "embedding"         # embedding (the paper) | output (the authors' code)
    zero_above: int | None = None      # output scaling: the token's states are zero for t above this
    strength: float | None = None

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ConfigError(f"slider scaling {self.scaling!r} is unknown; use one of {SCALINGS}")

    def prompt(self, text: str) -> str:
        return f"{text} {self.token}" if self.appended else text

    def set_strength(self, strength: float | None) -> None:
        self.strength = strength
        if self.scaling == "embedding":
            for rows in self.rows:
                rows.scale = strength

    def scale_states(self, cond: Conditioning, ids: torch.Tensor, scale: float) -> Conditioning:
        """The first text encoder's output at the token's positions times `scale` (output scaling)."""
        hit = torch.isin(ids, self.rows[0].token_ids.to(ids.device)).unsqueeze(-1)  # [B, L, 1]
        width = self.rows[0]._embedding[0].weight.shape[1]
        states = cond.hidden_states.clone()
        first = states[..., :width]
        states[..., :width] = torch.where(hit, first * scale, first)
        return Conditioning(states, cond.pooled, cond.time_ids)


@dataclass
class LoraSlider:
    unet: torch.nn.Module
    adapter_name: str = "default"
    strength: float | None = None

    def prompt(self, text: str) -> str:
        return text

    def set_strength(self, strength: float | None) -> None:
        from diffusion.lora import set_lora_scale

        self.strength = strength
        set_lora_scale(self.unet, 1.0 if strength is None else float(strength), self.adapter_name)


class SliderSet:
    def __init__(self, sliders: Sequence[TokenSlider | LoraSlider] = ()):
        self.sliders = list(sliders)

    def prompt(self, text: str) -> str:
        for slider in self.sliders:
            text = slider.prompt(text)
        return text

    @contextlib.contextmanager
    def strengths(self, values: float | Sequence[float] | None) -> Iterator[None]:
        """Each slider at its strength inside the block (one value for all, or one per slider);
        None leaves them at 1 (the token as trained, the LoRA at full scale)."""
        if values is None or isinstance(values, (int, float)):
            values = [values] * len(self.sliders)
        values = list(values)
        if len(values) != len(self.sliders):
            raise ConfigError(f"{len(values)} strengths for {len(self.sliders)} sliders; give one per slider "
                              f"(or a single number for all)")
        before = [s.strength for s in self.sliders]
        for slider, value in zip(self.sliders, values):
            slider.set_strength(None if value is None else float(value))
        try:
            yield
        finally:
            for slider, value in zip(self.sliders, before):
                slider.set_strength(value)

    def encoder(self, backbone: Backbone) -> Callable[[list[str]], Conditioning | Callable] | None:
        """None when the backbone's own encoding is right; else one that applies output scaling."""
        edits = [s for s in self.sliders if isinstance(s, TokenSlider) and s.scaling == "output"]
        if not edits:
            return None
        if isinstance(backbone, FlowBackbone):  # scale_states edits the UNet's CLIP states only
            raise ConfigError(f"slider {edits[0].token} scales the text encoder's output (variant=reference_code), "
                              f"which UNet backbones only support; sample it on SD1.x / SDXL, or train variant=paper")

        def encode(prompts: list[str]):
            cond = backbone.encode_prompt(prompts)
            ids = backbone.tokenize(prompts, 0)
            late, early = cond, cond  # t <= zero_above, t > zero_above
            for s in edits:
                strength = 1.0 if s.strength is None else s.strength
                late = s.scale_states(late, ids, strength)
                early = s.scale_states(early, ids, 0.0 if s.zero_above is not None else strength)
            cutoff = min((s.zero_above for s in edits if s.zero_above is not None), default=None)
            if cutoff is None:
                return late
            return lambda i, t: early if t > cutoff else late
        return encode


def read_slider_info(path: str | Path) -> dict | None:
    """The slider.json beside an artifact file (or in a run folder); None for a non-slider artifact."""
    return read_info_beside(path, SLIDER_INFO, required=("method", "file"))


def lora_host(backbone: Backbone | FlowBackbone, path: Path, trained_on: str | None) -> tuple[torch.nn.Module, str]:
    """The model a concept slider's LoRA sits on and its file's key prefix: the UNet, or the SD3 / FLUX transformer
    named by slider.json's kind."""
    flow_kind = backbone.kind if isinstance(backbone, FlowBackbone) else None
    lora_kind = trained_on if trained_on in FLOW_KINDS else None  # None: a UNet LoRA (SD1.x / SDXL)
    if flow_kind != lora_kind:
        raise ArtifactError(f"{path} is a concept_slider (a {lora_kind or 'UNet'} LoRA); load it on the "
                            f"{lora_kind or 'SD1.x / SDXL'} model it was trained on, not on {flow_kind or 'a UNet'}")
    return (backbone.transformer, "transformer") if flow_kind else (backbone.unet, "unet")


def load_slider(backbone: Backbone, path: str | Path, adapter_name: str | None = None) -> TokenSlider | LoraSlider:
    """A slider artifact (a run folder or its file) added to `backbone`, at strength 1."""
    from diffusion.lora import load_lora
    from diffusion.tokens import load_embedding_ids

    path = Path(path)
    info = read_slider_info(path)
    if info is None:
        raise ArtifactError(f"{path} has no {SLIDER_INFO} beside it; pass a prompt_slider or concept_slider run")
    file = path if path.is_file() else path / info["file"]
    if info["method"] == "concept_slider":
        model, prefix = lora_host(backbone, path, info.get("kind"))
        name = adapter_name or info.get("adapter_name") or file.parent.name
        load_lora(model, file, adapter_name=name, prefix=prefix)
        model.set_adapters(list(model.peft_config))  # every loaded slider active, composing
        return LoraSlider(model, name)
    names, written = load_embedding_ids(backbone, file, token=info.get("token"))
    rows = [TokenRows(backbone.text_encoders[i].get_input_embeddings(), ids) for i, ids in sorted(written.items())]
    return TokenSlider(" ".join(names), rows, appended=not info.get("erase", False),
                       scaling=info.get("scaling", "embedding"), zero_above=info.get("zero_above"))
