"""Behaviour of diffusion/attention.py on the tiny SD model: the hub, recording, prompt-to-prompt
edits, LocalBlend, separate value inputs and LAG's masked blending.

The tiny UNet has seven Transformer2DModels (down_blocks.0 and up_blocks.1 at 32x32 latents, the
others at 16x16), each with one self- (attn1) and one cross-attention (attn2) layer.
"""

from __future__ import annotations


import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0

import diffusion.attention as attention_module
from diffusion.attention import (AttentionCall, AttentionController, AttentionHub, AttentionRefine, AttentionReplace,
                                 AttentionReweight, AttentionState, AttentionStore, ControlledAttnProcessor,
                                 LocalBlend, Place, PromptToPromptEdit, TokenMask, refinement_mapper,
                                 replacement_mapper, word_token_indices)
from diffusion.backbone import Conditioning

T = 500  # timestep of single UNet calls
SRC, DOG, RED_CAT = "a photo of a cat", "a photo of a dog", "a photo of a red cat"
ZEBRA = "a photo of a zebra"  # zebra is four tokens of the tiny tokenizer
CAT = 5  # token position of "cat" in SRC (0 is the start token)
K = 77  # keys of every cross-attention layer (the tokenizer's max length)
NUM_LAYERS = 7  # attention layers of each kind in the tiny UNet


# ----- helpers -----------------------------------------------------------------------------------
def latents(batch: int, seed: int = 0, hw: tuple[int, int] = (32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g)


def unet(backbone, x, cond, t=T, **cross_attention_kwargs) -> torch.Tensor:
    """One UNet call without autograd."""
    with torch.no_grad():
        return backbone.predict(x, t, cond, cross_attention_kwargs or None)


def cfg_batch(backbone, prompts, x):
    """Latents and conditioning in the guided layout [uncond_0..n; cond_0..n]."""
    uncond = backbone.encode_prompt([""] * len(prompts))
    return torch.cat([x, x]), Conditioning.cat([uncond, backbone.encode_prompt(prompts)])


def last_maps(store: AttentionStore) -> dict[Place, torch.Tensor]:
    """The latest recorded map of every layer."""
    return {place: maps[-1] for place, maps in store.maps.items()}


class Recorder(AttentionController):
    """Keeps a copy of every raw probability tensor [B, heads, Q, K] it is handed, per layer."""

    def __init__(self):
        self.probs: dict[Place, list[torch.Tensor]] = {}

    def __call__(self, probs, call):
        self.probs.setdefault(call.place, []).append(probs.detach().clone())
        return probs


def run_edit(backbone, edit, prompts, x, cfg=False, **state):
    """One UNet call with `edit` between two full stores: (maps before the edit, maps after it, output)."""
    before = AttentionStore(self_attn=True, average_heads=False)
    after = AttentionStore(self_attn=True, average_heads=False)
    cond = backbone.encode_prompt(prompts)
    if cfg:
        x, cond = cfg_batch(backbone, prompts, x)
    with AttentionHub(backbone.unet, [before, edit, after]) as hub, hub.sampling_state(cfg=cfg, **state):
        out = unet(backbone, x, cond)
    return last_maps(before), last_maps(after), out


def is_small(maps: torch.Tensor) -> bool:
    """Whether prompt-to-prompt replaces self-attention at this layer (<= 16x16 queries)."""
    return maps.shape[-2] <= 16 * 16


@pytest.fixture
def tok(tiny):
    return tiny.tokenizers[0]


# ----- the hub and the SDPA path -----------------------------------------------------------------
def test_hub_without_controllers_is_bitwise_sdpa_and_restores(tiny):
    """No controllers: output equal to diffusers' processors; restore() puts the very same objects back."""
    x, cond = latents(2), tiny.encode_prompt([SRC, DOG])
    original = dict(tiny.unet.attn_processors)
    hooks = len(tiny.unet._forward_pre_hooks)
    assert len(original) == 2 * NUM_LAYERS and all(type(p) is AttnProcessor2_0 for p in original.values())
    reference = unet(tiny, x, cond)

    hub = AttentionHub(tiny.unet)
    assert all(type(p) is ControlledAttnProcessor for p in tiny.unet.attn_processors.values())
    assert torch.equal(unet(tiny, x, cond), reference)
    hub.restore()
    hub.restore()  # idempotent

    restored = tiny.unet.attn_processors
    assert restored.keys() == original.keys()
    assert all(restored[name] is original[name] for name in original)
    assert len(tiny.unet._forward_pre_hooks) == hooks
    assert torch.equal(unet(tiny, x, cond), reference)


def test_only_editing_controllers_leave_the_fused_kernel(tiny, monkeypatch):
    """Fused SDPA runs on every layer that no controller edits: unwanted layers and layers that only
    record (stores, LAG masks); a layer an editing controller wants computes probs @ values instead.
    The outputs match the plain UNet's within 1e-5."""
    x, cond = latents(2), tiny.encode_prompt([SRC, DOG])
    reference = unet(tiny, x, cond)
    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def counting(query, key, *args, **kwargs):
        calls.append("self" if key.shape[-2] == query.shape[-2] else "cross")
        return sdpa(query, key, *args, **kwargs)

    class CrossEdit(AttentionController):  # edits = True; returns the probabilities unchanged
        def wants(self, place):
            return place.is_cross

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    with AttentionHub(tiny.unet) as hub:
        unet(tiny, x, cond)
        assert sorted(calls) == ["cross"] * NUM_LAYERS + ["self"] * NUM_LAYERS  # no controller
        calls.clear()
        store = hub.add(AttentionStore())  # records cross-attention, edits nothing
        recorded = unet(tiny, x, cond)
        assert sorted(calls) == ["cross"] * NUM_LAYERS + ["self"] * NUM_LAYERS
        assert len(store.maps) == NUM_LAYERS and all(p.is_cross for p in store.maps)
        calls.clear()
        hub.add(CrossEdit())
        edited = unet(tiny, x, cond)
        assert calls == ["self"] * NUM_LAYERS  # the cross layers now compute probs @ values
    torch.testing.assert_close(recorded, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=0)


def test_group_norm_attention_matches_diffusers(tiny):
    """Self-attention with a group norm (the VAE's mid block) takes keys/values from the normed states."""
    z = latents(1, seed=3)
    with torch.no_grad():
        reference = tiny.vae.decode(z).sample
        with AttentionHub(tiny.vae) as hub:
            assert len(hub.places) == 2 and all(
                tiny.vae.get_submodule(p.name).group_norm is not None for p in hub.places.values())
            assert torch.equal(tiny.vae.decode(z).sample, reference)
            hub.add(AttentionController())  # the explicit-softmax path
            torch.testing.assert_close(tiny.vae.decode(z).sample, reference, atol=1e-4, rtol=1e-4)


def test_processor_matches_diffusers_on_a_normed_cross_layer():
    """A cross layer with cross_attention_norm: same output as AttnProcessor2_0, the value input normed too."""
    from types import SimpleNamespace

    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm")
    with torch.no_grad():  # a non-trivial norm, so that skipping it shows
        attn.norm_cross.weight.uniform_(0.5, 2.0)
        attn.norm_cross.bias.normal_()
    hidden, text = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    hub = SimpleNamespace(controllers=[], state=AttentionState(), query_hw=lambda q: (4, q // 4))
    ours = ControlledAttnProcessor(hub, Place("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", True))
    with torch.no_grad():
        reference = AttnProcessor2_0()(attn, hidden, text)
        assert torch.equal(ours(attn, hidden, text), reference)
        assert torch.equal(ours(attn, hidden, text, value_hidden_states=text.clone()), reference)
        hub.controllers.append(AttentionController())
        torch.testing.assert_close(ours(attn, hidden, text, value_hidden_states=text.clone()), reference,
                                   atol=1e-6, rtol=0)


def test_place_and_query_size(tiny):
    """Place parses block and kind; query_hw follows the latent size of the call, also for non-square latents."""
    place = Place.from_processor_name("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")
    assert (place.name, place.block, place.is_cross) == ("up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                                        "up", True)
    assert place.block_name == "up_blocks.1.attentions.0"
    assert Place.from_processor_name("mid_block.attentions.0.transformer_blocks.0.attn1.processor").block == "mid"

    with AttentionHub(tiny.unet) as hub:
        assert hub.query_hw(256) == (16, 16)  # square guess before any call
        store = hub.add(AttentionStore())
        unet(tiny, latents(1, hw=(32, 48)), tiny.encode_prompt([SRC]))
        assert hub.state.latent_hw == (32, 48) and hub.query_hw(16 * 24) == (16, 24)
        assert set(store.hw.values()) == {(32, 48), (16, 24)}
        assert store.average(resolution=16).shape == (1, 16, 24, K)


def test_hub_using_and_sampling_state(tiny):
    """using() activates controllers only inside the block; sampling_state() restores the old values."""
    with AttentionHub(tiny.unet) as hub:
        a, b = AttentionController(), AttentionController()
        with hub.using(a) as got:
            assert got is a and hub.controllers == [a]
            with hub.using(b, a) as both:
                assert both == (b, a) and hub.controllers == [a, b, a]
            assert hub.controllers == [a]
        assert hub.controllers == []
        hub.state.step = 3
        with hub.sampling_state(step=7, num_steps=10, cfg=True) as state:
            assert (state.step, state.num_steps, state.cfg) == (7, 10, True)
        assert (hub.state.step, hub.state.num_steps, hub.state.cfg) == (3, None, False)


# ----- AttentionStore ----------------------------------------------------------------------------
def test_store_shapes_normalisation_and_token_indices(tiny):
    """Cross maps are [B, Q, K] (head mean) or [B, heads, Q, K] and sum to 1 over keys for every query."""
    mean, heads = AttentionStore(), AttentionStore(average_heads=False)
    tokens = AttentionStore(token_indices=[2, CAT])
    selfs = AttentionStore(cross=False, self_attn=True)
    with AttentionHub(tiny.unet, [mean, heads, tokens, selfs]):
        unet(tiny, latents(2), tiny.encode_prompt([SRC, DOG]))

    cross_names = {n[: -len(".processor")] for n in tiny.unet.attn_processors if n.endswith("attn2.processor")}
    assert {p.name for p in mean.maps} == cross_names and all(p.is_cross for p in mean.maps)
    for place, (m,) in mean.maps.items():
        h, w = mean.hw[place]
        n_heads = tiny.unet.get_submodule(place.name).heads
        assert (h, w) == ((32, 32) if place.name.startswith(("down_blocks.0", "up_blocks.1")) else (16, 16))
        assert m.shape == (2, h * w, K)
        assert heads.maps[place][0].shape == (2, n_heads, h * w, K)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, h * w), atol=1e-5, rtol=0)
        torch.testing.assert_close(heads.maps[place][0].sum(-1), torch.ones(2, n_heads, h * w), atol=1e-5, rtol=0)
        torch.testing.assert_close(heads.maps[place][0].mean(1), m, atol=1e-7, rtol=0)
        assert torch.equal(tokens.maps[place][0], m[..., [2, CAT]])
        assert m.grad_fn is None and not m.requires_grad
    assert len(selfs.maps) == NUM_LAYERS and all(not p.is_cross for p in selfs.maps)
    for place, (m,) in selfs.maps.items():
        q = selfs.hw[place][0] * selfs.hw[place][1]
        assert m.shape == (2, q, q)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, q), atol=1e-5, rtol=0)


def test_store_resolution_and_block_filters(tiny):
    """`resolutions` keeps only layers of those sizes, `blocks` only those blocks."""
    res16 = AttentionStore(resolutions=[16])
    mid = AttentionStore(blocks=("mid",))
    up_self = AttentionStore(cross=False, self_attn=True, blocks=("up",))
    with AttentionHub(tiny.unet, [res16, mid, up_self]):
        unet(tiny, latents(1), tiny.encode_prompt([SRC]))
    assert {p.block_name for p in res16.maps} == {"down_blocks.1.attentions.0", "mid_block.attentions.0",
                                                   "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"}
    assert set(res16.hw.values()) == {(16, 16)}
    assert [p.name for p in mid.maps] == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert len(up_self.maps) == 4 and all(p.block == "up" and not p.is_cross for p in up_self.maps)
    assert not mid.wants(Place("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down", True))


def test_store_cond_only_keeps_the_conditional_half(tiny):
    """With state.cfg the cond_only store holds rows [B/2:] of what a full store sees; without cfg all rows."""
    full, cond_only = AttentionStore(), AttentionStore(cond_only=True)
    x, cond = cfg_batch(tiny, [SRC, DOG], latents(2))
    with AttentionHub(tiny.unet, [full, cond_only]) as hub:
        hub.state.cfg = True
        unet(tiny, x, cond)
        for place, (m,) in full.maps.items():
            assert m.shape[0] == 4 and torch.equal(cond_only.maps[place][0], m[2:])
        hub.state.cfg = False
        unet(tiny, x, cond)
        assert all(maps[1].shape[0] == 4 for maps in cond_only.maps.values())


def test_store_with_grad_backpropagates_into_the_text(tiny):
    """with_grad maps keep the graph: a loss on them has a gradient w.r.t. the text states; default maps don't."""
    text = tiny.encode_prompt([SRC]).hidden_states.detach().clone().requires_grad_(True)
    graph, plain = AttentionStore(with_grad=True), AttentionStore()
    with AttentionHub(tiny.unet, [graph, plain]):
        tiny.predict(latents(1), T, Conditioning(text))
    maps = [m for _, m in graph.select()]
    assert len(maps) == NUM_LAYERS and all(m.grad_fn is not None for m in maps)
    assert all(m.grad_fn is None and not m.requires_grad for _, m in plain.select())
    loss = sum(m[..., CAT].pow(2).sum() for m in maps)
    loss.backward()
    assert text.grad is not None and torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0
    assert text.grad[0, CAT].abs().sum() > 0  # the token whose maps enter the loss


def test_store_average_equals_manual_mean_and_running_sum(tiny):
    """average() = mean over layers and steps reshaped [B, h, w, K]; average_steps gives the same from sums."""
    every, running, raw = AttentionStore(), AttentionStore(average_steps=True), Recorder()
    heads = AttentionStore(average_heads=False)
    cond = tiny.encode_prompt([SRC, DOG])
    with AttentionHub(tiny.unet, [every, running, raw, heads]):
        unet(tiny, latents(2, seed=1), cond, t=800)
        unet(tiny, latents(2, seed=2), cond, t=200)

    at16 = [p.mean(1) for place, probs in raw.probs.items() for p in probs if place.is_cross and p.shape[2] == 256]
    assert len(at16) == 4 * 2  # four 16x16 cross layers, two calls
    manual = torch.stack(at16).mean(0).reshape(2, 16, 16, K)
    assert len(raw.probs) == 2 * NUM_LAYERS and every.average(resolution=16).shape == (2, 16, 16, K)
    torch.testing.assert_close(every.average(resolution=16), manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(running.average(resolution=16), manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(running.average(resolution=32), every.average(resolution=32), atol=1e-6, rtol=0)
    assert all(len(m) == 1 for m in running.maps.values()) and set(running.counts.values()) == {2}
    assert all(len(m) == 2 for m in every.maps.values())
    assert heads.average(resolution=16).shape == (2, 4, 16, 16, K)
    up = every.average(resolution=32, blocks=("up",))
    ups = [m for p, m in every.select(resolution=32) if p.block == "up"]
    torch.testing.assert_close(up, torch.stack(ups).mean(0).reshape(2, 32, 32, K), atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="several resolutions"):
        every.average()
    with pytest.raises(ValueError, match="no self-attention maps"):
        every.average(is_cross=False)
    every.reset()
    assert every.maps == {} and every.counts == {}


# ----- prompt-to-prompt --------------------------------------------------------------------------
def test_replace_word_swap_copies_source_cross_maps(tiny, tok):
    """cat -> dog: the target's cross maps become the source's; the source row and its output are untouched.

    cat -> zebra (four tokens): each zebra token takes a quarter of the cat map (the word keeps the
    cat's attention mass, as prompt-to-prompt does), the end token and padding shift."""
    edit = AttentionReplace.from_prompts(tok, SRC, [DOG, ZEBRA])
    x = latents(3)
    before, after, out = run_edit(tiny, edit, [SRC, DOG, ZEBRA], x)
    _, _, plain = run_edit(tiny, AttentionController(), [SRC, DOG, ZEBRA], x)  # same code path, no edit

    assert len(after) == 2 * NUM_LAYERS
    for place, m in after.items():
        source = before[place][0]
        assert torch.equal(m[0], source)  # source row
        if place.is_cross or is_small(m):
            torch.testing.assert_close(m[1], source, atol=1e-7, rtol=0)
            assert not torch.allclose(before[place][1], source, atol=1e-4)  # there was work to do
        else:
            assert torch.equal(m[1:], before[place][1:])  # 32x32 self-attention is not replaced
        if place.is_cross:
            zebra = m[2]
            torch.testing.assert_close(zebra[..., :5], source[..., :5], atol=1e-7, rtol=0)
            torch.testing.assert_close(zebra[..., 5:9], 0.25 * source[..., [CAT] * 4], atol=1e-7, rtol=0)
            torch.testing.assert_close(zebra[..., 9:], source[..., 6:6 + K - 9], atol=1e-7, rtol=0)
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1], atol=1e-4) and not torch.allclose(out[2], plain[2], atol=1e-4)


def test_replace_under_cfg_leaves_the_unconditional_half(tiny, tok):
    """Layout [u_src, u_tgt, c_src, c_tgt]: only c_tgt is edited (cross and <=16x16 self maps)."""
    edit = AttentionReplace.from_prompts(tok, SRC, [DOG])
    before, after, _ = run_edit(tiny, edit, [SRC, DOG], latents(2), cfg=True)
    for place, m in after.items():
        assert m.shape[0] == 4
        assert torch.equal(m[:3], before[place][:3])
        if place.is_cross or is_small(m):
            torch.testing.assert_close(m[3], before[place][2], atol=1e-7, rtol=0)
        else:
            assert torch.equal(m[3], before[place][3])


def test_p2plus_replaces_unconditional_self_attention_only(tiny, tok):
    """uncond_self_steps: u_tgt's <=16x16 self maps become u_src's; nothing else differs from plain P2P."""
    x = latents(2)
    before, after, out = run_edit(tiny, AttentionReplace.from_prompts(tok, SRC, [DOG], uncond_self_steps=0.5),
                                  [SRC, DOG], x, cfg=True)
    plain_before, _, plain_out = run_edit(tiny, AttentionReplace.from_prompts(tok, SRC, [DOG]),
                                          [SRC, DOG], x, cfg=True)
    for place, m in after.items():
        if not place.is_cross and is_small(m):
            torch.testing.assert_close(m[1], before[place][0], atol=1e-7, rtol=0)
            assert not torch.allclose(before[place][1], before[place][0], atol=1e-4)
        else:
            assert torch.equal(m[:2], before[place][:2])  # unconditional cross maps are never edited
        assert torch.equal(m[0], before[place][0])
        # rows other than u_tgt see exactly what they see without P2Plus
        assert torch.equal(before[place][[0, 2, 3]], plain_before[place][[0, 2, 3]])
    assert torch.equal(out[[0, 2, 3]], plain_out[[0, 2, 3]]) and not torch.allclose(out[1], plain_out[1], atol=1e-5)


@pytest.mark.parametrize("step, cross_edited, self_edited", [(0, True, True), (1, True, False), (3, False, False)])
def test_edit_step_windows(tiny, tok, step, cross_edited, self_edited):
    """cross_steps=0.5 and self_steps=0.25 of 4 steps: cross edits for steps 0-1, self only for step 0."""
    edit = AttentionReplace.from_prompts(tok, SRC, [DOG], cross_steps=0.5, self_steps=0.25, uncond_self_steps=0.25)
    before, after, _ = run_edit(tiny, edit, [SRC, DOG], latents(2), cfg=True, step=step, num_steps=4)
    for place, m in after.items():
        edited = cross_edited if place.is_cross else self_edited and is_small(m)
        if edited:
            torch.testing.assert_close(m[3], before[place][2], atol=1e-7, rtol=0)
            if not place.is_cross:  # P2Plus window equals the self window here
                torch.testing.assert_close(m[1], before[place][0], atol=1e-7, rtol=0)
        else:
            assert torch.equal(m, before[place])


def test_refine_aligns_old_tokens_and_keeps_the_new_word(tiny, tok):
    """cat -> red cat: aligned target tokens take the source tokens' maps, 'red' keeps its own map."""
    edit = AttentionRefine.from_prompts(tok, SRC, [RED_CAT])
    index, alpha = edit.index[0], edit.alpha[0]
    red = word_token_indices(tok, RED_CAT, "red")
    assert red == [5] and alpha[5] == 0 and int(alpha.sum()) == K - 1
    before, after, _ = run_edit(tiny, edit, [SRC, RED_CAT], latents(2))
    for place, m in after.items():
        if not place.is_cross:
            continue
        source, target, edited = before[place][0], before[place][1], m[1]
        aligned = alpha.bool()
        torch.testing.assert_close(edited[..., aligned], source[..., index[aligned]], atol=1e-7, rtol=0)
        torch.testing.assert_close(edited[..., 5], target[..., 5], atol=1e-7, rtol=0)
        assert not any(torch.allclose(edited[..., 5], source[..., k], atol=1e-4) for k in range(K))
        torch.testing.assert_close(edited[..., 6], source[..., CAT], atol=1e-7, rtol=0)  # 'cat' moved right


def test_reweight_scales_one_token_column(tiny, tok):
    """Reweighting 'cat' by 3: the target takes the source's maps with that column scaled by exactly 3."""
    eq = AttentionReweight.equalizer_for(tok, SRC, {"cat": 3.0})
    assert eq[CAT] == 3.0 and eq.sum() == K + 2.0
    before, after, _ = run_edit(tiny, AttentionReweight(eq[None], self_steps=0.0), [SRC, SRC], latents(2))
    for place, m in after.items():
        if not place.is_cross:
            assert torch.equal(m, before[place])
            continue
        source = before[place][0]
        torch.testing.assert_close(m[1, ..., CAT], 3.0 * source[..., CAT], atol=0, rtol=1e-6)
        others = torch.arange(K) != CAT
        assert torch.equal(m[1][..., others], source[..., others])
        assert torch.equal(m[0], before[place][0])
        assert (m[1].sum(-1) > 1.0 + 1e-3).any()  # rows no longer sum to 1


def test_reweight_after_a_base_edit(tiny, tok):
    """With base=replace the reweight scales the copied source maps."""
    eq = AttentionReweight.equalizer_for(tok, DOG, {"dog": 0.5})[None]
    edit = AttentionReweight(eq, base=AttentionReplace.from_prompts(tok, SRC, [DOG]), self_steps=0.0)
    before, after, _ = run_edit(tiny, edit, [SRC, DOG], latents(2))
    for place, m in after.items():
        if place.is_cross:
            torch.testing.assert_close(m[1], before[place][0] * eq[0], atol=1e-7, rtol=0)


def test_edit_controller_on_synthetic_probs():
    """A lone prompt is returned unchanged; self maps above self_max_queries are never replaced."""
    edit = PromptToPromptEdit(cross_steps=1.0, self_steps=1.0, uncond_self_steps=1.0, self_max_queries=4)
    probs = torch.rand(4, 2, 9, 9)
    state = AttentionState(cfg=True)
    self_place = Place("mid_block.attentions.0.transformer_blocks.0.attn1", "mid", False)
    assert torch.equal(edit(probs, AttentionCall(self_place, (3, 3), state)), probs)  # 9 queries > 4
    small = probs[:, :, :4, :4]
    out = edit(small, AttentionCall(self_place, (2, 2), state))
    assert torch.equal(out[[0, 1]], small[[0, 0]]) and torch.equal(out[[2, 3]], small[[2, 2]])
    single = torch.rand(2, 2, 4, 4)  # cfg with one prompt: nothing to edit
    assert torch.equal(edit(single, AttentionCall(self_place, (2, 2), state)), single)


# ----- token mappers -----------------------------------------------------------------------------
def test_word_token_indices(tok):
    """Positions count the start token as 0; multi-token words give all their positions."""
    assert word_token_indices(tok, SRC, "a") == [1, 4]
    assert word_token_indices(tok, SRC, "cat") == [CAT]
    assert word_token_indices(tok, "a zebra", "zebra") == [2, 3, 4, 5]
    assert word_token_indices(tok, "a cat, a dog", "dog") == [5]
    for prompt, word in [(ZEBRA, "zebra"), ("a cat, a dog", "dog")]:
        ids = tok(prompt).input_ids
        word_ids = tok(word, add_special_tokens=False).input_ids
        assert [ids[i] for i in word_token_indices(tok, prompt, word)] == word_ids
    with pytest.raises(ValueError, match="does not occur"):
        word_token_indices(tok, SRC, "dog")


def test_replacement_mapper(tok):
    """Same token counts: a permutation (here the identity); differing counts: the word's mass shared evenly."""
    assert torch.equal(replacement_mapper(tok, SRC, DOG), torch.eye(K))
    assert replacement_mapper(tok, SRC, DOG, length=10).shape == (10, 10)

    grow = replacement_mapper(tok, SRC, ZEBRA)  # cat (1 token) -> zebra (4 tokens)
    assert torch.equal(grow[5:9], 0.25 * torch.eye(K)[[5, 5, 5, 5]])  # each zebra token: a quarter of cat
    assert torch.equal(grow[9:], torch.eye(K)[6:6 + K - 9])  # end token and padding follow
    assert torch.equal(grow[:5], torch.eye(K)[:5])

    shrink = replacement_mapper(tok, ZEBRA, SRC)
    assert torch.equal(shrink[5, 5:9], torch.ones(4)) and shrink[:, 5:9].sum() == 4  # cat: all of zebra
    assert torch.equal(shrink[6:K - 3], torch.eye(K)[9:])
    assert shrink[K - 3:].sum() == 0  # nothing left to map to the last padding rows

    with pytest.raises(ValueError, match="same number of words"):
        replacement_mapper(tok, SRC, RED_CAT)


def test_refinement_mapper(tok):
    """Insertions: matched words point at their source tokens (alpha 1), new words at themselves (alpha 0)."""
    index, alpha = refinement_mapper(tok, SRC, RED_CAT)
    assert index[:8].tolist() == [0, 1, 2, 3, 4, 5, 5, 6]
    assert alpha[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert torch.equal(index[7:], torch.arange(6, 6 + K - 7)) and alpha[7:].eq(1).all()
    src_ids = tok(SRC, padding="max_length", max_length=K).input_ids
    tgt_ids = tok(RED_CAT, padding="max_length", max_length=K).input_ids
    assert all(tgt_ids[j] == src_ids[index[j]] for j in range(K) if alpha[j] == 1)

    index, alpha = refinement_mapper(tok, SRC, "a big photo of a red cat")
    assert alpha[:9].tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert index[[1, 3, 4, 5, 7, 8]].tolist() == [1, 2, 3, 4, 5, 6]


# ----- separate value input (StyleDiffusion) -----------------------------------------------------
def test_value_input_changes_output_not_maps(tiny):
    """value_hidden_states != text: the same maps at every cross layer (given its input) but another output."""
    x, cond = latents(1), tiny.encode_prompt([SRC])
    text = cond.hidden_states
    v = torch.randn(text.shape, generator=torch.Generator().manual_seed(7))
    inputs = {}
    layers = {n: m for n, m in tiny.unet.named_modules() if n.endswith("attn2")}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].clone()))
             for n, m in layers.items()]
    with AttentionHub(tiny.unet) as hub:
        plain = unet(tiny, x, cond)
        assert torch.equal(unet(tiny, x, cond, value_hidden_states=text.clone()), plain)
        plain_store, value_store = AttentionStore(self_attn=True), AttentionStore(self_attn=True)
        with hub.using(plain_store):
            unet(tiny, x, cond)
        with hub.using(value_store):
            styled = unet(tiny, x, cond, value_hidden_states=v)
        for h in hooks:
            h.remove()
        assert len(inputs) == NUM_LAYERS and not torch.allclose(plain, styled, atol=1e-4)
        # the first self and cross layers see identical inputs, so identical maps
        for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                     "down_blocks.0.attentions.0.transformer_blocks.0.attn2"):
            place, = [p for p in plain_store.maps if p.name == name]
            assert torch.equal(value_store.maps[place][0], plain_store.maps[place][0])
        # every cross layer, fed the same queries: maps unchanged, output changed
        for name, layer in layers.items():
            with hub.using(AttentionStore()) as a, torch.no_grad():
                out_text = layer(inputs[name], encoder_hidden_states=text)
            with hub.using(AttentionStore()) as b, torch.no_grad():
                out_v = layer(inputs[name], encoder_hidden_states=text, value_hidden_states=v)
            (map_a,), (map_b,) = a.maps.values(), b.maps.values()
            torch.testing.assert_close(map_b, map_a, atol=1e-6, rtol=0)
            assert not torch.allclose(out_v, out_text, atol=1e-4)


# ----- TokenMask (LAG) ---------------------------------------------------------------------------
def test_token_mask_is_the_median_split_of_token_attention(tiny):
    """Per block a binary [B, 1, h, w] mask with exactly half the pixels on: score > median of the token's map
    (or of the summed maps of a per-prompt selection of tokens)."""
    shared, per_sample = TokenMask([CAT]), TokenMask(torch.tensor([[CAT], [2]]))
    selection = torch.zeros(2, 77)
    selection[0, [CAT, 2]] = selection[1, 3] = 1
    selected = TokenMask(selection=selection)
    store = AttentionStore()
    assert shared.mask_for("mid_block.attentions.0") is None
    with AttentionHub(tiny.unet, [shared, per_sample, selected, store]):
        unet(tiny, latents(2), tiny.encode_prompt([SRC, SRC]))
    blocks = {n for n, m in tiny.unet.named_modules() if isinstance(m, Transformer2DModel)}
    assert set(shared.masks) == blocks and len(blocks) == NUM_LAYERS
    for place, (maps,) in store.maps.items():
        mask, h, w = shared.mask_for(place.block_name), *store.hw[place]
        assert mask.shape == (2, 1, h, w) and set(mask.unique().tolist()) == {0.0, 1.0}
        assert mask.flatten(1).sum(1).tolist() == [h * w / 2] * 2
        score = maps[..., CAT]
        assert torch.equal(mask.flatten(1).bool(), score > score.median(-1, keepdim=True).values)
        sample_score = torch.stack([maps[0, :, CAT], maps[1, :, 2]])
        expected = sample_score > sample_score.median(-1, keepdim=True).values
        assert torch.equal(per_sample.mask_for(place.block_name).flatten(1).bool(), expected)
        summed = torch.stack([maps[0, :, CAT] + maps[0, :, 2], maps[1, :, 3]])
        expected = summed > summed.median(-1, keepdim=True).values
        assert torch.equal(selected.mask_for(place.block_name).flatten(1).bool(), expected)
    shared.reset()
    assert shared.masks == {}


def test_token_mask_under_cfg_repeats_the_conditional_mask(tiny):
    """Under CFG the mask comes from the conditional half and is repeated for the unconditional half."""
    mask, store = TokenMask([CAT]), AttentionStore(cond_only=True)
    x, cond = cfg_batch(tiny, [SRC, DOG], latents(2))
    with AttentionHub(tiny.unet, [mask, store]) as hub, hub.sampling_state(cfg=True):
        unet(tiny, x, cond)
    for place, (maps,) in store.maps.items():
        m = mask.mask_for(place.block_name)
        score = maps[..., CAT]
        assert m.shape[0] == 4 and torch.equal(m[:2], m[2:])
        assert torch.equal(m[2:].flatten(1).bool(), score > score.median(-1, keepdim=True).values)


class SumsOnly(TokenMask):
    """A TokenMask that fails if a layer hands it probabilities instead of its weighted sums."""

    def __call__(self, probs, call):
        raise AssertionError(f"{call.place.name} formed probabilities for a key-sum reader")


@pytest.mark.parametrize("selected", ["indices", "selection"])
def test_a_token_mask_alone_reads_its_sums_from_the_fused_kernel(tiny, selected):
    """Alone on the cross-attention layers a TokenMask is never handed probabilities: its weights are one more
    fused call's values. Its masks are those it reads from the probabilities beside a store (up to ties at the
    median), and the UNet's output is the plain processors' exactly."""
    selection = torch.zeros(2, K)
    selection[0, [CAT, 2]] = selection[1, 3] = 1
    kwargs = {"token_indices": [CAT]} if selected == "indices" else {"selection": selection}
    x, cond = cfg_batch(tiny, [SRC, DOG], latents(2))
    plain = unet(tiny, x, cond)
    alone, beside = SumsOnly(**kwargs), TokenMask(**kwargs)
    with AttentionHub(tiny.unet, [alone]) as hub, hub.sampling_state(cfg=True):
        fused = unet(tiny, x, cond)
    with AttentionHub(tiny.unet, [beside, AttentionStore()]) as hub, hub.sampling_state(cfg=True):
        unet(tiny, x, cond)
    assert torch.equal(fused, plain)
    assert set(alone.masks) == set(beside.masks) and len(alone.masks) == NUM_LAYERS
    for block, mask in alone.masks.items():
        assert mask.shape == beside.masks[block].shape and mask.shape[0] == 4
        assert (mask != beside.masks[block]).float().mean() < 0.01  # only ties at the median may differ


def test_a_token_mask_for_other_prompts_than_the_batch_says_so(tiny):
    """Selections for 3 prompts cannot mask a batch of 2: a ValueError naming both counts, not a shape error."""
    x, cond = latents(2), tiny.encode_prompt([SRC, DOG])
    with AttentionHub(tiny.unet, [TokenMask(selection=torch.ones(3, K))]):
        with pytest.raises(ValueError, match="weights for 3 prompts; the batch has 2 rows"):
            unet(tiny, x, cond)


# ----- LocalBlend (prompt-to-prompt) -------------------------------------------------------------
def test_local_blend_sums_the_conditional_word_maps_of_the_16x16_down_and_up_layers(tiny, tok):
    """Per prompt, its own word's cross maps, heads averaged, summed over the 16x16 layers of the down and up
    blocks (mid excluded) and over calls, from the conditional half: other unconditional rows change nothing."""
    prompts = [SRC, DOG]
    assert word_token_indices(tok, DOG, "dog") == [CAT]
    store = AttentionStore(cond_only=True, resolutions=[16], blocks=("down", "up"))
    blend = LocalBlend.from_prompts(tok, prompts, ["cat", ["dog"]])
    other_uncond = LocalBlend.from_prompts(tok, prompts, ["cat", "dog"])
    x, cond = cfg_batch(tiny, prompts, latents(2))
    noisy = Conditioning.cat([tiny.encode_prompt([RED_CAT, ZEBRA]), tiny.encode_prompt(prompts)])
    with AttentionHub(tiny.unet, [store, blend]) as hub, hub.sampling_state(cfg=True, step=0, num_steps=1):
        unet(tiny, x, cond)
        unet(tiny, x, cond)
        hub.controllers[:] = [other_uncond]
        unet(tiny, x, noisy)
        unet(tiny, x, noisy)
    assert {p.block for p in store.maps} == {"down", "up"} and len(store.maps) == 3  # down_blocks.1, up_blocks.0 x2
    expected = sum(m[..., CAT] for maps in store.maps.values() for m in maps).reshape(2, 1, 16, 16)
    torch.testing.assert_close(blend.total, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(other_uncond.total, blend.total, atol=1e-6, rtol=1e-6)
    assert blend.num_steps == 1


def spot_maps(spots, hw=(16, 16), heads=2, keys=4):
    """Conditional probs [n, heads, Q, keys] whose key 1 is 1 at head 0 of each row's spot, 0.2 elsewhere."""
    probs = torch.zeros(len(spots), heads, hw[0] * hw[1], keys)
    probs[:, :, :, 1] = 0.2
    for row, (y, x) in enumerate(spots):
        probs[row, 0, y * hw[1] + x, 1] = 1.0  # head mean 0.6 at the spot, 0.2 elsewhere: 1 / 0.33 after / max
    return probs


def spot_mask(y, x, scale=2, side=32):
    """The latent mask of a spot: its 3x3 neighbourhood (the max-pool), each map pixel `scale` latent pixels."""
    mask = torch.zeros(1, side, side, dtype=torch.bool)
    mask[:, scale * (y - 1):scale * (y + 2), scale * (x - 1):scale * (x + 2)] = True
    return mask


def test_local_blend_keeps_targets_inside_the_union_with_the_source_mask():
    """Each row's mask is its words' map, 3x3 max-pooled, resized, divided by its max, > threshold; from step
    int(0.2 N) on each target row keeps its own values inside (its mask or the source's) and takes the
    source row's outside; the source row never changes. Unconditional rows are not read."""
    spots = [(2, 2), (10, 10), (5, 12)]  # the source, two targets
    blend = LocalBlend(torch.tensor([[0.0, 1, 0, 0]] * 3), threshold=0.34)  # 0.2 / 0.6 = 0.33 stays out
    place = Place("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", True)
    probs = torch.cat([torch.rand(3, 2, 256, 4) * 10, spot_maps(spots)])  # [uncond (never read); cond]
    state = AttentionState(step=0, num_steps=10, cfg=True)
    assert torch.equal(blend(probs, AttentionCall(place, (16, 16), state)), probs)
    own = torch.stack([spot_mask(*spot) for spot in spots])
    assert torch.equal(blend.masks((32, 32)), own)

    x = latents(3)
    assert blend.blend(1, x) is x  # before int(0.2 * 10) = 2
    out = blend.blend(2, x)
    assert torch.equal(out[0], x[0])
    for row in (1, 2):
        union = own[row] | own[0]
        assert torch.equal(out[row], torch.where(union, x[row], x[0])), row
        assert 0 < union.float().mean() < 1

    blend.threshold = 1.5  # nothing passes: every target is the source
    assert torch.equal(blend.blend(9, x), x[:1].expand_as(x))
    blend.threshold = 0.3  # prompt-to-prompt's: the 0.33 background passes too, nothing is blended
    assert torch.equal(blend.blend(9, x), x)


def test_local_blend_selection_and_errors(tok):
    """Every token of every word of a prompt is selected; words must be in their prompts, one entry per prompt;
    blending needs maps of its resolution."""
    blend = LocalBlend.from_prompts(tok, [SRC, ZEBRA], [["a", "cat"], "zebra"])
    assert blend.selection[0].nonzero().flatten().tolist() == [1, 4, CAT]
    assert blend.selection[1].nonzero().flatten().tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="does not occur"):
        LocalBlend.from_prompts(tok, [SRC, DOG], ["cat", "cat"])
    with pytest.raises(ValueError, match="one per prompt"):
        LocalBlend.from_prompts(tok, [SRC, DOG], ["cat"])
    coarse = LocalBlend(blend.selection, resolution=8)
    place = Place("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", True)
    coarse(torch.rand(2, 2, 256, K), AttentionCall(place, (16, 16), AttentionState(step=0, num_steps=5)))
    with pytest.raises(ValueError, match="no cross-attention at 8x8"):
        coarse.blend(4, latents(2))
