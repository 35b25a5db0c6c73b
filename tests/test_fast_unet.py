"""The fast-UNet switch refuses what it cannot speed up (the GPU tests check the replay itself)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks.fast_unet import FastUNet
from utils.errors import ConfigError


def test_unknown_mode_is_an_error_naming_the_choices():
    with pytest.raises(ConfigError, match="fast_unet.mode='graphs'.*cuda_graphs"):
        FastUNet("graphs")


def test_needs_a_gpu(tiny):
    module = SimpleNamespace(device=torch.device("cpu"), backbone=tiny)
    with pytest.raises(ConfigError, match="needs a GPU"):
        FastUNet("cuda_graphs").on_train_start(None, module)
    FastUNet(None).on_train_start(None, module)  # off: nothing to check
    auto = FastUNet()  # the default: the fast path where it applies, eager elsewhere without an error
    auto.on_train_start(None, module)
    assert auto.mode == "auto" and auto.active is None and tiny.unet_graphs is None


def test_refuses_a_trained_or_adapted_unet(tiny):
    from diffusion.lora import add_lora

    module = SimpleNamespace(device=torch.device("cuda"), backbone=tiny)
    add_lora(tiny.unet, 4, 1.0, "noxattn", adapter_name="slider")
    with pytest.raises(ConfigError, match="trains or adapts the UNet"):
        FastUNet("cuda_graphs").on_train_start(None, module)
    auto = FastUNet("auto")
    auto.on_train_start(None, module)  # a LoRA-adapted UNet: eager, no error
    assert auto.active is None and tiny.unet_graphs is None
    auto.on_train_start(None, SimpleNamespace(device=torch.device("cuda"), backbone=None))  # no UNet (flow backbones)
    assert auto.active is None
    with pytest.raises(ConfigError, match="no frozen backbone"):
        FastUNet("default").on_train_start(None, SimpleNamespace(device=torch.device("cuda"), backbone=None))


def test_the_graphs_need_a_cuda_unet(tiny):
    from diffusion.cuda_graphs import UNetGraphs

    with pytest.raises(RuntimeError, match="CUDA device"):
        UNetGraphs(tiny.unet)


def test_graphed_unet_leaves_a_cpu_or_adapted_unet_eager(tiny):
    from diffusion.cuda_graphs import frozen_unet, graphed_unet
    from diffusion.lora import add_lora

    with graphed_unet(tiny) as on:  # a CPU UNet: nothing to replay
        assert on is False and tiny.unet_graphs is None
    assert frozen_unet(tiny) is tiny.unet
    add_lora(tiny.unet, 4, 1.0, "noxattn", adapter_name="slider")
    assert frozen_unet(tiny) is None and frozen_unet(SimpleNamespace()) is None  # adapted; no UNet (flow)
