"""One attention mechanism for every method: processors that hand probabilities to controllers.

`AttentionHub(unet)` installs a `ControlledAttnProcessor` on every attention layer and remembers the
processors it replaced (`restore()` puts them back). A controller is a small object in the spirit of
prompt-to-prompt's AttentionStore / AttentionReplace: for each layer it `wants`, it receives the
attention probabilities [batch, heads, queries, keys] and returns them, recorded or edited.
Layers that no active controller wants run PyTorch's fused scaled-dot-product attention exactly as
diffusers' AttnProcessor2_0 does; so do layers whose controllers only read (`edits = False`), which
then also compute the probabilities for those controllers. A `KeySumReader` (LAG's `TokenMask`) needs
only weighted sums of a layer's probabilities over the keys: where every controller of a layer is one,
the sums come from a second fused call with the weights as values, on the conditional rows alone, and no
probabilities are formed.

Batch layout during classifier-free guidance (the sampler sets `state.cfg`): [uncond; cond], and
within each half sample 0 is the source prompt and the others are edited prompts (prompt-to-prompt).

Also here: separate key / value text inputs for cross-attention (`value_hidden_states`, used by
StyleDiffusion), prompt-to-prompt's `LocalBlend` (a read-only controller whose `blend` is a sampler's
step callback) and `TokenMask`, the per-block attention masks of LAG (diffusion/residuals.py).
"""

from __future__ import annotations

import difflib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.cuda_graphs import replayable_hook
from utils.morphology import dilate


@dataclass(frozen=True)
class Place:
    """Where an attention layer sits: its module name, down/mid/up block and self/cross kind."""

    name: str
    block: str
    is_cross: bool

    @property
    def block_name(self) -> str:
        """The Transformer2DModel that holds this layer, e.g. 'down_blocks.1.attentions.0'."""
        return self.name.split(".transformer_blocks.")[0]

    @staticmethod
    def from_processor_name(name: str) -> "Place":
        layer = name[: -len(".processor")] if name.endswith(".processor") else name
        block = "mid" if layer.startswith("mid_block") else layer.split("_blocks")[0]
        return Place(layer, block, layer.endswith("attn2"))


@dataclass
class AttentionState:
    """Facts about the current UNet call that controllers may read; samplers set them."""

    step: int | None = None  # index of the sampling step (0 = first, noisiest)
    num_steps: int | None = None
    cfg: bool = False  # batch is [uncond; cond]
    latent_hw: tuple[int, int] | None = None


@dataclass
class AttentionCall:
    """What a controller sees besides the probabilities."""

    place: Place
    hw: tuple[int, int]  # spatial size of the queries
    state: AttentionState

    @property
    def resolution(self) -> int:
        return self.hw[0]


class AttentionController:
    """Base controller: sees nothing and changes nothing. Subclasses override `wants` and `__call__`.

    `edits`: whether `__call__` may return other probabilities than it got. While every controller a
    layer serves only reads (stores, LAG's masks), the layer's output stays the fused kernel's.
    `replayable`: whether its work is tensor operations that are the same on every UNet call of a sampling
    loop (no Python records, nothing that depends on the step), so CUDA graphs may capture it
    (diffusion/cuda_graphs.py's `graphed_sampling`).
    """

    edits = True
    replayable = False

    def wants(self, place: Place) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        return probs

    def reset(self) -> None:
        pass


def cond_half(x: torch.Tensor, state: AttentionState) -> torch.Tensor:
    """The conditional rows of a batch (all rows when the call is not classifier-free guided)."""
    return x[x.shape[0] // 2:] if state.cfg else x


class ControlledAttnProcessor:
    """An attention processor that exposes probabilities to the hub's controllers."""

    def __init__(self, hub: "AttentionHub", place: Place):
        self.hub = hub
        self.place = place

    @property
    def replayable(self) -> bool:
        return all(c.replayable for c in self.hub.controllers)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 value_hidden_states: torch.Tensor | None = None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:  # self-attention keys/values see the normed states, as in diffusers
            context = hidden_states
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        values_in = context
        if value_hidden_states is not None and self.place.is_cross:
            values_in = value_hidden_states.to(context.dtype)
            if attn.norm_cross:
                values_in = attn.norm_encoder_hidden_states(values_in)
        key, value = attn.to_k(context), attn.to_v(values_in)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        controllers = [c for c in self.hub.controllers if c.wants(self.place)]
        probs = None
        if controllers:
            call = AttentionCall(self.place, self.hub.query_hw(query.shape[2]), self.hub.state)
        if any(not isinstance(c, KeySumReader) for c in controllers):
            scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1).to(query.dtype)
            for controller in controllers:
                probs = controller(probs, call)
        else:
            rows = slice(batch // 2, None) if self.hub.state.cfg else slice(None)  # readers read the conditional half
            q, k = query[rows], key[rows]
            mask = None if attention_mask is None else attention_mask[rows]
            for reader in controllers:  # sum_k p_qk w_k is attention with the weights w as the values
                columns = reader.value_columns(q.shape[0], attn.heads, k.shape[2], q.dtype, q.device)
                reader.read(F.scaled_dot_product_attention(q, k, columns, attn_mask=mask), call)
        if probs is not None and any(c.edits for c in controllers):
            out = probs @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ProcessorHub:
    """What every attention hub shares: the controllers in use, the call state, and giving the model its
    original processors back (`restore`, or leaving the `with` block). Subclasses install their processors
    with `_install` (the UNet's here; SD3 / FLUX transformers' in diffusion/flow_attention.py)."""

    def _install(self, model: nn.Module, processors: dict, hook) -> None:
        self.model = model
        self.original = dict(model.attn_processors)
        model.set_attn_processor(processors)
        self._hook = hook
        self.installed = True

    def add(self, controller):
        self.controllers.append(controller)
        return controller

    def remove(self, controller) -> None:
        self.controllers.remove(controller)

    @contextmanager
    def using(self, *controllers):
        """Activate controllers for the duration of a block."""
        for c in controllers:
            self.add(c)
        try:
            yield controllers[0] if len(controllers) == 1 else controllers
        finally:
            for c in controllers:
                self.remove(c)

    @contextmanager
    def sampling_state(self, **values):
        """Set state fields (step, num_steps, cfg) for the duration of a block."""
        old = {k: getattr(self.state, k) for k in values}
        for k, v in values.items():
            setattr(self.state, k, v)
        try:
            yield self.state
        finally:
            for k, v in old.items():
                setattr(self.state, k, v)

    def restore(self) -> None:
        if self.installed:
            self.model.set_attn_processor(self.original)
            self._hook.remove()
            self.controllers.clear()
            self.installed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class AttentionHub(ProcessorHub):
    """Installs controlled processors on a UNet and holds the active controllers and call state.

    Use as a context manager (or call `restore()`) so the UNet gets its original processors back.
    """

    def __init__(self, unet: nn.Module, controllers: Iterable[AttentionController] = ()):
        self.unet = unet
        self.controllers: list[AttentionController] = list(controllers)
        self.state = AttentionState()
        self.places = {name: Place.from_processor_name(name) for name in unet.attn_processors}
        self._install(unet, {name: ControlledAttnProcessor(self, p) for name, p in self.places.items()},
                      unet.register_forward_pre_hook(self._remember_latent_size))

    @replayable_hook  # the latent size is the same on every call of a sampling loop
    def _remember_latent_size(self, module, args):
        sample = args[0] if args else None
        if torch.is_tensor(sample):
            self.state.latent_hw = tuple(sample.shape[-2:])

    def query_hw(self, num_queries: int) -> tuple[int, int]:
        """Spatial size of a layer from its query count and the latent size of the current call."""
        if self.state.latent_hw is None:
            side = int(math.isqrt(num_queries))
            return side, num_queries // side
        h, w = self.state.latent_hw
        factor = math.sqrt(h * w / num_queries)
        return round(h / factor), round(w / factor)


# ----- recording ---------------------------------------------------------------------------------
class KeyPositions:
    """The key (text) positions a store keeps, as an index moved to the maps' device once and asynchronously:
    indexing with a Python list copies the list from the host at every call, a copy that waits for the GPU."""

    def __init__(self, positions: Sequence[int]):
        self.positions = [int(p) for p in positions]
        self._index = torch.tensor(self.positions, dtype=torch.long)

    def select(self, maps: torch.Tensor) -> torch.Tensor:
        if self._index.device != maps.device:
            self._index = self._index.to(maps.device, non_blocking=True)
        return maps.index_select(-1, self._index)


class AttentionStore(AttentionController):
    """Records attention maps of chosen layers.

    cross / self_attn  which kinds to record; blocks: subset of down/mid/up; resolutions: query
    side lengths to keep (None = all); cond_only: keep only the conditional half under CFG;
    token_indices: keep only these key positions (cross maps of a few tokens, to save memory);
    with_grad: keep the autograd graph (for attention losses); average_heads: store head means;
    average_steps: keep a running sum per layer instead of one entry per call.
    """

    edits = False

    def __init__(self, cross: bool = True, self_attn: bool = False, blocks: Sequence[str] = ("down", "mid", "up"),
                 resolutions: Sequence[int] | None = None, cond_only: bool = False,
                 token_indices: Sequence[int] | None = None, with_grad: bool = False,
                 average_heads: bool = True, average_steps: bool = False):
        self.cross, self.self_attn = cross, self_attn
        self.blocks = set(blocks)
        self.resolutions = None if resolutions is None else set(resolutions)
        self.cond_only, self.with_grad = cond_only, with_grad
        self.token_indices = None if token_indices is None else KeyPositions(token_indices)
        self.average_heads, self.average_steps = average_heads, average_steps
        self.reset()

    def reset(self) -> None:
        self.maps: dict[Place, list[torch.Tensor]] = {}
        self.hw: dict[Place, tuple[int, int]] = {}
        self.counts: dict[Place, int] = {}

    def wants(self, place: Place) -> bool:
        return (self.cross if place.is_cross else self.self_attn) and place.block in self.blocks

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if self.resolutions is not None and call.resolution not in self.resolutions:
            return probs
        m = cond_half(probs, call.state) if self.cond_only else probs
        if self.token_indices is not None:
            m = self.token_indices.select(m)
        if self.average_heads:
            m = m.mean(dim=1)
        if not self.with_grad:
            m = m.detach()
        place = call.place
        self.hw[place] = call.hw
        if self.average_steps and place in self.maps:
            self.maps[place][0] = self.maps[place][0] + m
        else:
            self.maps.setdefault(place, []).append(m)
        self.counts[place] = self.counts.get(place, 0) + 1
        return probs

    def select(self, is_cross: bool = True, resolution: int | None = None,
               blocks: Sequence[str] | None = None) -> list[tuple[Place, torch.Tensor]]:
        """(place, map) for each recorded call of matching layers; maps are step means if averaged."""
        out = []
        for place, maps in self.maps.items():
            if place.is_cross != is_cross or (blocks is not None and place.block not in blocks):
                continue
            if resolution is not None and self.hw[place][0] != resolution:
                continue
            if self.average_steps:
                out.append((place, maps[0] / self.counts[place]))
            else:
                out.extend((place, m) for m in maps)
        return out

    def average(self, is_cross: bool = True, resolution: int | None = None,
                blocks: Sequence[str] | None = None) -> torch.Tensor:
        """Mean over matching layers and steps, reshaped to [batch, (heads,) h, w, keys]."""
        found = self.select(is_cross, resolution, blocks)
        if not found:
            raise ValueError(f"no {'cross' if is_cross else 'self'}-attention maps recorded at resolution "
                             f"{resolution} in blocks {blocks}; check the store's filters")
        sizes = {self.hw[p] for p, _ in found}
        if len(sizes) > 1:
            raise ValueError(f"maps of several resolutions {sorted(sizes)}; pass resolution=")
        h, w = sizes.pop()
        mean = torch.stack([m for _, m in found]).mean(0)
        return mean.reshape(*mean.shape[:-2], h, w, mean.shape[-1])


# ----- editing (prompt-to-prompt and P2Plus) -----------------------------------------------------
def _word_spans(tokenizer, prompt: str) -> list[tuple[int, int]]:
    """Token span [start, end) of each whitespace word, counting the start token as position 0."""
    spans, pos = [], 1
    for word in prompt.split():
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((pos, pos + n))
        pos += n
    return spans


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as the word helpers match them: whitespace-split, punctuation stripped."""
    return [w.strip(",.;:!?") for w in prompt.split()]


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of `word` in `prompt`."""
    spans = _word_spans(tokenizer, prompt)
    found = [i for (s, e), w in zip(spans, prompt_words(prompt)) for i in range(s, e) if w == word]
    if not found:
        raise ValueError(f"word {word!r} does not occur in prompt {prompt!r}")
    return found


def _span_map(mapper: torch.Tensor, t_span, s_span) -> None:
    (ts, te), (ss, se) = t_span, s_span
    if te - ts == se - ss:
        for k in range(te - ts):
            mapper[ts + k, ss + k] = 1.0
    else:  # differing token counts: the word's attention mass is shared evenly (as prompt-to-prompt)
        mapper[ts:te, ss:se] = 1.0 / (te - ts)


def _tail_map(mapper: torch.Tensor, t_end: int, s_end: int) -> None:
    """Start token, end token and padding map position-wise after the words."""
    mapper[0, 0] = 1.0
    length = mapper.shape[0]
    for k in range(length - max(t_end, s_end)):
        mapper[t_end + k, s_end + k] = 1.0


def replacement_mapper(tokenizer, source: str, target: str, length: int | None = None) -> torch.Tensor:
    """[keys, keys] matrix M with target_map = source_map @ M^T for a word swap (equal word counts)."""
    length = length or tokenizer.model_max_length
    s_spans, t_spans = _word_spans(tokenizer, source), _word_spans(tokenizer, target)
    if len(s_spans) != len(t_spans):
        raise ValueError(f"replace needs prompts with the same number of words: {source!r} vs {target!r}; "
                         f"use refine for insertions")
    mapper = torch.zeros(length, length)
    for t_span, s_span in zip(t_spans, s_spans):
        _span_map(mapper, t_span, s_span)
    _tail_map(mapper, t_spans[-1][1] if t_spans else 1, s_spans[-1][1] if s_spans else 1)
    return mapper


def refinement_mapper(tokenizer, source: str, target: str,
                      length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha): target token j takes source token index[j] where alpha[j] = 1; new words keep their own."""
    length = length or tokenizer.model_max_length
    s_words, t_words = source.split(), target.split()
    s_spans, t_spans = _word_spans(tokenizer, source), _word_spans(tokenizer, target)
    index = torch.arange(length)
    alpha = torch.zeros(length)
    matcher = difflib.SequenceMatcher(a=s_words, b=t_words, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            (ss, _), (ts, te) = s_spans[block.a + k], t_spans[block.b + k]
            index[ts:te] = torch.arange(ss, ss + te - ts)
            alpha[ts:te] = 1.0
    t_end = t_spans[-1][1] if t_spans else 1
    s_end = s_spans[-1][1] if s_spans else 1
    index[0], alpha[0] = 0, 1.0
    tail = length - max(t_end, s_end)
    index[t_end:t_end + tail] = torch.arange(s_end, s_end + tail)
    alpha[t_end:t_end + tail] = 1.0
    return index, alpha


class PromptToPromptEdit(AttentionController):
    """Edits the maps of edited prompts from the source prompt's maps (prompt-to-prompt).

    Cross-attention is edited for steps < cross_steps * num_steps (tau_c), self-attention is
    replaced for steps < self_steps * num_steps (tau_s) at layers with at most
    `self_max_queries` queries (16x16, as prompt-to-prompt does). `uncond_self_steps` (tau_u) turns
    on P2Plus: the unconditional branch's self-attention of edited samples is replaced too.
    """

    def __init__(self, cross_steps: float = 0.8, self_steps: float = 0.4, uncond_self_steps: float | None = None,
                 self_max_queries: int = 16 * 16):
        self.cross_steps, self.self_steps = cross_steps, self_steps
        self.uncond_self_steps = uncond_self_steps
        self.self_max_queries = self_max_queries

    @staticmethod
    def _before(fraction: float | None, state: AttentionState) -> bool:
        if fraction is None or fraction <= 0:  # an empty window edits nothing, even outside a sampler
            return False
        if state.step is None or not state.num_steps:
            return True
        return state.step < fraction * state.num_steps

    def edit_cross(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """source [heads, Q, K], targets [n, heads, Q, K] -> edited targets."""
        return targets

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        state = call.state
        half = probs.shape[0] // 2 if state.cfg else 0
        uncond, cond = probs[:half], probs[half:]
        if cond.shape[0] < 2:
            return probs
        if call.place.is_cross:
            if self._before(self.cross_steps, state):
                cond = torch.cat([cond[:1], self.edit_cross(cond[0], cond[1:])])
        elif probs.shape[2] <= self.self_max_queries:
            if self._before(self.self_steps, state):
                cond = torch.cat([cond[:1], cond[:1].expand_as(cond[1:])])
            if half and self._before(self.uncond_self_steps, state):
                uncond = torch.cat([uncond[:1], uncond[:1].expand_as(uncond[1:])])
        return torch.cat([uncond, cond])


class AttentionReplace(PromptToPromptEdit):
    """Word swap: edited prompts take the source's cross maps through a replacement mapper."""

    def __init__(self, mappers: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.mappers = mappers  # [n_targets, K, K]

    @classmethod
    def from_prompts(cls, tokenizer, source: str, targets: Sequence[str], **kwargs) -> "AttentionReplace":
        return cls(torch.stack([replacement_mapper(tokenizer, source, t) for t in targets]), **kwargs)

    def edit_cross(self, source, targets):
        mappers = self.mappers.to(source.device, source.dtype)
        return torch.einsum("hqk,njk->nhqj", source, mappers)


class AttentionRefine(PromptToPromptEdit):
    """Added words: aligned tokens take the source's maps, new tokens keep their own."""

    def __init__(self, index: torch.Tensor, alpha: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.index, self.alpha = index, alpha  # [n_targets, K]

    @classmethod
    def from_prompts(cls, tokenizer, source: str, targets: Sequence[str], **kwargs) -> "AttentionRefine":
        pairs = [refinement_mapper(tokenizer, source, t) for t in targets]
        return cls(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), **kwargs)

    def edit_cross(self, source, targets):
        taken = source[..., self.index.to(source.device)].permute(2, 0, 1, 3)  # [n, heads, Q, K]
        alpha = self.alpha.to(source.device, source.dtype)[:, None, None, :]
        return taken * alpha + targets * (1 - alpha)


class AttentionReweight(PromptToPromptEdit):
    """Edited prompts take the source's cross maps (or a base edit of them) with chosen tokens scaled."""

    def __init__(self, equalizer: torch.Tensor, base: PromptToPromptEdit | None = None, **kwargs):
        super().__init__(**kwargs)
        self.equalizer = equalizer  # [n_targets, K]
        self.base = base

    @staticmethod
    def equalizer_for(tokenizer, prompt: str, weights: dict[str, float], length: int | None = None) -> torch.Tensor:
        eq = torch.ones(length or tokenizer.model_max_length)
        for word, w in weights.items():
            eq[word_token_indices(tokenizer, prompt, word)] = w
        return eq

    def edit_cross(self, source, targets):
        # prompt-to-prompt reweights the source's maps (after the base edit, if any)
        edited = self.base.edit_cross(source, targets) if self.base is not None else source.expand_as(targets)
        return edited * self.equalizer.to(source.device, source.dtype)[:, None, None, :]


# ----- local blending (prompt-to-prompt) ---------------------------------------------------------
class LocalBlend(AttentionController):
    """Prompt-to-prompt's LocalBlend: edited samples change only where the edited words attend.

    While sampling it sums, per prompt of the batch (sample 0 the source, the others targets), the
    conditional half's cross-attention maps of that prompt's blend words (`selection` [batch, keys]:
    1 at the words' token positions), heads averaged, over the `resolution` x `resolution` layers of
    `blocks` and over every step so far. `blend(i, latents)`, ddim_sample's step_callback, then
    turns each row's sum into a mask (3x3 max-pool, resized to the latents, divided by its max,
    > threshold); from step int(start N) on, each target row keeps its own latents inside the union of
    its mask and the source's and takes the source row's outside. Installed after an editing controller
    it reads the maps the layer uses (prompt-to-prompt's store, too, ends up holding the edited maps).
    Defaults are prompt-to-prompt's code: start_blend 0.2, threshold 0.3, the 16x16 down and up layers.
    """

    edits = False

    def __init__(self, selection: torch.Tensor, start: float = 0.2, threshold: float = 0.3, resolution: int = 16,
                 blocks: Sequence[str] = ("down", "up")):
        self.selection = selection.float()
        self.start, self.threshold, self.resolution = float(start), float(threshold), int(resolution)
        self.blocks = set(blocks)
        self.reset()

    @classmethod
    def from_prompts(cls, tokenizer, prompts: Sequence[str], words: Sequence[str | Sequence[str]],
                     **kwargs) -> "LocalBlend":
        """`words`: one entry per prompt (the source's first), a word or a list of words of that prompt."""
        if len(words) != len(prompts):
            raise ValueError(f"{len(words)} entries of blend words for {len(prompts)} prompts; give one per prompt")
        selection = torch.zeros(len(prompts), tokenizer.model_max_length)
        for row, (prompt, entry) in enumerate(zip(prompts, words)):
            for word in [entry] if isinstance(entry, str) else entry:
                selection[row, word_token_indices(tokenizer, prompt, word)] = 1.0
        return cls(selection, **kwargs)

    def reset(self) -> None:
        self.total: torch.Tensor | None = None  # [batch, 1, h, w]: the words' maps summed so far
        self.num_steps: int | None = None

    def wants(self, place: Place) -> bool:
        return place.is_cross and place.block in self.blocks

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        self.num_steps = call.state.num_steps
        if call.resolution != self.resolution:
            return probs
        cond = cond_half(probs, call.state).mean(dim=1).float()  # [b, Q, K]
        if cond.shape[0] != self.selection.shape[0]:
            raise ValueError(f"LocalBlend has blend words for {self.selection.shape[0]} prompts, the batch has "
                             f"{cond.shape[0]}")
        if self.selection.device != cond.device:
            self.selection = self.selection.to(cond.device)  # once, not per layer
        score = torch.einsum("bqk,bk->bq", cond, self.selection).reshape(cond.shape[0], 1, *call.hw)
        self.total = score if self.total is None else self.total + score
        return probs

    def masks(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """[batch, 1, H, W] bool: each row's own mask from the maps summed so far."""
        if self.total is None:
            raise ValueError(f"LocalBlend saw no cross-attention at {self.resolution}x{self.resolution} in the "
                             f"{sorted(self.blocks)} blocks; set its resolution to one the UNet has")
        maps = dilate(self.total)  # the 3x3 max-pool of prompt-to-prompt (k = 1)
        maps = F.interpolate(maps, size=tuple(latent_hw))  # nearest, as prompt-to-prompt
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)  # a row without words: no mask
        return maps > self.threshold

    def blend(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """ddim_sample's step_callback: from step int(start N) on, each target row is kept only inside
        the union of its mask and the source row's, the source row elsewhere; the source row is unchanged."""
        if self.num_steps is None:
            raise ValueError("LocalBlend.blend runs as ddim_sample's step_callback, after the step's UNet call")
        if i < int(self.start * self.num_steps):  # prompt-to-prompt: int(start_blend * NUM_DDIM_STEPS)
            return latents
        own = self.masks(latents.shape[-2:])
        mask = own | own[:1]  # the source's region too (prompt-to-prompt: mask[:1] + mask)
        # x_src + mask (x_tgt - x_src) for a binary mask, written so both sides are exact
        return torch.where(mask.to(latents.device), latents, latents[:1])


# ----- attention masks (LAG) -----------------------------------------------------------------------
class KeySumReader(AttentionController):
    """A read-only controller that needs, per head and query, only weighted sums of a layer's probabilities over
    the keys, sum_k p_qk w_k, for a few weight vectors w ([rows, keys] from `key_weights`). Alone on a layer it
    gets them from one more fused attention call with the weights as values (`value_columns`), without forming
    the probabilities (on SD1.5 about 60 operators a layer, docs/benchmarks.md: LAG's cost); beside controllers
    that need the probabilities, from those."""

    edits = False
    ALIGN = 8  # value columns padded to a multiple of 8: the fused kernels' alignment for half precision

    def __init__(self):
        self._columns: dict[tuple, torch.Tensor] = {}  # the weights are fixed: one value tensor per call shape

    def key_weights(self, keys: int) -> torch.Tensor:
        """[rows, keys, n]: n weight vectors per row, rows = the conditional batch (or 1, for every row)."""
        raise NotImplementedError

    def read(self, sums: torch.Tensor, call: AttentionCall) -> None:
        """sums: [rows, heads, queries, n + padding], the weighted sums of the call's conditional rows (all rows
        when the call is not classifier-free guided)."""
        raise NotImplementedError

    def value_columns(self, batch: int, heads: int, keys: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[batch, heads, keys, n padded]: the weights as a value tensor for `batch` conditional rows. Built once
        per shape."""
        key = (batch, heads, keys, dtype, str(device))
        if key not in self._columns:
            weights = self.key_weights(keys).to(device, torch.float32)
            rows, n = weights.shape[0], weights.shape[-1]
            if batch % rows:
                raise ValueError(f"{type(self).__name__} has weights for {rows} prompts; the batch has {batch} rows")
            padded = F.pad(weights, (0, -n % self.ALIGN)).repeat(batch // rows, 1, 1)
            self._columns[key] = padded[:, None].expand(-1, heads, -1, -1).to(dtype).contiguous()
        return self._columns[key]

    def __call__(self, probs: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        cond = cond_half(probs, call.state)
        self.read(cond @ self.value_columns(cond.shape[0], 1, probs.shape[-1], probs.dtype, probs.device), call)
        return probs


def last_cross_layers(places: Iterable[Place]) -> set[str]:
    """The last cross-attention layer of each transformer block (SDXL stacks up to 10 in one block)."""
    last = {place.block_name: place.name for place in places if place.is_cross}  # in module order: the last wins
    return set(last.values())


class TokenMask(KeySumReader):
    """Per transformer block: the conditional cross-attention of some tokens, binarised at its median.

    The tokens are `token_indices` (key positions shared by the batch, or a [batch, k] tensor) or a
    `selection` of weights over the keys ([keys], or [batch, keys] when each prompt's concept sits at
    its own positions); the block's score is the sum of the selected tokens' maps, heads averaged (LAG,
    Sec. 3.3). `mask_for(block_name)` returns [batch, 1, h, w] for the block's latest call (the mask
    repeats for the unconditional half under CFG), or None before the block has run. `layers`: the cross-attention
    layers to read (names); None reads every one, and a block of several layers keeps its last layer's mask.
    """

    replayable = True  # each block's mask is the same tensor work on every call; the step is not read

    def __init__(self, token_indices: Sequence[int] | torch.Tensor | None = None,
                 selection: torch.Tensor | None = None, layers: set[str] | None = None):
        if (token_indices is None) == (selection is None):
            raise ValueError("give token_indices or selection")
        super().__init__()
        self.token_indices, self.selection, self.layers = token_indices, selection, layers
        self.masks: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.masks.clear()

    def wants(self, place: Place) -> bool:
        return place.is_cross and (self.layers is None or place.name in self.layers)

    def key_weights(self, keys: int) -> torch.Tensor:
        if self.selection is not None:
            return self.selection.float().reshape(-1, keys, 1)
        idx = torch.as_tensor(self.token_indices).cpu().long()
        rows = idx.reshape(1, -1) if idx.ndim == 1 else idx  # shared positions, or one row of positions per prompt
        return torch.zeros(rows.shape[0], keys).scatter_(1, rows, 1.0)[..., None]

    def read(self, sums: torch.Tensor, call: AttentionCall) -> None:
        score = sums[..., 0].mean(dim=1)  # [b, Q] of the conditional rows
        mask = (score > score.median(dim=-1, keepdim=True).values).to(sums.dtype)
        if call.state.cfg:
            mask = torch.cat([mask, mask])
        self.masks[call.place.block_name] = mask.reshape(mask.shape[0], 1, *call.hw)

    def mask_for(self, block_name: str) -> torch.Tensor | None:
        return self.masks.get(block_name)
