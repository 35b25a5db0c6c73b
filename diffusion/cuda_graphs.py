"""CUDA graphs of the frozen UNet: each input signature's kernels are captured once, then replayed.

At batch 1 a UNet call is bound by the CPU launching its kernels (about 2,000 for an SDXL forward),
not by the GPU running them: an eager SDXL slider step keeps the GPU busy a tenth of its wall time
(docs/benchmarks.md). A replay launches the whole forward, and for inputs that need gradients the
whole backward to them, as one graph. torch.compile's CUDA graphs do the same after minutes of
compilation; capturing takes about a second per signature.

A signature is the inputs' shapes and dtypes, whether gradients are on and which inputs need them.
The UNet's weights are frozen, so the only gradients are those of its inputs (a prompt's text
states). The graphed UNet runs in its weights' dtype with autocast off, as diffusers' pipelines
run it. Attention processors other than diffusers' own (AttentionHub records maps in Python), a UNet
whose weights have started training, and calls with cross_attention_kwargs run eager.

Sampling (`graphed_sampling`, one loop of no-grad calls) captures the UNet as it is set up for the loop:
adapters at their scales, and processors and forward hooks that declare themselves `replayable` (tensor
work that is the same on every call of the loop, such as LAG's masks). Nothing may change them inside.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from diffusion.dtypes import weight_device, weight_dtype

log = logging.getLogger(__name__)


def frozen_unet(backbone) -> nn.Module | None:
    """The backbone's UNet if graphs can replay it: frozen and not adapted (a LoRA scale is read in Python at
    capture, so a later change would not reach the replays); None otherwise, and for flow backbones."""
    unet = getattr(backbone, "unet", None)
    if unet is None or any(p.requires_grad for p in unet.parameters()) \
            or any("lora_" in name for name, _ in unet.named_parameters()):
        return None
    return unet


@contextlib.contextmanager
def graphed_unet(backbone, enabled: bool = True) -> Iterator[bool]:
    """Inside, `backbone.predict` replays CUDA graphs of the frozen UNet wherever it can (a CUDA device, a
    frozen UNet, no graphs on already); elsewhere, or with enabled=False, nothing changes. Yields whether
    graphs are on. The graphs' memory is freed on exit."""
    unet = frozen_unet(backbone) if enabled else None
    if unet is None or backbone.unet_graphs is not None or not torch.cuda.is_available() \
            or weight_device(unet).type != "cuda":
        yield getattr(backbone, "unet_graphs", None) is not None
        return
    backbone.unet_graphs = UNetGraphs(unet)
    try:
        yield True
    finally:
        backbone.unet_graphs = None


PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def replayable_hook(hook: Callable) -> Callable:
    """Mark a forward hook whose work is tensor operations that are the same on every call of a sampling loop,
    so that `graphed_sampling` may capture it with the UNet."""
    hook.replayable = True
    return hook


def replayable(unet: nn.Module) -> bool:
    """Whether a capture of the UNet's forward replays all it does now: each attention processor is diffusers'
    own or `replayable`, and so is each forward hook on its modules (a hook that records in Python is not)."""
    if not all(type(p) in PLAIN_PROCESSORS or getattr(p, "replayable", False) for p in unet.attn_processors.values()):
        return False
    return all(getattr(hook, "replayable", False) for module in unet.modules()
               for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))


MIN_CALLS = 3  # a capture costs about two eager calls: shorter loops run eager


@contextlib.contextmanager
def graphed_sampling(backbone, enabled: bool = True, calls: int | None = None) -> Iterator[bool]:
    """For one sampling loop (of `calls` UNet calls, if known): `backbone.predict` replays CUDA graphs of the UNet
    as it is set up now (adapters, replayable processors and hooks), captured at the loop's first call of each
    signature and freed on exit. Elsewhere (the CPU, gradients on, graphs already on, a compiled UNet, a processor
    or hook that is not replayable, fewer than MIN_CALLS calls, enabled=False) the calls run as they would.
    Yields whether graphs are on."""
    unet = getattr(backbone, "unet", None)
    if not enabled or unet is None or getattr(backbone, "unet_graphs", None) is not None \
            or (calls is not None and calls < MIN_CALLS) \
            or torch.is_grad_enabled() or not torch.cuda.is_available() or weight_device(unet).type != "cuda" \
            or getattr(unet, "_compiled_call_impl", None) is not None or not replayable(unet):
        yield False
        return
    backbone.unet_graphs = UNetGraphs(unet, fixed_setup=True)
    try:
        yield True
    finally:
        backbone.unet_graphs = None


class UNetGraphs:
    """`graphs(sample, timestep, encoder_hidden_states, added_cond_kwargs)` -> the UNet's output, replayed."""

    def __init__(self, unet: nn.Module, max_graphs: int = 16, fixed_setup: bool = False):
        """fixed_setup: for no-grad calls (one sampling loop) during which nothing changes the UNet's setup, so
        its processors, hooks and adapters are captured as they are (`graphed_sampling`)."""
        if not torch.cuda.is_available() or weight_device(unet).type != "cuda":
            raise RuntimeError("CUDA graphs need the UNet on a CUDA device")
        if not fixed_setup and any(p.requires_grad for p in unet.parameters()):
            raise RuntimeError("CUDA graphs replay a frozen UNet; this one has trained parameters")
        self.unet, self.max_graphs, self.fixed_setup = unet, max_graphs, fixed_setup
        self.graphs: dict[tuple, Callable | None] = {}  # each with its own memory pool; None: runs eager

    def _forward(self, sample, timestep, hidden_states, *added):
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        with torch.autocast("cuda", enabled=False):
            return self.unet(sample, timestep, encoder_hidden_states=hidden_states, **kwargs).sample

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None) -> torch.Tensor:
        if not self.replays_this_call():
            return self.unet(sample.to(weight_dtype(self.unet)), timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs).sample
        dtype = weight_dtype(self.unet)
        args = [sample.to(dtype), timestep.expand(sample.shape[0]), encoder_hidden_states.to(dtype)]
        if added_cond_kwargs:
            args += [added_cond_kwargs["text_embeds"].to(dtype), added_cond_kwargs["time_ids"].to(dtype)]
        grad = torch.is_grad_enabled()
        key = (grad, tuple((tuple(a.shape), a.dtype, grad and a.requires_grad) for a in args))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                log.warning("UNet graphs: %d signatures captured already; this call runs eager", self.max_graphs)
                return self._forward(*args)
            self.graphs[key] = self._capture(args)
        graphed = self.graphs[key]
        if graphed is None:  # its capture failed: this signature runs eager
            return self._forward(*args)
        with torch.autocast("cuda", enabled=False):
            out = graphed(*args)
        return out.clone()  # the graph's output buffer is overwritten by its next replay

    def replays_this_call(self) -> bool:
        if self.fixed_setup:
            return not torch.is_grad_enabled()
        return all(type(p) in PLAIN_PROCESSORS for p in self.unet.attn_processors.values()) \
            and not any(p.requires_grad for p in self.unet.parameters())

    def _capture(self, args: list[torch.Tensor]) -> Callable | None:
        # static copies with the same autograd needs: the graph reads its inputs from them
        samples = tuple(a.detach().clone().requires_grad_(torch.is_grad_enabled() and a.requires_grad) for a in args)
        if torch.is_grad_enabled():
            with torch.autocast("cuda", enabled=False):
                graphed = torch.cuda.make_graphed_callables(self._forward, samples, allow_unused_input=True)
        else:
            try:
                graphed = self._capture_forward(samples)
            except RuntimeError as error:  # something in the call cannot be captured: the outputs stay right, eager
                log.warning("UNet graph capture failed, this signature runs eager: %s", str(error).splitlines()[0])
                return None
        log.log(logging.DEBUG if self.fixed_setup else logging.INFO, "UNet graph %d captured: %s",
                len(self.graphs) + 1, ", ".join(f"{tuple(a.shape)}{'*' if a.requires_grad else ''}" for a in samples))
        return graphed

    def _capture_forward(self, samples: tuple[torch.Tensor, ...]) -> Callable:
        """A no-grad call: one warm-up on a side stream (lazy set-up, controllers' caches), then the forward
        alone is captured; replays copy their inputs into `samples` and return the graph's output tensor."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(*samples)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(*samples)

        def replay(*inputs: torch.Tensor) -> torch.Tensor:
            for static, value in zip(samples, inputs):
                static.copy_(value)
            graph.replay()
            return out
        return replay
