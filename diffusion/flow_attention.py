"""Attention control on the joint attention of rectified-flow transformers (SD3's MMDiT, FLUX.1).

MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 4) has no cross-attention: text and
image tokens attend jointly over one sequence. SD3's JointAttnProcessor2_0 puts the image tokens first,
[image; text]; FLUX.1 (no paper; diffusers' FluxAttnProcessor) puts the text first, [text; image], in its
dual-stream blocks and runs its single-stream blocks on the already concatenated [text; image] sequence.

`FlowAttentionHub(backbone)` installs a `FlowAttnProcessor` on every attention of the transformer and puts
the originals back on exit. With no controller the processor computes exactly what the stock one does.
Controllers follow diffusion/attention.py: each sees the **text-to-image block** of the joint attention,
the image queries' probabilities over the text keys (softmax over every key of the joint sequence, then
the text columns), [batch, heads, image tokens, text tokens], and records it or returns an edit of it;
the attention then reads the values with the edited block in place of the original one (rows are not
renormalised, as prompt-to-prompt's reweighting does not renormalise). A controller may also read or replace the text
tokens' value vectors (StyleDiffusion's value input): only the image queries read the replaced values, as
only image queries read a UNet's value input; the text queries keep the prompt's values and the keys stay.

Text positions: the joint text sequence is SD3's 77 CLIP tokens (CLIP-L and CLIP-G side by side, start
token at 0) followed by its T5 tokens (no start token, `</s>` after the last word), or FLUX's T5 tokens
only; `word_positions` finds a word in each part.

Batch layout while sampling (prompt-to-prompt, Hertz et al. 2023): [source, targets...], and under SD3's
classifier-free guidance [uncond; cond] with that layout in each half (`controlled_euler_sample` sets it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.attention import (AttentionRefine, AttentionReplace, AttentionReweight, KeyPositions, ProcessorHub,
                                 PromptToPromptEdit, prompt_words, refinement_mapper, replacement_mapper,
                                 word_token_indices)
from diffusion.conditioning import Conditioning
from diffusion.flow import euler_sample
from utils.errors import ConfigError

# Dual-stream blocks, FLUX's single-stream blocks (both hold text keys), SD3.5's image-only attn2 (none).
TEXT_STREAMS = ("joint", "single")


@dataclass(frozen=True)
class FlowPlace:
    """Where an attention sits: its module name, stream and block index; `has_text` if text keys are in it."""

    name: str
    stream: str
    index: int

    @property
    def has_text(self) -> bool:
        return self.stream != "image"

    @staticmethod
    def from_processor_name(name: str) -> "FlowPlace":
        layer = name[: -len(".processor")] if name.endswith(".processor") else name
        parts = layer.split(".")
        stream = "single" if parts[0] == "single_transformer_blocks" else "image" if parts[-1] == "attn2" else "joint"
        return FlowPlace(layer, stream, int(parts[1]))


@dataclass
class FlowAttentionState:
    """Facts about the current transformer call: the sampler sets step / num_steps / cfg, the hub the sizes."""

    step: int | None = None
    num_steps: int | None = None
    cfg: bool = False  # batch is [uncond; cond]
    text_len: int | None = None  # text tokens of the joint sequence
    image_hw: tuple[int, int] | None = None  # the image tokens' grid


@dataclass
class FlowAttentionCall:
    """What a controller sees besides the maps."""

    place: FlowPlace
    hw: tuple[int, int]
    state: FlowAttentionState


class FlowAttentionController:
    """Base controller: sees nothing and changes nothing.

    `reads_maps`: whether `__call__` wants the text-to-image maps (computing them costs the full probabilities);
    `edits`: whether it may return other maps than it got (else the fused kernel's output is kept); the maps come
    in fp32, and an edit returns a new tensor rather than changing them in place.
    `text_values(values, call)` sees the text tokens' value vectors [batch, text tokens, heads * head_dim].
    """

    reads_maps = True
    edits = True

    def wants(self, place: FlowPlace) -> bool:
        return place.has_text

    def __call__(self, maps: torch.Tensor, call: FlowAttentionCall) -> torch.Tensor:
        return maps

    def text_values(self, values: torch.Tensor, call: FlowAttentionCall) -> torch.Tensor:
        return values

    def reset(self) -> None:
        pass


def cond_half(x: torch.Tensor, state: FlowAttentionState) -> torch.Tensor:
    """The conditional rows of a batch (all rows when the call is not classifier-free guided)."""
    return x[x.shape[0] // 2:] if state.cfg else x


# ----- the processor -------------------------------------------------------------------------------
@dataclass
class _Joint:
    """Queries, keys and values of one joint sequence [batch, heads, tokens, head_dim] and where text and image sit."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    text: slice
    image: slice
    image_values: torch.Tensor | None = field(default=None)  # values the image queries read, if replaced


class FlowAttnProcessor:
    """SD3's JointAttnProcessor2_0 or FLUX's FluxAttnProcessor, with the hub's controllers in between."""

    def __init__(self, hub: "FlowAttentionHub", place: FlowPlace, original):
        self.hub, self.place = hub, place
        self.backend = getattr(original, "_attention_backend", None)  # FLUX's dispatcher backend, kept as set

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 value_text_states: torch.Tensor | None = None):
        flux = self.hub.kind == "flux"
        joint = (self._flux_qkv if flux else self._sd3_qkv)(attn, hidden_states, encoder_hidden_states,
                                                           image_rotary_emb)
        controllers = [c for c in self.hub.controllers if c.wants(self.place)] if self.place.has_text else []
        call = FlowAttentionCall(self.place, self.hub.image_hw(joint.image), self.hub.state)
        self._replace_text_values(joint, value_text_states, controllers, call)
        out = self._attend(joint, attention_mask, controllers, call)  # [batch, heads, tokens, head_dim]
        out = out.transpose(1, 2).flatten(2, 3).to(joint.query.dtype)
        if flux:
            return self._flux_out(attn, out, encoder_hidden_states)
        return self._sd3_out(attn, out, hidden_states.shape[1], encoder_hidden_states)

    # -- projections, as each stock processor computes them
    def _sd3_qkv(self, attn, hidden_states, encoder_hidden_states, _rotary) -> _Joint:
        batch = hidden_states.shape[0]
        heads = attn.heads

        def split(x):
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (split(project(hidden_states)) for project in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        n_image = query.shape[2]
        if encoder_hidden_states is None:  # SD3.5's attn2: image tokens only
            return _Joint(query, key, value, slice(n_image, n_image), slice(0, n_image))
        text_q = split(attn.add_q_proj(encoder_hidden_states))
        text_k = split(attn.add_k_proj(encoder_hidden_states))
        text_v = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        # Esser et al. 2024 / JointAttnProcessor2_0: [image; text]
        query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        return _Joint(query, key, value, slice(n_image, query.shape[2]), slice(0, n_image))

    def _flux_qkv(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb) -> _Joint:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_q, text_k, text_v))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            # FluxAttnProcessor: [text; image]
            query, key, value = (torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
            text_len = encoder_hidden_states.shape[1]
        else:  # a single-stream block: the sequence is already [text; image]
            text_len = self.hub.state.text_len
            if text_len is None:
                raise ConfigError(f"{self.place.name} runs outside a FLUX transformer call; the text length is unknown")
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # -> [batch, heads, tokens, head_dim]
        return _Joint(query, key, value, slice(0, text_len), slice(text_len, query.shape[2]))

    # -- values and attention
    def _replace_text_values(self, joint: _Joint, value_text_states, controllers, call) -> None:
        """StyleDiffusion's value input on the text tokens: the keys stay, the image queries read other values."""
        if not self.place.has_text:
            return
        batch, heads, _, head_dim = joint.value.shape
        text_values = joint.value[:, :, joint.text].transpose(1, 2).flatten(2, 3)  # [batch, text, inner]
        replaced = text_values if value_text_states is None else value_text_states.to(text_values)
        for controller in controllers:
            replaced = controller.text_values(replaced, call)
        if replaced is text_values:
            return
        if replaced.shape != text_values.shape:
            raise ConfigError(f"text values of shape {tuple(replaced.shape)} at {self.place.name}; "
                              f"it needs {tuple(text_values.shape)}")
        image_values = joint.value.clone()
        image_values[:, :, joint.text] = replaced.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        joint.image_values = image_values

    def _attend(self, joint: _Joint, mask, controllers, call) -> torch.Tensor:
        """The fused kernel's output; where controllers edit the maps, plus the edit's share of the values.

        Only the text columns of the image rows change, so P' V = P V + (P'_text - P_text) V_text exactly: the
        full probabilities are never kept, only the text-to-image block (real models' would take gigabytes).
        """
        out = self._fused(joint.query, joint.key, joint.value, mask)
        image_values = joint.value if joint.image_values is None else joint.image_values
        if joint.image_values is not None:
            out = out.clone()
            out[:, :, joint.image] = self._fused(joint.query[:, :, joint.image], joint.key, image_values,
                                                 _query_rows(mask, joint.image))
        readers = [c for c in controllers if c.reads_maps]
        if not readers:
            return out
        maps = edited = text_to_image_maps(joint.query[:, :, joint.image], joint.key, joint.text,
                                           _query_rows(mask, joint.image))
        for controller in readers:
            edited = controller(edited, call)
        if edited is maps or not any(c.edits for c in readers):
            return out  # read-only controllers keep the fused kernel's output
        delta = (edited.float() - maps) @ image_values[:, :, joint.text].float()
        out = out.clone()
        out[:, :, joint.image] = (out[:, :, joint.image].float() + delta).to(out.dtype)
        return out

    def _fused(self, query, key, value, mask) -> torch.Tensor:
        if self.hub.kind != "flux":
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # FLUX's dispatcher takes [batch, tokens, heads, head_dim]
        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    attn_mask=mask, backend=self.backend)
        return out.transpose(1, 2)

    # -- outputs, as each stock processor returns them
    @staticmethod
    def _sd3_out(attn, out, n_image: int, encoder_hidden_states):
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image_out, text_out = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:  # SD3's last block keeps no text output projection
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out

    @staticmethod
    def _flux_out(attn, out, encoder_hidden_states):
        if encoder_hidden_states is None:  # single-stream: the block projects after its MLP
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


MAP_CHUNK_BYTES = 2 ** 28  # fp32 scores held at once while computing maps; bounds memory at real models' sizes


def text_to_image_maps(image_query: torch.Tensor, key: torch.Tensor, text: slice,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, heads, image tokens, text tokens] fp32: softmax(q k^T / sqrt(d)) over every key of the joint sequence
    (SDPA's default scale, as both stock processors use), then the text columns; computed in chunks of queries."""
    batch, heads, n_image, head_dim = image_query.shape
    rows = max(1, MAP_CHUNK_BYTES // (4 * batch * heads * key.shape[2]))
    keys_t = key.float().transpose(-1, -2)
    chunks = []
    for start in range(0, n_image, rows):
        scores = (image_query[:, :, start:start + rows].float() @ keys_t) / math.sqrt(head_dim)
        if mask is not None:
            scores = _masked(scores, _query_rows(mask, slice(start, start + rows)))
        chunks.append(scores.softmax(dim=-1)[..., text])
    return torch.cat(chunks, dim=2)


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores with an SDPA attention mask applied: a boolean mask keeps True, a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


def _query_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """An attention mask restricted to some queries (a mask broadcast over the queries stays as it is)."""
    return mask if mask is None or mask.shape[-2] == 1 else mask[..., rows, :]


# ----- the hub -------------------------------------------------------------------------------------
def _kind_of(transformer: nn.Module) -> str:
    name = type(transformer).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("SD3"):
        return "sd3"
    raise ConfigError(f"{name} is neither an SD3 nor a FLUX transformer; the flow attention hub needs one")


class FlowAttentionHub(ProcessorHub):
    """Installs `FlowAttnProcessor`s on an SD3 / FLUX transformer (a FlowBackbone's or a bare one) and holds the
    active controllers and the call state. Use as a context manager so the original processors come back."""

    def __init__(self, model: nn.Module, controllers: Iterable[FlowAttentionController] = ()):
        self.transformer = getattr(model, "transformer", model)
        self.kind = _kind_of(self.transformer)
        self.controllers: list[FlowAttentionController] = list(controllers)
        self.state = FlowAttentionState()
        stock = dict(self.transformer.attn_processors)
        self.places = {name: FlowPlace.from_processor_name(name) for name in stock}
        self._install(self.transformer,
                      {name: FlowAttnProcessor(self, place, stock[name]) for name, place in self.places.items()},
                      self.transformer.register_forward_pre_hook(self._remember_sizes, with_kwargs=True))

    def _remember_sizes(self, module, args, kwargs) -> None:
        """Text length and image grid of this call: single-stream blocks and map shapes need them."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.state.text_len = None if text is None else text.shape[1]
        if self.kind == "sd3" and hidden is not None:
            patch = self.transformer.config.patch_size
            self.state.image_hw = (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
        elif kwargs.get("img_ids") is not None:
            ids = kwargs["img_ids"]
            ids = ids[0] if ids.ndim == 3 else ids  # diffusers still accepts batched ids
            self.state.image_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            self.state.image_hw = None

    def image_hw(self, image: slice) -> tuple[int, int]:
        """The image tokens' grid of this call (square when the call did not say)."""
        n = image.stop - image.start
        if self.state.image_hw is not None and self.state.image_hw[0] * self.state.image_hw[1] == n:
            return self.state.image_hw
        side = math.isqrt(n)
        return side, n // max(side, 1)



def controlled_euler_sample(hub: FlowAttentionHub, backbone, cond: Conditioning, latents: torch.Tensor,
                            sigmas: torch.Tensor, guidance_scale: float,
                            negative_cond: Conditioning | None = None) -> torch.Tensor:
    """diffusion.flow.euler_sample with the hub told each step's index and whether the batch is [uncond; cond]."""
    cfg = not backbone.embeds_guidance and guidance_scale > 1
    num_steps = len(sigmas) - 1
    return euler_sample(backbone, cond, latents, sigmas, guidance_scale, negative_cond,
                        step_context=lambda step: hub.sampling_state(step=step, num_steps=num_steps, cfg=cfg))


# ----- recording -----------------------------------------------------------------------------------
def resample_maps(maps: torch.Tensor, hw: tuple[int, int], resolution: int) -> torch.Tensor:
    """[batch, h*w, text] -> [batch, r*r, text]; antialiased bilinear weights are convex, so rows stay <= 1."""
    if hw == (resolution, resolution):
        return maps
    grid = maps.transpose(1, 2).unflatten(-1, hw)  # [batch, text, h, w]
    grid = F.interpolate(grid.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=True).to(maps.dtype)
    return grid.flatten(2).transpose(1, 2)


class FlowAttentionStore(FlowAttentionController):
    """Records the text-to-image maps, averaged over heads, per block and step (for LAG-style masks and EM).

    streams: which attentions (joint, single); blocks: block indices to keep (None = all); resolution: resample
    the image grid to resolution x resolution (None = the transformer's own); cond_only: keep the conditional
    half under classifier-free guidance; token_indices: keep only these text positions; with_grad: keep the graph.
    `maps[place]` is a list of (step, [batch, image tokens, text tokens]).
    """

    edits = False

    def __init__(self, streams: Sequence[str] = TEXT_STREAMS, blocks: Sequence[int] | None = None,
                 resolution: int | None = None, cond_only: bool = False, token_indices: Sequence[int] | None = None,
                 with_grad: bool = False):
        unknown = set(streams) - set(TEXT_STREAMS)
        if unknown:
            raise ConfigError(f"streams={sorted(unknown)} are unknown; the text-to-image maps live in {TEXT_STREAMS}")
        self.streams = set(streams)
        self.blocks = None if blocks is None else set(blocks)
        self.resolution, self.cond_only, self.with_grad = resolution, cond_only, with_grad
        self.token_indices = None if token_indices is None else KeyPositions(token_indices)
        self.reset()

    def reset(self) -> None:
        self.maps: dict[FlowPlace, list[tuple[int | None, torch.Tensor]]] = {}
        self.hw: tuple[int, int] | None = None

    def wants(self, place: FlowPlace) -> bool:
        return place.stream in self.streams and (self.blocks is None or place.index in self.blocks)

    def __call__(self, maps: torch.Tensor, call: FlowAttentionCall) -> torch.Tensor:
        m = cond_half(maps, call.state) if self.cond_only else maps
        if self.token_indices is not None:
            m = self.token_indices.select(m)
        m = m.mean(dim=1)
        m = m if self.with_grad else m.detach()
        hw = call.hw
        if self.resolution is not None:
            m, hw = resample_maps(m, hw, self.resolution), (self.resolution, self.resolution)
        self.hw = hw
        self.maps.setdefault(call.place, []).append((call.state.step, m))
        return maps

    def select(self, steps: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
               streams: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The recorded maps of matching steps, blocks and streams."""
        return [m for place, entries in self.maps.items() for step, m in entries
                if (steps is None or step in steps) and (blocks is None or place.index in blocks)
                and (streams is None or place.stream in streams)]

    def average(self, steps: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
                streams: Sequence[str] | None = None) -> torch.Tensor:
        """Mean over matching blocks and steps, reshaped to [batch, h, w, text tokens]."""
        found = self.select(steps, blocks, streams)
        if not found:
            raise ConfigError(f"no text-to-image maps recorded for steps={steps} blocks={blocks} streams={streams}; "
                              f"check the store's filters")
        mean = torch.stack(found).mean(0)
        return mean.reshape(mean.shape[0], *self.hw, mean.shape[-1])


# ----- value input on the text tokens (StyleDiffusion) ----------------------------------------------
class TextValueStore(FlowAttentionController):
    """Records the text tokens' value vectors [batch, text tokens, inner] per (attention name, step)."""

    reads_maps = False
    edits = False

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.values: dict[tuple[str, int | None], torch.Tensor] = {}

    def text_values(self, values, call):
        self.values[(call.place.name, call.state.step)] = values.detach()
        return values


class TextValueInjection(FlowAttentionController):
    """StyleDiffusion's value input on MMDiT: the image queries read these text values, the keys stay the prompt's.

    `values` maps (attention name, step) to [batch, text tokens, heads * head_dim] (a TextValueStore's `values`);
    attentions or steps without an entry keep their own values unless `strict`.
    """

    reads_maps = False
    edits = False  # changes the values, never the maps: the fused kernel stays

    def __init__(self, values: Mapping[tuple[str, int | None], torch.Tensor], strict: bool = True):
        self.values, self.strict = dict(values), strict

    def text_values(self, values, call):
        given = self.values.get((call.place.name, call.state.step))
        if given is None:
            if self.strict:
                raise ConfigError(f"no text values given for {call.place.name} at step {call.state.step}")
            return values
        return given.to(values)


# ----- text positions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPositions:
    """A word's positions in the joint text sequence: in SD3's CLIP part (positions 0-76) and in the T5 part."""

    clip: list[int]
    t5: list[int]

    @property
    def all(self) -> list[int]:
        return self.clip + self.t5


def clip_length(backbone) -> int:
    """Text tokens before the T5 part: SD3's 77 CLIP tokens, none for FLUX (its CLIP text is only pooled)."""
    return backbone.clip_tokenizers[0].model_max_length if backbone.kind == "sd3" else 0


def text_length(backbone) -> int:
    return clip_length(backbone) + backbone.max_sequence_length


def word_positions(backbone, prompt: str, word: str) -> TextPositions:
    """Positions of every occurrence of `word` (whitespace-split, punctuation stripped) in the joint text sequence.

    CLIP counts its start token as 0; T5 has no start token, so its first word is at clip_length(backbone).
    Positions cut off by the tokenizers' truncation are left out.
    """
    if word not in prompt_words(prompt):
        raise ConfigError(f"word {word!r} is not in prompt {prompt!r}")
    offset = clip_length(backbone)
    clip = []
    if offset:
        clip = [i for i in word_token_indices(backbone.clip_tokenizers[0], prompt, word) if i < offset]
    # word_token_indices counts a start token T5 does not have
    t5 = [offset + i - 1 for i in word_token_indices(backbone.t5_tokenizer, prompt, word)
          if i - 1 < backbone.max_sequence_length]
    return TextPositions(clip, t5)


def joint_replacement_mapper(backbone, source: str, target: str) -> torch.Tensor:
    """[text, text] word-swap mapper over the joint text sequence: CLIP's and T5's mappers block-diagonal."""
    length = backbone.max_sequence_length
    # One fictitious start position in front of T5, then dropped: replacement_mapper assumes a start token.
    t5 = replacement_mapper(backbone.t5_tokenizer, source, target, length + 1)[1:, 1:]
    if backbone.kind != "sd3":
        return t5
    return torch.block_diag(replacement_mapper(backbone.clip_tokenizers[0], source, target, clip_length(backbone)), t5)


def joint_refinement_mapper(backbone, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha) of prompt-to-prompt's refinement over the joint text sequence."""
    length = backbone.max_sequence_length
    index, alpha = refinement_mapper(backbone.t5_tokenizer, source, target, length + 1)
    index, alpha = index[1:] - 1 + clip_length(backbone), alpha[1:]  # drop the fictitious start position
    if backbone.kind != "sd3":
        return index, alpha
    clip_index, clip_alpha = refinement_mapper(backbone.clip_tokenizers[0], source, target, clip_length(backbone))
    return torch.cat([clip_index, index]), torch.cat([clip_alpha, alpha])


def joint_equalizer(backbone, prompt: str, weights: Mapping[str, float]) -> torch.Tensor:
    """[text] factors: each weighted word's CLIP and T5 positions scaled (prompt-to-prompt's reweighting)."""
    equalizer = torch.ones(text_length(backbone))
    for word, weight in weights.items():
        equalizer[word_positions(backbone, prompt, word).all] = float(weight)
    return equalizer


# ----- editing (prompt-to-prompt) ------------------------------------------------------------------
class FlowPromptToPrompt(FlowAttentionController):
    """A prompt-to-prompt edit of the text-to-image maps (Hertz et al. 2023) on the batch [source, targets...].

    `edit` is diffusion/attention.py's AttentionReplace / AttentionRefine / AttentionReweight built over the joint
    text sequence; its `cross_steps` (tau_c) bounds the edited steps. Only the conditional half is edited.
    """

    def __init__(self, edit: PromptToPromptEdit, streams: Sequence[str] = TEXT_STREAMS):
        self.edit, self.streams = edit, set(streams)

    def wants(self, place: FlowPlace) -> bool:
        return place.stream in self.streams

    def __call__(self, maps: torch.Tensor, call: FlowAttentionCall) -> torch.Tensor:
        state = call.state
        half = maps.shape[0] // 2 if state.cfg else 0
        uncond, cond = maps[:half], maps[half:]
        if cond.shape[0] < 2 or not PromptToPromptEdit._before(self.edit.cross_steps, state):
            return maps
        return torch.cat([uncond, cond[:1], self.edit.edit_cross(cond[0], cond[1:])])


def flow_attention_replace(backbone, source: str, targets: Sequence[str], cross_steps: float = 0.8,
                           **kwargs) -> FlowPromptToPrompt:
    """Word swap: targets take the source's maps through the joint replacement mapper for steps < tau_c."""
    mappers = torch.stack([joint_replacement_mapper(backbone, source, t) for t in targets])
    return FlowPromptToPrompt(AttentionReplace(mappers, cross_steps=cross_steps), **kwargs)


def flow_attention_refine(backbone, source: str, targets: Sequence[str], cross_steps: float = 0.8,
                          **kwargs) -> FlowPromptToPrompt:
    """Added words: aligned tokens take the source's maps, new ones keep their own, for steps < tau_c."""
    pairs = [joint_refinement_mapper(backbone, source, t) for t in targets]
    edit = AttentionRefine(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]),
                           cross_steps=cross_steps)
    return FlowPromptToPrompt(edit, **kwargs)


def flow_attention_reweight(backbone, targets: Sequence[str], weights: Mapping[str, float],
                            base: FlowPromptToPrompt | None = None, cross_steps: float = 0.8,
                            **kwargs) -> FlowPromptToPrompt:
    """Targets take the source's maps (or `base`'s edit of them) with the weighted words' columns scaled."""
    equalizer = torch.stack([joint_equalizer(backbone, t, weights) for t in targets])
    edit = AttentionReweight(equalizer, base=None if base is None else base.edit, cross_steps=cross_steps)
    return FlowPromptToPrompt(edit, **kwargs)
