"""Backbone loading (layouts, dtypes, one-line errors), the tiny build, and the backbone's helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from diffusion.backbone import Conditioning, load_backbone
from diffusion.clip_tokenizer import END, START, write_clip_tokenizer
from diffusion.tiny import TINY_WORDS
from utils.errors import ConfigError, ModelLoadError


# ----- helpers ------------------------------------------------------------------------------------
def broken_copy(src: Path, dst: Path, *remove: str) -> Path:
    """Copy a model folder and delete the given relative paths (files or folders, globs allowed)."""
    shutil.copytree(src, dst)
    for pattern in remove:
        for p in dst.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def load_error(exc_type, *args, **kwargs) -> str:
    """The message of the error load_backbone raises; checked to be one line."""
    with pytest.raises(exc_type) as info:
        load_backbone(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, sdxl, prediction", [("sd", False, "epsilon"), ("sd2", False, "v_prediction"),
                                                    ("sdxl", True, "epsilon")])
def test_load_each_layout(tiny_dirs, kind, sdxl, prediction):
    """Each tiny layout loads as the right kind: 64 px, frozen, fp32, eval, DDIM with its prediction type."""
    backbone = load_backbone(str(tiny_dirs[kind]))
    assert backbone.is_sdxl is sdxl
    assert len(backbone.text_encoders) == len(backbone.tokenizers) == (2 if sdxl else 1)
    assert backbone.resolution == 64
    assert backbone.vae_scale_factor == 2
    assert backbone.dtype == torch.float32
    assert backbone.num_train_timesteps == 1000
    assert type(backbone.scheduler).__name__ == "DDIMScheduler"
    assert backbone.scheduler.config.prediction_type == prediction
    assert backbone.scheduler.config.clip_sample is False
    assert backbone.name == kind
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(m.training for m in backbone.modules())


def test_dtype_and_vae_dtype(tiny_dirs):
    """dtype casts UNet and text encoders; vae_dtype overrides the VAE's."""
    backbone = load_backbone(str(tiny_dirs["sdxl"]), dtype="bfloat16")
    assert backbone.dtype == torch.bfloat16
    assert backbone.unet.dtype == backbone.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for e in backbone.text_encoders for p in e.parameters())
    mixed = load_backbone(str(tiny_dirs["sd"]), dtype="bf16", vae_dtype="float32")
    assert mixed.unet.dtype == mixed.text_encoders[0].dtype == torch.bfloat16
    assert mixed.vae.dtype == torch.float32


def test_train_keeps_eval_mode(tiny):
    """Backbone.train() leaves every submodule in eval mode."""
    result = tiny.train()
    assert result is tiny
    assert not tiny.training
    assert not any(m.training for m in tiny.modules())


def test_prediction_type_override(tiny_dir):
    """prediction_type replaces the scheduler's."""
    backbone = load_backbone(str(tiny_dir), prediction_type="v_prediction")
    assert backbone.scheduler.config.prediction_type == "v_prediction"


def test_missing_scheduler_falls_back_to_sd_schedule(tiny_dir, tmp_path):
    """A folder without scheduler/ still loads, with the Stable Diffusion beta schedule."""
    path = broken_copy(tiny_dir, tmp_path / "m", "scheduler")
    backbone = load_backbone(str(path))
    assert backbone.scheduler.config.beta_schedule == "scaled_linear"
    assert backbone.scheduler.config.beta_end == 0.012


# ----- bad paths ----------------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    """A missing absolute path: 'does not exist'."""
    path = tmp_path / "nowhere" / "model"
    assert load_error(ModelLoadError, str(path)) == (
        f"model.path={path} does not exist; point it at a diffusers-format Stable Diffusion folder or a hub id")


def test_file_instead_of_folder(tmp_path):
    """A file: 'is a file'."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    assert load_error(ModelLoadError, str(path)) == (
        f"model.path={path} is a file; point it at a diffusers-format Stable Diffusion folder")


def test_folder_without_unet(tiny_dir, tmp_path):
    """A folder with no unet/: names the missing part."""
    path = broken_copy(tiny_dir, tmp_path / "m", "unet")
    assert load_error(ModelLoadError, str(path)) == (
        f"model.path={path} has no unet/; point it at a diffusers-format Stable Diffusion folder")


@pytest.mark.parametrize("remove", ["unet/*.safetensors", "unet/config.json", "vae/*.safetensors",
                                    "text_encoder/*.safetensors"])
def test_incomplete_component(tiny_dir, tmp_path, remove):
    """A component folder without weights or config: 'incomplete'."""
    sub = remove.split("/")[0]
    path = broken_copy(tiny_dir, tmp_path / "m", remove)
    assert load_error(ModelLoadError, str(path)) == (
        f"model.path={path} has an incomplete {sub}/ (config.json or weights missing); "
        f"point it at a complete diffusers-format Stable Diffusion folder")


def test_sdxl_kind_of_sd_folder(tiny_dir):
    """kind='sdxl' on an SD folder: 'has no text_encoder_2/'."""
    message = load_error(ModelLoadError, str(tiny_dir), kind="sdxl")
    assert message == (f"model.path={tiny_dir} has no text_encoder_2/; "
                       f"point it at a diffusers-format Stable Diffusion folder")


def test_custom_key_in_message(tmp_path):
    """The config key named in the message is the caller's."""
    message = load_error(ModelLoadError, str(tmp_path / "x"), key="teacher.path")
    assert message.startswith(f"teacher.path={tmp_path / 'x'} does not exist")


def test_unreachable_hub_id(tmp_path, monkeypatch):
    """A hub-id-like path that is not local and cannot be fetched offline is a ModelLoadError."""
    monkeypatch.chdir(tmp_path)
    message = load_error(ModelLoadError, "nobody/no-such-model")
    assert message.startswith("model.path=nobody/no-such-model is neither a local folder nor a reachable hub id (")
    assert message.endswith("download the model and point model.path at its folder")


@pytest.mark.parametrize("kwargs, message", [
    ({"path": ""}, "model.path is not set; give a diffusers-format Stable Diffusion folder or hub id"),
    ({"path": None}, "model.path is not set; give a diffusers-format Stable Diffusion folder or hub id"),
    ({"kind": "sd4"}, "model.kind='sd4' is unknown; use auto, sd, sdxl, sd3 or flux"),
    ({"build": "huge"}, "model.build='huge' is unknown; use one of ["),
    ({"dtype": "float8"}, "unknown dtype 'float8'; use one of "),
])
def test_config_errors(tiny_dir, kwargs, message):
    """Empty path, unknown kind, build or dtype are ConfigErrors with one-line messages."""
    kwargs = {"path": str(tiny_dir), **kwargs}
    text = load_error(ConfigError, **kwargs)
    assert text.startswith(message)
    if "build" in kwargs:
        assert "'tiny', 'tiny_sd2', 'tiny_sdxl'" in text and text.endswith("] or null")


# ----- the tiny build -----------------------------------------------------------------------------
def test_tiny_build_is_reproducible_and_diffusers_loadable(tmp_path):
    """build='tiny' creates the model at a missing path, identically each time, loadable by diffusers."""
    from diffusers import StableDiffusionPipeline

    a = load_backbone(str(tmp_path / "a" / "tiny"), build="tiny")
    b = load_backbone(str(tmp_path / "b" / "tiny"), build="tiny")
    assert (tmp_path / "a" / "tiny" / "unet" / "config.json").is_file()
    assert not a.is_sdxl and a.resolution == 64
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.text_encoders[0].parameters(), b.text_encoders[0].parameters()))

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "tiny"), safety_checker=None)
    assert all(torch.equal(sa[k], v) for k, v in pipe.unet.state_dict().items())
    assert pipe.tokenizer.get_vocab() == a.tokenizers[0].get_vocab()


def test_tiny_build_keeps_an_existing_folder(tiny_dir, tmp_path):
    """build='tiny' on an existing folder loads it as it is (no rebuild)."""
    path = broken_copy(tiny_dir, tmp_path / "m")
    stamp = (path / "unet" / "config.json").stat().st_mtime_ns
    backbone = load_backbone(str(path), build="tiny")
    assert (path / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert backbone.resolution == 64


# ----- conditioning -------------------------------------------------------------------------------
def cond(batch: int, value: float, sdxl: bool = False) -> Conditioning:
    if not sdxl:
        return Conditioning(torch.full((batch, 77, 32), value))
    return Conditioning(torch.full((batch, 77, 64), value), torch.full((batch, 32), value),
                        torch.full((batch, 6), value))


def test_conditioning_cat_and_len():
    """cat stacks hidden states (and pooled, time ids) along the batch."""
    c = Conditioning.cat([cond(1, 0.0, True), cond(2, 1.0, True)])
    assert len(c) == 3
    assert c.hidden_states.shape == (3, 77, 64) and c.pooled.shape == (3, 32) and c.time_ids.shape == (3, 6)
    assert c.hidden_states[:, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert c.pooled[:, 0].tolist() == [0.0, 1.0, 1.0]
    plain = Conditioning.cat([cond(1, 0.0), cond(1, 1.0)])
    assert plain.pooled is None and plain.time_ids is None and len(plain) == 2


def test_conditioning_expand():
    """expand broadcasts a batch-1 conditioning, is a no-op at the same batch, and refuses others."""
    one = cond(1, 2.0, True)
    four = one.expand(4)
    assert len(four) == 4 and four.pooled.shape == (4, 32) and four.time_ids.shape == (4, 6)
    assert torch.equal(four.hidden_states[3], one.hidden_states[0])
    two = cond(2, 0.0)
    assert two.expand(2) is two
    with pytest.raises(ValueError, match="cannot expand a conditioning of batch 2 to 3"):
        two.expand(3)


def test_unet_kwargs():
    """SD passes encoder_hidden_states only; SDXL adds text_embeds and time_ids."""
    plain = cond(1, 0.0)
    assert plain.unet_kwargs().keys() == {"encoder_hidden_states"}
    sdxl = cond(1, 0.0, True)
    kwargs = sdxl.unet_kwargs()
    assert kwargs["encoder_hidden_states"] is sdxl.hidden_states
    assert kwargs["added_cond_kwargs"]["text_embeds"] is sdxl.pooled
    assert kwargs["added_cond_kwargs"]["time_ids"] is sdxl.time_ids


def test_encode_prompt_shapes(tiny, tiny_sdxl):
    """SD: [B, 77, 32] hidden states; SDXL: both encoders' penultimate layers, pooled and size ids."""
    c = tiny.encode_prompt("a photo of a cat")
    assert c.hidden_states.shape == (1, 77, 32) and c.pooled is None
    x = tiny_sdxl.encode_prompt(["a cat", "a dog"])
    assert x.hidden_states.shape == (2, 77, 64)
    assert x.pooled.shape == (2, 32)
    assert x.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    with torch.no_grad():
        out = tiny_sdxl.predict(torch.randn(2, 4, 32, 32), 10, x)
    assert out.shape == (2, 4, 32, 32)


# ----- images -------------------------------------------------------------------------------------
def test_encode_decode_shapes_and_ranges(tiny):
    """encode_images: [B,3,64,64] -> [B,4,32,32] (seeded by the generator); decode_latents -> [0, 1]."""
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = tiny.encode_images(pixels, torch.Generator().manual_seed(1))
    b = tiny.encode_images(pixels, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 32, 32)
    assert torch.equal(a, b)
    images = tiny.decode_latents(a * 10)
    assert images.shape == (2, 3, 64, 64)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_latents_are_scaled(tiny):
    """Latents are the VAE posterior sample times scaling_factor."""
    pixels = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        raw = tiny.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(3))
    scaled = tiny.encode_images(pixels, torch.Generator().manual_seed(3))
    assert torch.allclose(scaled, raw * tiny.vae.config.scaling_factor)


def test_decode_on_bf16_vae_returns_fp32(tiny_dir):
    """decode_latents returns fp32 images even from a bf16 VAE."""
    backbone = load_backbone(str(tiny_dir), dtype="bfloat16")
    images = backbone.decode_latents(torch.zeros(1, 4, 32, 32))
    assert images.dtype == torch.float32 and images.shape == (1, 3, 64, 64)


# ----- training targets ---------------------------------------------------------------------------
def test_training_target_epsilon(tiny):
    """For epsilon models the target is the noise itself and to_epsilon is the identity."""
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert tiny.training_target(latents, noise, t) is noise
    assert tiny.to_epsilon(noise, latents, t) is noise


def test_training_target_v_prediction(tiny_dirs):
    """For v models the target is the velocity, and to_epsilon turns it back into the noise."""
    backbone = load_backbone(str(tiny_dirs["sd2"]))
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    v = backbone.training_target(latents, noise, t)
    a = backbone.alphas_cumprod()[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-5)
    x_t = backbone.add_noise(latents, noise, t)
    assert torch.allclose(backbone.to_epsilon(v, x_t, t), noise, atol=1e-4)


def test_unsupported_prediction_type(tiny_dir):
    """A sample-predicting scheduler is a ConfigError at training_target."""
    backbone = load_backbone(str(tiny_dir), prediction_type="sample")
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ConfigError, match="prediction_type 'sample' is not supported; use epsilon or v_prediction"):
        backbone.training_target(x, x, torch.tensor([1]))


# ----- the CLIP tokenizer writer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    words = ["apple", "banana", "Kiwi", "photo", "dragonfruit"]
    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(words, tmp_path_factory.mktemp("tok"))))


def test_listed_words_are_single_tokens(word_tokenizer):
    """Every listed word (lower-cased) encodes to exactly one token."""
    for word in ["apple", "banana", "kiwi", "KIWI", "photo", "dragonfruit"]:
        ids = word_tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert word_tokenizer.convert_ids_to_tokens(ids) == [word.lower() + "</w>"]


def test_special_tokens(word_tokenizer):
    """Start/end tokens are the last two ids, wrap every encoding, and pad to 77."""
    vocab = word_tokenizer.get_vocab()
    assert word_tokenizer.bos_token == START and word_tokenizer.eos_token == END
    assert word_tokenizer.pad_token == END and word_tokenizer.model_max_length == 77
    assert vocab[START] == len(vocab) - 2 and vocab[END] == len(vocab) - 1
    ids = word_tokenizer("apple banana", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:4] == [vocab[START], vocab["apple</w>"], vocab["banana</w>"], vocab[END]]
    assert set(ids[3:]) == {vocab[END]}


def test_unknown_words_fall_back_to_bytes(word_tokenizer):
    """Unlisted words (and punctuation, non-ASCII) still encode, piecewise, and decode back."""
    for text in ["zyzzyva", "café!", "apple-pie 42"]:
        ids = word_tokenizer(text, add_special_tokens=False).input_ids
        assert ids and word_tokenizer.unk_token_id not in ids
        assert word_tokenizer.decode(ids).replace(" ", "") == text.replace(" ", "")
    assert len(word_tokenizer("zyzzyva", add_special_tokens=False).input_ids) > 1


def test_tiny_tokenizer_knows_its_words(tiny):
    """The tiny model's tokenizer has every TINY_WORDS entry as one token."""
    assert all(len(tiny.tokenizers[0](w, add_special_tokens=False).input_ids) == 1 for w in TINY_WORDS)


def test_model_identity_is_portable_and_follows_the_content(tiny_dir, tmp_path):
    import shutil

    from diffusion.backbone import model_identity

    copy = shutil.copytree(tiny_dir, tmp_path / "elsewhere" / tiny_dir.name)
    here, there = model_identity("tiny", tiny_dir), model_identity("tiny", copy)
    assert here == there and here["backbone_model"] == tiny_dir.name and len(here["backbone_fingerprint"]) == 16
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 32', '"sample_size": 16'))
    assert model_identity("tiny", copy)["backbone_fingerprint"] != here["backbone_fingerprint"]
    assert model_identity("sd15", "runwayml/stable-diffusion-v1-5") == {
        "backbone": "sd15", "backbone_model": "runwayml/stable-diffusion-v1-5"}


def grad_and_block_calls(backbone, block: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor):
    """The gradient of a loss on the backbone's prediction w.r.t. the text states, and how often `block` ran."""
    calls = []  # counted as calls start: a recomputation stops once it has what the backward needs
    hook = block.register_forward_pre_hook(lambda *_: calls.append(1))
    cond = backbone.encode_prompt(["a red cat"])
    states = cond.hidden_states.clone().requires_grad_(True)
    backbone.predict(latents, t, Conditioning(states, cond.pooled, cond.time_ids)).square().mean().backward()
    hook.remove()
    return states.grad, len(calls)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_gradient_checkpointing_recomputes_unet_blocks_and_keeps_the_gradients(kind, tiny_dirs):
    from diffusion.sampling import initial_noise

    plain, checkpointed = (load_backbone(str(tiny_dirs[kind]), gradient_checkpointing=on) for on in (False, True))
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    latents = initial_noise(plain, 1, torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    # a block after the first cross-attention, so on the gradient's path to the text states
    (g0, n0), (g1, n1) = (grad_and_block_calls(b, b.unet.up_blocks[-1].resnets[0], latents, t)
                          for b in (plain, checkpointed))
    assert (n0, n1) == (1, 2)  # the backward ran the block again instead of keeping its activations
    torch.testing.assert_close(g1, g0)


def test_model_gradient_checkpointing_reaches_a_composed_module(tiny_dir, tmp_path):
    """`model.gradient_checkpointing=true` on the command line turns it on in the module's backbone (off by
    default in every conf/model file)."""
    from hydra.utils import instantiate

    from tests.helpers import compose_cfg

    for on in (False, True):
        overrides = ["method=textual_inversion", "model=tiny", f"model.path={tiny_dir}"]
        cfg = compose_cfg("train", overrides + ["model.gradient_checkpointing=true"] * on, tmp_path)
        module = instantiate(cfg.module)
        module.configure_model()
        assert module.backbone.unet.is_gradient_checkpointing == on
