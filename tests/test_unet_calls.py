"""benchmarks/unet_calls.py: the merged call trains what the separate trained call trains, and every call is timed."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from unet_calls import calls, time_calls  # noqa: E402


def test_the_merged_call_gives_the_trained_call_its_gradient_and_every_call_is_timed(tiny_sdxl):
    torch.manual_seed(0)
    by_name = calls(tiny_sdxl, 8)
    separate, merged = by_name["t1"](), by_name["j4"]()
    assert separate.shape == merged.shape and separate.abs().sum() > 0
    torch.testing.assert_close(merged, separate, rtol=1e-4, atol=1e-6)  # rows of a batch never mix in the UNet
    timed = time_calls(tiny_sdxl, 8, repeats=1)
    assert list(timed) == ["nchw", "channels_last"]
    assert all(list(ms) == ["f1", "f3", "t1", "j4"] and min(ms.values()) > 0 for ms in timed.values())
