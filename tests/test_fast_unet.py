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


def test_graphs_take_a_unet_that_trains_adapters_alone_and_compile_a_frozen_one(tiny, monkeypatch):
    """CUDA graphs apply to a frozen UNet and one whose trained parameters are LoRA adapters' (their gradients come
    from the graphs' backward); torch.compile only to a frozen one; a UNet that trains its own weights stays eager
    under auto and is an error for an explicit mode."""
    from diffusion.lora import add_lora

    enabled = []
    monkeypatch.setattr(FastUNet, "enable", lambda self, module, mode: enabled.append(mode))
    module = SimpleNamespace(device=torch.device("cuda"), backbone=tiny)
    add_lora(tiny.unet, 4, 1.0, "noxattn", adapter_name="slider")
    FastUNet("auto").on_train_start(None, module)
    FastUNet("cuda_graphs").on_train_start(None, module)
    assert enabled == ["cuda_graphs", "cuda_graphs"]
    with pytest.raises(ConfigError, match="trains or adapts the UNet"):
        FastUNet("default").on_train_start(None, module)
    tiny.unet.conv_in.weight.requires_grad_(True)  # the UNet's own weights train (a full fine-tune)
    auto = FastUNet("auto")
    auto.on_train_start(None, module)
    assert auto.active is None and len(enabled) == 2
    with pytest.raises(ConfigError, match="trains the UNet's own weights"):
        FastUNet("cuda_graphs").on_train_start(None, module)
    tiny.unet.conv_in.weight.requires_grad_(False)
    auto.on_train_start(None, SimpleNamespace(device=torch.device("cuda"), backbone=None))  # no UNet (flow backbones)
    assert auto.active is None and len(enabled) == 2
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


def test_sampling_graphs_capture_only_what_replays_the_same(tiny):
    """graphed_sampling captures a UNet with diffusers' processors, LAG's masks and hooks and adapters; not one
    whose hub records in Python or with an unmarked hook; and nothing on the CPU."""
    from diffusion.attention import AttentionStore
    from diffusion.cuda_graphs import graphed_sampling, replayable, replayable_hook
    from diffusion.residuals import ResidualSampler, add_residuals

    add_residuals(tiny.unet)
    assert replayable(tiny.unet)
    cat = tiny.tokenizers[0]("cat", add_special_tokens=False).input_ids
    with ResidualSampler(tiny, cat, "cat").applied(["a photo of a cat"], lag=True) as hub:
        assert replayable(tiny.unet)
        with hub.using(AttentionStore()):  # maps kept in Python lists
            assert not replayable(tiny.unet)
        assert replayable(tiny.unet)
    block = tiny.unet.down_blocks[0]
    for hook, replays in ((lambda *args: None, False), (replayable_hook(lambda *args: None), True)):
        handle = block.register_forward_hook(hook)
        assert replayable(tiny.unet) is replays
        handle.remove()
    with torch.no_grad(), graphed_sampling(tiny) as on:
        assert on is False and tiny.unet_graphs is None


def test_a_capture_that_fails_leaves_its_signature_eager(tiny, monkeypatch, caplog):
    """A UNet call that CUDA graphs cannot capture still gives the eager output, and later calls of that signature
    do not try again (the capture itself needs a GPU: here it is made to fail)."""
    import logging

    import diffusion.cuda_graphs as cuda_graphs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_graphs, "weight_device", lambda module: torch.device("cuda"))
    graphs = cuda_graphs.UNetGraphs(tiny.unet, fixed_setup=True)
    attempts = []

    def fail(samples):
        attempts.append(samples)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphs.calls, "_capture_forward", fail)
    side = tiny.unet.config.sample_size
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    t, hidden = torch.tensor([10, 500]), tiny.encode_prompt(["a cat", "a dog"]).hidden_states
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="diffusion.cuda_graphs"):
        eager = tiny.unet(x, t, encoder_hidden_states=hidden).sample
        outs = [graphs(x, t, hidden) for _ in range(2)]
    assert all(torch.equal(out, eager) for out in outs) and len(attempts) == 1
    assert "capture failed, this signature runs eager: operation not permitted" in caplog.text


def test_graphed_calls_replay_once_per_backward_and_capture_each_setup(monkeypatch):
    """A gradient graph holds one replay's activations: a second call of its signature before that replay's
    backward runs eager, and the graph replays again once the backward reached its output or the output was
    freed. A new setup() value captures its own graph. (The replays are stood in for: capturing needs a GPU.)"""
    import gc

    from diffusion.cuda_graphs import GraphedCalls

    weight = torch.tensor(3.0, requires_grad=True)
    setup = ["scale 1"]
    replays, captures = [], []

    def capture(args):
        captures.append(setup[0])

        def replay(x):
            replays.append(len(captures))
            return x * weight
        return replay

    calls = GraphedCalls(lambda x: x * weight, setup=lambda: tuple(setup))
    monkeypatch.setattr(calls, "_capture", capture)
    x = torch.ones(2, requires_grad=True)
    first = calls(x)
    second = calls(x)  # the first replay's backward is still due: eager
    assert len(replays) == 1 and torch.equal(second, first)
    (first.sum() + second.sum()).backward()
    assert torch.equal(x.grad, torch.full((2,), 6.0))
    third = calls(x)  # the backward reached the first: the graph replays
    assert len(replays) == 2
    del third
    gc.collect()
    calls(x)  # the third's output was freed without a backward: free again
    assert len(replays) == 3
    setup[0] = "scale 0.5"
    calls(x)  # the same inputs under another setup: a graph of its own
    with torch.no_grad():
        calls(x)  # without gradients: another signature
    assert captures == ["scale 1", "scale 0.5", "scale 0.5"] and len(calls.graphs) == 3


def test_each_gradient_capture_wraps_the_trained_parameters_in_a_fresh_module(monkeypatch):
    """make_graphed_callables reads a module's parameters as graph inputs (their gradients come from the backward
    graph) and replaces the module's forward with its replay, so every capture gets a module of its own. (Stood in
    for: capturing needs a GPU.)"""
    from torch import nn

    from diffusion.cuda_graphs import GraphedCalls

    modules = []

    def make_graphed_callables(module, samples, allow_unused_input):
        modules.append(module)
        original = module.forward

        def replay_only(*args):
            if len(modules) > 1 and module is not modules[-1]:
                raise RuntimeError("an earlier capture's replay inside this capture")
            return original(*args)
        module.forward = replay_only  # as make_graphed_callables does
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    weight = nn.Parameter(torch.tensor(2.0))
    calls = GraphedCalls(lambda x: x * weight, parameters=[weight])
    for size in (2, 3):  # two signatures: two captures
        calls(torch.ones(size, requires_grad=True)).sum().backward()
    assert len(modules) == 2 and modules[0] is not modules[1]
    assert all([p is weight for p in m.parameters()] == [True] for m in modules)
    assert weight.grad == 5.0  # 2 + 3 ones
