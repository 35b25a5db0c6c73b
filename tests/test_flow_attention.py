"""Attention control on the joint attention of the tiny SD3 and FLUX transformers: the hub reproduces the stock
processors, the store records text-to-image maps, prompt-to-prompt's replace / refine / reweight edit them, and
the text tokens' values can be recorded and injected (StyleDiffusion's value input)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.flow import load_flow_backbone
from diffusion.flow_attention import (FlowAttentionHub, FlowAttentionStore, FlowAttnProcessor, TextValueInjection,
                                      TextValueStore, clip_length, controlled_euler_sample, flow_attention_refine,
                                      flow_attention_replace, flow_attention_reweight, joint_refinement_mapper,
                                      joint_replacement_mapper, text_length, word_positions)
from utils.errors import ConfigError

KINDS = ("sd3", "flux")
GUIDANCE = {"sd3": 5.0, "flux": 3.5}  # SD3: classifier-free guidance against ""; FLUX.1-dev: embedded guidance
STEPS = 3
SOURCE = "a photo of a cat"


@pytest.fixture(scope="module")
def backbones(flow_dirs) -> dict:
    """The tiny SD3 and FLUX backbones, loaded once for this module."""
    return {kind: load_flow_backbone(str(flow_dirs[kind])) for kind in KINDS}


def noise(backbone, batch: int, seed: int = 0) -> torch.Tensor:
    """The same Gaussian latents (64 px images) in every row, as prompt-to-prompt starts source and targets."""
    one = torch.randn(1, backbone.latent_channels, 32, 32, generator=torch.Generator().manual_seed(seed))
    return one.expand(batch, -1, -1, -1).clone()


def velocity(backbone, prompts, latents=None, sigma: float = 0.7) -> torch.Tensor:
    latents = noise(backbone, len(prompts)) if latents is None else latents
    guidance = GUIDANCE["flux"] if backbone.kind == "flux" else None
    with torch.no_grad():
        return backbone.predict_velocity(latents, sigma, backbone.encode_prompt(prompts), guidance=guidance)


def sample(hub, backbone, prompts) -> torch.Tensor:
    """Euler sampling through the hub, the stock pipeline's guidance for each kind."""
    latents = noise(backbone, len(prompts))
    negative = backbone.encode_prompt([""] * len(prompts)) if backbone.kind == "sd3" else None
    sigmas = backbone.sigmas(STEPS, backbone.image_seq_len(latents))
    return controlled_euler_sample(hub, backbone, backbone.encode_prompt(prompts), latents, sigmas,
                                   GUIDANCE[backbone.kind], negative)


# ----- (a) the hub alone is the stock model ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hub_without_editing_controllers_reproduces_the_stock_processors(kind, backbones):
    backbone = backbones[kind]
    prompts = [SOURCE, "a red house in the snow"]
    stock = velocity(backbone, prompts)
    original = {name: type(p) for name, p in backbone.transformer.attn_processors.items()}
    with FlowAttentionHub(backbone) as hub:
        assert all(isinstance(p, FlowAttnProcessor) for p in backbone.transformer.attn_processors.values())
        hooked = velocity(backbone, prompts)
        with hub.using(FlowAttentionStore()):  # a read-only controller keeps the fused kernel's output too
            stored = velocity(backbone, prompts)
    torch.testing.assert_close(hooked, stock, atol=0, rtol=0)
    torch.testing.assert_close(stored, stock, atol=0, rtol=0)
    assert {name: type(p) for name, p in backbone.transformer.attn_processors.items()} == original
    streams = {name.split(".")[0] for name in original}
    assert streams == ({"transformer_blocks"} if kind == "sd3" else {"transformer_blocks", "single_transformer_blocks"})
    if kind == "sd3":  # SD3's last block keeps no text output: the context-pre-only path is covered
        assert backbone.transformer.transformer_blocks[-1].attn.context_pre_only


# ----- (b) the store --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_word_positions_point_at_the_words_tokens_in_each_part(kind, backbones):
    backbone = backbones[kind]
    prompt = "a photo of a red cat"
    t5_ids = backbone.t5_tokenizer(prompt).input_ids
    positions = word_positions(backbone, prompt, "cat")
    assert positions.t5 == [clip_length(backbone) + 5]  # T5 has no start token: the sixth word sits at 5
    assert [t5_ids[p - clip_length(backbone)] for p in positions.t5] == \
        backbone.t5_tokenizer("cat", add_special_tokens=False).input_ids
    if kind == "sd3":
        clip = backbone.clip_tokenizers[0]
        assert positions.clip == [6] and clip(prompt).input_ids[6] == clip("cat", add_special_tokens=False).input_ids[0]
        assert text_length(backbone) == 77 + 256
    else:
        assert positions.clip == [] and text_length(backbone) == 512
    assert word_positions(backbone, "a cat and a cat", "cat").t5 == [clip_length(backbone) + 1,
                                                                     clip_length(backbone) + 4]
    spelled = word_positions(backbone, "a zebra on the beach", "zebra").t5  # no listed word: T5 spells it out
    zebra_ids = backbone.t5_tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(spelled) == len(zebra_ids) > 1
    assert [backbone.t5_tokenizer("a zebra on the beach").input_ids[p - clip_length(backbone)] for p in spelled] \
        == zebra_ids
    with pytest.raises(ConfigError, match="'dog' is not in prompt"):
        word_positions(backbone, prompt, "dog")


@pytest.mark.parametrize("kind", KINDS)
def test_store_records_text_to_image_maps_per_block_and_step(kind, backbones):
    backbone = backbones[kind]
    with FlowAttentionHub(backbone) as hub:
        store, coarse = hub.add(FlowAttentionStore(cond_only=True)), hub.add(FlowAttentionStore(resolution=8))
        sample(hub, backbone, [SOURCE])
    text, blocks = text_length(backbone), len(backbone.transformer.attn_processors)
    assert len(store.maps) == blocks and all([s for s, _ in e] == list(range(STEPS)) for e in store.maps.values())
    batch = 2 if kind == "sd3" else 1  # the coarse store keeps SD3's unconditional half too
    for found, shape in ((store.select(), (1, 16 * 16, text)), (coarse.select(), (batch, 8 * 8, text))):
        assert len(found) == blocks * STEPS and all(m.shape == shape for m in found)
        rows = torch.stack(found).sum(-1)  # a slice of a softmax over the joint sequence
        assert rows.max() <= 1 + 1e-5 and rows.min() > 0
    assert store.average().shape == (1, 16, 16, text) and coarse.average(steps=[0]).shape == (batch, 8, 8, text)
    mean = store.average()
    for part in ("t5", "clip") if kind == "sd3" else ("t5",):
        cat, photo = (getattr(word_positions(backbone, SOURCE, w), part)[0] for w in ("cat", "photo"))
        assert (mean[..., cat] - mean[..., photo]).abs().max() > 1e-4  # words attend differently


@pytest.mark.parametrize("kind", KINDS)
def test_store_with_grad_keeps_the_graph_to_the_latents(kind, backbones):
    """Attention losses (EM's cross-attention loss) backpropagate through the recorded maps."""
    backbone = backbones[kind]
    latents = noise(backbone, 1).requires_grad_(True)
    cat = word_positions(backbone, SOURCE, "cat").all
    guidance = GUIDANCE["flux"] if kind == "flux" else None
    with FlowAttentionHub(backbone) as hub, hub.using(FlowAttentionStore(with_grad=True, token_indices=cat)) as store:
        backbone.predict_velocity(latents, 0.7, backbone.encode_prompt([SOURCE]), guidance=guidance)
    store.average().sum().backward()
    assert store.average().shape[-1] == len(cat) and latents.grad.abs().sum() > 0


# ----- (c) replace and refine -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_joint_mappers_align_both_text_parts(kind, backbones):
    backbone = backbones[kind]
    same = joint_replacement_mapper(backbone, SOURCE, SOURCE)
    torch.testing.assert_close(same, torch.eye(text_length(backbone)))
    swap = joint_replacement_mapper(backbone, SOURCE, "a photo of a dog")
    cat, dog = word_positions(backbone, SOURCE, "cat"), word_positions(backbone, "a photo of a dog", "dog")
    assert all(swap[d, c] == 1 for d, c in zip(dog.all, cat.all))
    index, alpha = joint_refinement_mapper(backbone, SOURCE, "a photo of a red cat")
    red_cat = word_positions(backbone, "a photo of a red cat", "cat")
    assert index[red_cat.all].tolist() == cat.all and alpha[red_cat.all].tolist() == [1.0] * len(cat.all)
    red = word_positions(backbone, "a photo of a red cat", "red").all
    assert alpha[red].tolist() == [0.0] * len(red)  # the new word keeps its own maps


@pytest.mark.parametrize("kind", KINDS)
def test_replace_edits_only_the_target_row(kind, backbones):
    backbone = backbones[kind]
    with FlowAttentionHub(backbone) as hub:
        with hub.using(flow_attention_replace(backbone, SOURCE, [SOURCE])):
            identical = sample(hub, backbone, [SOURCE, SOURCE])
        prompts = [SOURCE, "a photo of a dog"]
        plain = sample(hub, backbone, prompts)
        with hub.using(flow_attention_replace(backbone, SOURCE, prompts[1:])):
            edited = sample(hub, backbone, prompts)
        with hub.using(flow_attention_replace(backbone, SOURCE, prompts[1:], cross_steps=0.0)):
            unedited = sample(hub, backbone, prompts)  # tau_c = 0: no step is edited
    torch.testing.assert_close(identical[1], identical[0])
    torch.testing.assert_close(edited[0], plain[0])
    assert (edited[1] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(unedited, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_refine_edits_only_the_target_row(kind, backbones):
    backbone = backbones[kind]
    prompts = [SOURCE, "a photo of a red cat"]
    with FlowAttentionHub(backbone) as hub:
        plain = sample(hub, backbone, prompts)
        with hub.using(flow_attention_refine(backbone, SOURCE, prompts[1:])):
            edited = sample(hub, backbone, prompts)
    torch.testing.assert_close(edited[0], plain[0])
    assert (edited[1] - plain[1]).abs().max() > 1e-3


# ----- (d) reweight ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_reweight_by_one_changes_nothing_and_by_five_changes_the_target(kind, backbones):
    backbone = backbones[kind]
    prompts = [SOURCE, SOURCE]
    with FlowAttentionHub(backbone) as hub:
        plain = sample(hub, backbone, prompts)
        with hub.using(flow_attention_reweight(backbone, prompts[1:], {"cat": 1.0})):
            unit = sample(hub, backbone, prompts)
        with hub.using(flow_attention_reweight(backbone, prompts[1:], {"cat": 5.0})):
            scaled = sample(hub, backbone, prompts)
    torch.testing.assert_close(unit, plain)
    torch.testing.assert_close(scaled[0], plain[0])
    assert (scaled[1] - plain[1]).abs().max() > 1e-3


# ----- (e) value input on the text tokens -----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_text_value_injection(kind, backbones):
    backbone = backbones[kind]
    with FlowAttentionHub(backbone) as hub:
        own_values, other_values = TextValueStore(), TextValueStore()
        with hub.using(own_values):
            plain = sample(hub, backbone, [SOURCE])
        with hub.using(other_values):
            sample(hub, backbone, ["a blue car in the city"])
        with hub.using(TextValueInjection(own_values.values)):
            same = sample(hub, backbone, [SOURCE])
        with hub.using(TextValueInjection(other_values.values)):
            injected = sample(hub, backbone, [SOURCE])
        with hub.using(TextValueInjection({}, strict=True)), pytest.raises(ConfigError, match="no text values"):
            sample(hub, backbone, [SOURCE])
    assert len(own_values.values) == len(backbone.transformer.attn_processors) * STEPS
    inner = backbone.transformer.transformer_blocks[0].attn.inner_dim
    batch = 2 if kind == "sd3" else 1
    assert all(v.shape == (batch, text_length(backbone), inner) for v in own_values.values.values())
    torch.testing.assert_close(same, plain)
    assert (injected - plain).abs().max() > 1e-3


def test_flow_attention_imports_nothing_above_diffusion():
    code = ("import sys, diffusion.flow_attention; "
            "print([m for m in sys.modules if m.split('.')[0] in ('lightning_modules', 'callbacks', 'datamodules', "
            "'metrics')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_store_rejects_unknown_streams():
    with pytest.raises(ConfigError, match="streams=\\['cross'\\] are unknown"):
        FlowAttentionStore(streams=("joint", "cross"))


@pytest.mark.parametrize("kind", KINDS)
def test_value_text_states_option_reaches_only_the_image_queries(kind, backbones):
    """The processor's value_text_states (projected text values): own values change nothing; other values change
    the image tokens' output and leave the text tokens' output alone (text queries keep the prompt's values)."""
    backbone = backbones[kind]
    attn = backbone.transformer.transformer_blocks[0].attn
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 16, attn.inner_dim, generator=generator)
    text = torch.randn(2, 6, attn.inner_dim, generator=generator)
    with FlowAttentionHub(backbone), torch.no_grad():
        plain = attn(hidden_states=image, encoder_hidden_states=text)
        own = attn(hidden_states=image, encoder_hidden_states=text, value_text_states=attn.add_v_proj(text))
        other = attn(hidden_states=image, encoder_hidden_states=text,
                     value_text_states=torch.randn(2, 6, attn.inner_dim, generator=generator))
    for ours, theirs in zip(own, plain):
        torch.testing.assert_close(ours, theirs)
    assert (other[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(other[1], plain[1])


def test_text_to_image_maps_in_chunks_are_the_softmax_block(monkeypatch):
    import diffusion.flow_attention as flow_attention

    generator = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 3, 10, 8, generator=generator), torch.randn(2, 3, 14, 8, generator=generator)
    mask = torch.randn(2, 1, 10, 14, generator=generator)
    text, image = slice(10, 14), slice(0, 10)  # SD3's order: image first
    full = ((query @ key.transpose(-1, -2)) / 8 ** 0.5 + mask).softmax(-1)[:, :, image, text]
    monkeypatch.setattr(flow_attention, "MAP_CHUNK_BYTES", 4 * 2 * 3 * 14 * 3)  # three query rows at a time
    torch.testing.assert_close(flow_attention.text_to_image_maps(query, key, text, mask), full)
    keep = mask > 0  # a boolean mask, as SDPA also takes
    keep[..., 0] = True
    full = (query @ key.transpose(-1, -2) / 8 ** 0.5).masked_fill(~keep, float("-inf")).softmax(-1)[:, :, image, text]
    torch.testing.assert_close(flow_attention.text_to_image_maps(query, key, text, keep), full)
