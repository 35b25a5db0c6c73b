"""CLIP-T, CLIP-I, DINO similarity and structure distance on tiny random backbones saved to local folders:
the same numbers as the transformers models fed by hand, known answers, masks, errors, DDP and bf16."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import (CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model, ViTConfig,
                          ViTModel)

from diffusion.clip_tokenizer import write_clip_tokenizer
from metrics.clip import CLIPEncoder, CLIPImageSimilarity, CLIPTextScore
from metrics.dino import DINOSimilarity, StructureDistance, ViTEncoder
from utils.errors import ConfigError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WORDS = ["a", "photo", "of", "red", "blue", "green", "cat", "dog", "square", "circle"]
PROMPTS = ["a red cat", "a photo of a blue dog", "green square", "a circle " * 12]  # the last one is truncated


def build_backbones(root: Path) -> dict[str, Path]:
    """Tiny random CLIP (with its tokenizer), DINO ViT and DINOv2 folders. Weights are drawn wider than the
    defaults so different images get clearly different embeddings."""
    torch.manual_seed(0)
    clip = write_clip_tokenizer(WORDS, root / "clip")
    tok = CLIPTokenizer.from_pretrained(clip)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, initializer_factor=10.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, initializer_factor=10.0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                         initializer_factor=10.0)).save_pretrained(clip)
    vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    ViTModel(ViTConfig(**vit, intermediate_size=64, initializer_range=0.2),
             add_pooling_layer=False).save_pretrained(root / "vit")
    Dinov2Model(Dinov2Config(**vit, mlp_ratio=2, initializer_range=0.2)).save_pretrained(root / "dinov2")
    return {"clip": clip, "vit": root / "vit", "dinov2": root / "dinov2"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_backbones(tmp_path_factory.mktemp("clip_dino"))


def images(n: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> torch.Tensor:
    """Random [0, 1] images with a bright square, so shifts and recolourings move real structure."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.rand(n, 3, *size, generator=g)
    x[:, :, 8:24, 10:30] += 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    return x


def processed(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The processor's steps written out for 40x48 (or 48x40) images: the short side to 32 with bicubic
    antialiased resampling (the long side to int(32 * 48 / 40) = 38), the centre 32x32, then mean and std."""
    if x.shape[-2:] == (40, 48):
        x = F.interpolate(x, size=(32, 38), mode="bicubic", antialias=True).clamp(0, 1)[..., :, 3:35]
    else:
        assert x.shape[-2:] == (48, 40)
        x = F.interpolate(x, size=(38, 32), mode="bicubic", antialias=True).clamp(0, 1)[..., 3:35, :]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def projected(out) -> torch.Tensor:
    """get_*_features gives a tensor (transformers 4) or an output holding it as pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_by_hand(folder: Path, x: torch.Tensor, prompts: list[str] | None = None,
                 references: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    model, tok = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    with torch.no_grad():
        a = F.normalize(projected(model.get_image_features(pixel_values=processed(x, CLIP_MEAN, CLIP_STD))), dim=-1)
        if prompts is not None:
            t = tok(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
            b = projected(model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask))
        else:
            b = projected(model.get_image_features(pixel_values=processed(references, CLIP_MEAN, CLIP_STD)))
    return a, F.normalize(b, dim=-1)


def vit_by_hand(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS after the final layernorm, and the last layer's keys recomputed from its input hidden states."""
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    layer = (model.layers if hasattr(model, "layers") else model.encoder.layer)[-1]
    key = layer.attention.k_proj if hasattr(layer.attention, "k_proj") else layer.attention.attention.key
    with torch.no_grad():
        out = model(pixel_values=processed(x, IMAGENET_MEAN, IMAGENET_STD), output_hidden_states=True)
        keys = key(layer.layernorm_before(out.hidden_states[-2]))
    return out.last_hidden_state[:, 0], keys


# ----- CLIP ------------------------------------------------------------------------------------------
def test_clip_text_score_matches_transformers(dirs):
    x = images(4)
    a, b = clip_by_hand(dirs["clip"], x, PROMPTS)
    expected = 100 * (a * b).sum(-1).clamp(min=0)
    metric = CLIPTextScore(dirs["clip"])
    assert metric.encoder.max_length == 16  # the tokenizer's 77 capped by the text model's positions
    assert torch.allclose(metric.scores(x, PROMPTS), expected, atol=1e-5, rtol=0)
    metric.update(x[:3], PROMPTS[:3])
    metric.update(x[3:], PROMPTS[3:])
    assert metric.compute().item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert metric.compute().dtype == torch.float32
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.update(x, PROMPTS[:2])


def test_clip_text_score_clips_negative_cosines_at_zero(dirs):
    """Negating the text projection flips every cosine's sign: each pair then scores 0 under one of the two
    models and 100 * |cos| under the other."""
    x = images(4)
    metric = CLIPTextScore(dirs["clip"])
    a, b = metric.encoder.embed_images(x), metric.encoder.embed_texts(PROMPTS)
    cos = (a * b).sum(-1)
    scores = metric.scores(x, PROMPTS)
    metric.encoder.model.text_projection.weight.neg_()
    flipped = metric.scores(x, PROMPTS)
    assert torch.allclose(scores, 100 * cos.clamp(min=0), atol=1e-5, rtol=0)
    assert bool(((scores == 0) | (flipped == 0)).all()) and bool((scores == 0).any() or (flipped == 0).any())
    assert torch.allclose(scores + flipped, 100 * cos.abs(), atol=1e-5, rtol=0)
    assert bool((scores >= 0).all() and (flipped >= 0).all())


def assert_paired_known_answers(paired, x: torch.Tensor, refs: torch.Tensor) -> None:
    """A paired similarity: 1 for identical images, lower for inverted or shifted ones, and one reference
    per image required."""
    same = paired.scores(x, x)
    assert torch.allclose(same, torch.ones(len(x)), atol=1e-5, rtol=0)
    assert bool((paired.scores(x, 1 - x) < same - 1e-3).all())
    assert bool((paired.scores(x, torch.roll(x, 8, dims=-1)) < same - 1e-3).all())
    with pytest.raises(ValueError, match="one reference per image"):
        paired.update(x, refs)


def test_clip_image_similarity_matches_transformers_and_known_answers(dirs):
    x, refs = images(3), images(5, size=(48, 40), seed=1)
    a, b = clip_by_hand(dirs["clip"], x, references=refs)
    metric = CLIPImageSimilarity(dirs["clip"])
    assert torch.allclose(metric.scores(x, refs), (a @ b.T).mean(-1), atol=1e-5, rtol=0)
    metric.update(x[:1], refs)
    metric.update(x[1:], refs)
    assert metric.compute().item() == pytest.approx((a @ b.T).mean().item(), abs=1e-5)

    assert_paired_known_answers(CLIPImageSimilarity(dirs["clip"], paired=True), x, refs)


# ----- DINO ------------------------------------------------------------------------------------------
def test_dino_similarity_matches_transformers_and_known_answers(dirs):
    x, refs = images(3), images(5, size=(48, 40), seed=1)
    a, _ = vit_by_hand(dirs["vit"], x)
    b, _ = vit_by_hand(dirs["vit"], refs)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    metric = DINOSimilarity(dirs["vit"])
    assert torch.allclose(metric.encoder.cls(x), vit_by_hand(dirs["vit"], x)[0], atol=1e-5, rtol=0)
    metric.update(x, refs)
    assert metric.compute().item() == pytest.approx((a @ b.T).mean().item(), abs=1e-5)

    assert_paired_known_answers(DINOSimilarity(dirs["vit"], paired=True), x, refs)


def test_dino_masks_black_out_the_background(dirs):
    x, refs = images(3), images(4, seed=1)
    masks = torch.zeros(3, 1, 40, 48)
    masks[:, :, 6:26, 8:32] = 1
    ref_masks = torch.zeros(4, 40, 48)  # [R,H,W] is accepted too
    ref_masks[:, 4:30, 10:40] = 1
    metric = DINOSimilarity(dirs["vit"])
    masked = metric.scores(x, refs, masks, ref_masks)
    assert torch.equal(masked, metric.scores(x * masks, refs * ref_masks[:, None]))
    other = torch.where(masks.bool(), x, torch.rand_like(x))  # a new background, the same object
    assert torch.equal(metric.scores(other, refs, masks, ref_masks), masked)
    assert not torch.allclose(metric.scores(other, refs), metric.scores(x, refs))  # unmasked, it counts
    small = masks[:, :, ::2, ::2]  # masks at another resolution are resized to the images
    assert torch.equal(metric.scores(x, refs, small, ref_masks), masked)
    with pytest.raises(ValueError, match="do not match images"):
        metric.update(x, refs, masks[:2])


def test_dinov2_folders_load(dirs):
    x = images(2)
    sim, dist_ = DINOSimilarity(dirs["dinov2"], paired=True), StructureDistance(dirs["dinov2"])
    assert type(sim.encoder.model).__name__ == "Dinov2Model"
    assert torch.allclose(sim.scores(x, x), torch.ones(2), atol=1e-5, rtol=0)
    assert sim.encoder.last_layer_keys(x).shape == (2, 1 + 16, 32)
    assert dist_.scores(x, x).abs().max().item() < 1e-10 and bool((dist_.scores(x, x.roll(8, -1)) > 0).all())


def test_structure_distance_matches_a_hand_computation(dirs):
    x = images(3)
    y = torch.roll(x, 8, dims=-1)
    metric = StructureDistance(dirs["vit"])
    keys = metric.encoder.last_layer_keys(x)
    _, hand_keys = vit_by_hand(dirs["vit"], x)
    assert keys.shape == (3, 1 + 16, 32) and torch.allclose(keys, hand_keys, atol=1e-5, rtol=0)

    def self_sim(k: torch.Tensor) -> torch.Tensor:
        k = k / k.norm(dim=-1, keepdim=True)
        return k @ k.transpose(1, 2)

    ky = vit_by_hand(dirs["vit"], y)[1]
    expected = torch.stack([F.mse_loss(self_sim(hand_keys)[i], self_sim(ky)[i]) for i in range(3)])
    assert torch.allclose(metric.scores(x, y), expected, atol=1e-6, rtol=0) and bool((expected > 0).all())
    metric.update(x, y)
    assert metric.compute().item() == pytest.approx(expected.mean().item(), abs=1e-6)
    metric.reset()
    metric.update(x, x)
    assert metric.compute().item() < 1e-10
    assert StructureDistance.higher_is_better is False
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(x, x[:2])


# ----- loading, devices, dtypes ----------------------------------------------------------------------
@pytest.mark.parametrize("cls,key", [(CLIPTextScore, "metrics.clip.path"), (CLIPImageSimilarity, "metrics.clip.path"),
                                     (DINOSimilarity, "metrics.dino.path"), (StructureDistance, "metrics.dino.path")])
def test_missing_paths_raise_config_errors_naming_the_key(cls, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key} is not set; give a local"):
        cls()
    with pytest.raises(ConfigError, match=rf"^{key}=.*nope does not exist; give a local"):
        cls(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^eval\.backbone=.*nope does not exist"):
        cls(tmp_path / "nope", key="eval.backbone")


def test_folders_of_the_wrong_model_raise_config_errors(dirs, tmp_path):
    """transformers would build these with random weights and only warn; here they are refused."""
    with pytest.raises(ConfigError, match=r"metrics\.clip\.path=.*vit holds a 'vit' model, not a CLIP model"):
        CLIPEncoder(dirs["vit"])
    with pytest.raises(ConfigError, match=r"metrics\.dino\.path=.*clip holds a CLIPModel"):
        ViTEncoder(dirs["clip"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"metrics\.dino\.path=.*empty is not a loadable ViT"):
        ViTEncoder(tmp_path / "empty")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64), add_pooling_layer=False).config.save_pretrained(tmp_path / "deeper")
    for f in dirs["vit"].glob("*.safetensors"):  # a 3-layer config over 2-layer weights
        shutil.copy(f, tmp_path / "deeper")
    with pytest.raises(ConfigError, match=r"metrics\.dino\.path=.*deeper lacks \d+ of the ViT's weights"):
        ViTEncoder(tmp_path / "deeper")
    no_tokenizer = shutil.copytree(dirs["clip"], tmp_path / "clip", ignore=shutil.ignore_patterns("vocab.json"))
    with pytest.raises(ConfigError, match=r"metrics\.clip\.path=.*clip has no loadable CLIP tokenizer"):
        CLIPEncoder(no_tokenizer)


def test_a_transformers_4_layout_dino_checkpoint_loads(dirs, tmp_path):
    """Published DINO checkpoints use the 4.x names (encoder.layer.N.attention.attention.key, ...) and carry
    a pooler; they load with every weight in place and give the same CLS."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(dirs["vit"], tmp_path / "old", ignore=shutil.ignore_patterns("*.safetensors"))
    state = {}
    for f in dirs["vit"].glob("*.safetensors"):
        state.update(load_file(f))
    renames = {"layers.": "encoder.layer.", "attention.q_proj": "attention.attention.query",
               "attention.k_proj": "attention.attention.key", "attention.v_proj": "attention.attention.value",
               "attention.o_proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    old = {}
    for name, value in state.items():
        for new, was in renames.items():
            name = name.replace(new, was)
        old[name] = value.contiguous()
    old.update({"pooler.dense.weight": torch.zeros(32, 32), "pooler.dense.bias": torch.zeros(32)})
    save_file(old, folder / "model.safetensors", metadata={"format": "pt"})
    x = images(2)
    assert torch.allclose(ViTEncoder(folder).cls(x), ViTEncoder(dirs["vit"]).cls(x), atol=1e-6, rtol=0)


def test_preprocessor_config_is_followed(dirs, tmp_path):
    folder = shutil.copytree(dirs["vit"], tmp_path / "vit")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "image_mean": mean,
         "image_std": std}))
    encoder = ViTEncoder(folder)
    assert (encoder.resize, encoder.crop) == (40, 32)
    x = images(2, size=(80, 96))
    by_hand = F.interpolate(x, size=(40, 48), mode="bicubic", antialias=True).clamp(0, 1)[..., 4:36, 8:40]
    by_hand = (by_hand - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(encoder.pixel_values(x), by_hand, atol=1e-6, rtol=0)
    assert (CLIPEncoder(dirs["clip"]).resize, ViTEncoder(dirs["vit"]).resize) == (32, 32)  # no file: model size


def test_backbones_stay_frozen_move_with_to_and_run_in_bf16(dirs):
    x, refs = images(2), images(3, seed=1)
    metrics = {"clip_t": CLIPTextScore(dirs["clip"]), "clip_i": CLIPImageSimilarity(dirs["clip"]),
               "dino": DINOSimilarity(dirs["vit"]), "structure": StructureDistance(dirs["vit"])}
    args = {"clip_t": (x, PROMPTS[:2]), "clip_i": (x, refs), "dino": (x, refs), "structure": (x, x.roll(4, -1))}
    fp32 = {name: m.scores(*args[name]) for name, m in metrics.items()}
    for name, metric in metrics.items():
        metric.train()
        assert not metric.encoder.training and not any(p.requires_grad for p in metric.encoder.parameters())
        metric.to(torch.float64)  # .to() reaches the backbone, which then computes in its own dtype
        assert next(metric.encoder.parameters()).dtype == torch.float64
        scores = metric.scores(*args[name])
        assert scores.dtype == torch.float32 and torch.allclose(scores, fp32[name], atol=1e-4, rtol=0), name
        metric.to(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = metric.scores(*args[name])
            metric.update(*args[name])
        value = metric.compute()
        assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all()), name
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        tolerance = {"clip_t": 10.0, "structure": 0.05}.get(name, 0.1)  # bf16 is coarse
        assert torch.allclose(scores, fp32[name], atol=tolerance, rtol=0), name
        metric.encoder.to(torch.bfloat16)  # a bf16 backbone: inputs follow its dtype, outputs stay float32
        scores = metric.scores(*args[name])
        assert scores.dtype == torch.float32 and torch.allclose(scores, fp32[name], atol=tolerance, rtol=0), name


# ----- DDP -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update(rank: int, world: int, clip_t: CLIPTextScore, dino: DINOSimilarity) -> None:
    x, refs = images(5), images(3, seed=1)
    prompts = (PROMPTS * 2)[:5]
    mine = list(range(rank, 5, world))
    clip_t.update(x[mine], [prompts[i] for i in mine])
    dino.update(x[mine], refs)


def _ddp_worker(rank: int, world: int, port: int, dirs: dict[str, Path], results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        clip_t, dino = CLIPTextScore(dirs["clip"]), DINOSimilarity(dirs["vit"])
        _update(rank, world, clip_t, dino)
        results[rank] = {"clip_t": clip_t.compute().item(), "dino": dino.compute().item()}  # gathers every rank
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(dirs):
    clip_t, dino = CLIPTextScore(dirs["clip"]), DINOSimilarity(dirs["vit"])
    _update(0, 1, clip_t, dino)
    expected = {"clip_t": clip_t.compute().item(), "dino": dino.compute().item()}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), dirs, results), nprocs=2, join=True)
        ranks = [dict(results[r]) for r in range(2)]
    for got in ranks:
        assert got == pytest.approx(expected, abs=1e-5)
    assert expected["clip_t"] > 0
