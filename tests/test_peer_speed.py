"""The plain diffusers textual-inversion loop that benchmarks/peer_speed.py times against train.py."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peer_speed import TOKEN, load_plain, plain_step_fn  # noqa: E402


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_plain_loop_trains_only_the_new_token(tiny_dirs, name):
    parts = load_plain(str(tiny_dirs[name]), "cpu", torch.float32)
    sdxl, tokenizers, encoders = parts[:3]
    assert sdxl == (name == "sdxl")
    step = plain_step_fn(parts, torch.rand(2, 3, 64, 64) * 2 - 1, 64, "cpu", torch.float32)
    before = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    losses = [float(step()) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for tokenizer, encoder, rows in zip(tokenizers, encoders, before):
        changed = (encoder.get_input_embeddings().weight != rows).any(1).nonzero().flatten().tolist()
        assert changed == [tokenizer.convert_tokens_to_ids(TOKEN)]
