"""CUDA graphs of the UNet: each input signature's kernels are captured once, then replayed.

At batch 1 a UNet call is bound by the CPU launching its kernels (about 2,000 for an SDXL forward),
not by the GPU running them: an eager SDXL slider step keeps the GPU busy a tenth of its wall time
(docs/benchmarks.md). A replay launches the whole forward, and for inputs that need gradients the
whole backward to them, as one graph. torch.compile's CUDA graphs do the same after minutes of
compilation; capturing takes about a second per signature.

A signature is the inputs' shapes and dtypes, whether gradients are on and which inputs need them.
The UNet's own weights are frozen, so the gradients are those of its inputs (a prompt's text states)
and of LoRA adapters where they train (personalized residuals), with one graph per adapter set-up. The
graphed UNet runs in its weights' dtype with autocast off, as diffusers' pipelines run it. Attention
processors other than diffusers' own (AttentionHub records maps in Python), a UNet whose own weights
train, and calls with cross_attention_kwargs run eager.

Sampling (`graphed_sampling`, one loop of no-grad calls) captures the UNet as it is set up for the loop:
adapters at their scales, and processors and forward hooks that declare themselves `replayable` (tensor
work that is the same on every call of the loop, such as LAG's masks). Nothing may change them inside.

Both run on `GraphedCalls`, which graphs any function of tensors whose tensor work is the same on every call:
StyleDiffusion's conditional branch through its attention hub (diffusion/style_inversion.py's `ValueBranch`)
returns the maps its loss reads as outputs of the graph instead of Python records.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
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


def on_cuda_uncompiled(unet: nn.Module | None) -> bool:
    """Whether a UNet is on a CUDA device and not compiled (torch.compile brings its own graphs)."""
    return unet is not None and torch.cuda.is_available() and weight_device(unet).type == "cuda" \
        and getattr(unet, "_compiled_call_impl", None) is None


def graphs_available(backbone) -> bool:
    """Whether CUDA graphs can replay the backbone's UNet: frozen, not adapted, not compiled, on a CUDA device."""
    return on_cuda_uncompiled(frozen_unet(backbone))


@contextlib.contextmanager
def graphed_unet(backbone, enabled: bool = True) -> Iterator[bool]:
    """Inside, `backbone.predict` replays CUDA graphs of the frozen UNet wherever it can (a CUDA device, a
    frozen UNet, no graphs on already); elsewhere, or with enabled=False, nothing changes. Yields whether
    graphs are on. The graphs' memory is freed on exit."""
    if not enabled or not graphs_available(backbone) or backbone.unet_graphs is not None:
        yield getattr(backbone, "unet_graphs", None) is not None
        return
    backbone.unet_graphs = UNetGraphs(backbone.unet)
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
    if not enabled or not on_cuda_uncompiled(unet) or getattr(backbone, "unet_graphs", None) is not None \
            or (calls is not None and calls < MIN_CALLS) or torch.is_grad_enabled() or not replayable(unet):
        yield False
        return
    backbone.unet_graphs = UNetGraphs(unet, fixed_setup=True)
    try:
        yield True
    finally:
        backbone.unet_graphs = None


class TrainedParameters(nn.Module):
    """A function of tensors as a module whose parameters are the given trained ones: a graph of it
    (`make_graphed_callables` reads a module's parameters as inputs) returns their gradients too."""

    def __init__(self, fn: Callable, params: list[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(params)
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


class GraphedCalls:
    """`calls(*tensors)` -> fn(*tensors) (a tensor or a tuple of tensors), replayed from CUDA graphs.

    One graph per input signature (shapes, dtypes, whether gradients are on and which inputs need them), captured
    at its first call: with gradients on, the forward and the backward to the inputs that need them
    (`torch.cuda.make_graphed_callables`); with them off, the forward alone. fn must do the same tensor work on
    every call; its Python side effects happen only at capture. `parameters`: trained parameters fn reads, whose
    gradients the backward graphs then give too; setup() (if given) names what else the work depends on, read in
    Python at capture (adapter scales): a new setup captures a new graph. A no-grad capture that fails leaves its
    signature eager. Replays return copies: the graphs' output buffers are overwritten by their next replay.

    A gradient graph keeps the forward's activations in its own memory for its backward, so a second call of a
    signature before the backward of the first runs eager (two losses of one step on equal batches).
    """

    def __init__(self, fn: Callable, max_graphs: int = 16, name: str = "graph", log_level: int = logging.INFO,
                 setup: Callable[[], tuple] | None = None, parameters: list[nn.Parameter] | None = None):
        self.fn, self.max_graphs, self.name, self.log_level, self.setup = fn, max_graphs, name, log_level, setup
        self.parameters = list(parameters or [])
        self.graphs: dict[tuple, Callable | None] = {}  # each with its own memory pool; None: runs eager
        self.awaiting_backward: dict[tuple, object] = {}  # gradient graph -> the replay whose backward is pending

    def __call__(self, *args: torch.Tensor):
        grad = torch.is_grad_enabled()
        key = (grad, tuple((tuple(a.shape), a.dtype, grad and a.requires_grad) for a in args),
               None if self.setup is None else self.setup())
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                log.warning("%s: %d signatures captured already; this call runs eager", self.name, self.max_graphs)
                return self._eager(*args)
            self.graphs[key] = self._capture(args)
        graphed = self.graphs[key]
        if graphed is None or key in self.awaiting_backward:  # capture failed, or the last replay's backward is due
            return self._eager(*args)
        with torch.autocast("cuda", enabled=False):
            out = graphed(*args)
        outs = (out.clone(),) if torch.is_tensor(out) else tuple(o.clone() for o in out)
        if grad:
            self._await_backward(key, [o for o in outs if o.requires_grad])
        return outs[0] if torch.is_tensor(out) else outs

    def _await_backward(self, key: tuple, outputs: list[torch.Tensor]) -> None:
        """Mark the graph busy until the backward reaches one of this replay's outputs, or all of them are freed."""
        if not outputs:
            return
        replay, alive = object(), [len(outputs)]
        self.awaiting_backward[key] = replay

        def release() -> None:
            if self.awaiting_backward.get(key) is replay:
                del self.awaiting_backward[key]

        def freed() -> None:
            alive[0] -= 1
            if not alive[0]:
                release()

        for out in outputs:
            out.register_hook(lambda grad: release())
            weakref.finalize(out, freed)

    def _eager(self, *args: torch.Tensor):
        with torch.autocast("cuda", enabled=False):
            return self.fn(*args)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> Callable | None:
        # static copies with the same autograd needs: the graph reads its inputs from them
        samples = tuple(a.detach().clone().requires_grad_(torch.is_grad_enabled() and a.requires_grad) for a in args)
        if torch.is_grad_enabled():
            # a fresh module per capture: make_graphed_callables replaces a module's forward with its replay
            fn = TrainedParameters(self.fn, self.parameters) if self.parameters else self.fn
            with torch.autocast("cuda", enabled=False):
                graphed = torch.cuda.make_graphed_callables(fn, samples, allow_unused_input=True)
        else:
            try:
                graphed = self._capture_forward(samples)
            except RuntimeError as error:  # something in the call cannot be captured: the outputs stay right, eager
                log.warning("%s capture failed, this signature runs eager: %s", self.name,
                            str(error).splitlines()[0])
                return None
        log.log(self.log_level, "%s %d captured: %s", self.name, len(self.graphs) + 1,
                ", ".join(f"{tuple(a.shape)}{'*' if a.requires_grad else ''}" for a in samples))
        return graphed

    def _capture_forward(self, samples: tuple[torch.Tensor, ...]) -> Callable:
        """A no-grad call: one warm-up on a side stream (lazy set-up, controllers' caches), then the forward
        alone is captured; replays copy their inputs into `samples` and return the graph's output tensors."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager(*samples)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(*samples)

        def replay(*inputs: torch.Tensor):
            for static, value in zip(samples, inputs):
                static.copy_(value)
            graph.replay()
            return out
        return replay


def adapters_train_alone(unet: nn.Module | None) -> bool:
    """Whether a UNet's parameters that train, if any, are all adapters' (LoRA): what training graphs
    (`UNetGraphs`) replay, with the adapters' gradients. False for no UNet (flow backbones)."""
    return unet is not None and all("lora_" in name for name, p in unet.named_parameters() if p.requires_grad)


def adapter_setup(layers: list[nn.Module]) -> tuple:
    """What adapter layers read in Python on each call: which adapters are on and at what scale."""
    return tuple((m.disable_adapters, tuple(m.active_adapters), tuple(sorted(getattr(m, "scaling", {}).items())))
                 for m in layers)


class UNetGraphs:
    """`graphs(sample, timestep, encoder_hidden_states, added_cond_kwargs)` -> the UNet's output, replayed.

    During training (not fixed_setup) the UNet may train adapters (LoRA: personalized residuals): calls with
    gradients on then replay graphs whose backward also gives the adapters' gradients, one per adapter set-up
    (scales, on or off); the UNet's calls without gradients (a sample grid at other strengths) run eager.
    """

    def __init__(self, unet: nn.Module, max_graphs: int = 16, fixed_setup: bool = False):
        """fixed_setup: for no-grad calls (one sampling loop) during which nothing changes the UNet's setup, so
        its processors, hooks and adapters are captured as they are (`graphed_sampling`)."""
        if not torch.cuda.is_available() or weight_device(unet).type != "cuda":
            raise RuntimeError("CUDA graphs need the UNet on a CUDA device")
        trained = [p for p in unet.parameters() if p.requires_grad]
        if not fixed_setup and not adapters_train_alone(unet):
            raise RuntimeError("CUDA graphs replay a UNet whose trained parameters, if any, are LoRA adapters'; "
                               "this one trains its own weights")
        self.unet, self.fixed_setup, self.trains = unet, fixed_setup, bool(trained) and not fixed_setup
        self.trained_ids = [id(p) for p in trained]
        # set when the backbone loads; diffusers' property walks every module, too slow to ask on each call
        self.checkpointing = getattr(unet, "is_gradient_checkpointing", False)
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapters = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        setup = (lambda: adapter_setup(adapters)) if adapters and not fixed_setup else None
        level = logging.DEBUG if fixed_setup else logging.INFO
        self.calls = GraphedCalls(self._forward, max_graphs, "UNet graph", level, setup,
                                  trained if self.trains else None)

    @property
    def graphs(self) -> dict:
        return self.calls.graphs

    def _forward(self, sample, timestep, hidden_states, *added):
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
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
        return self.calls(*args)

    def replays_this_call(self) -> bool:
        if self.fixed_setup:
            return not torch.is_grad_enabled()
        if self.trains and not torch.is_grad_enabled():
            return False
        if torch.is_grad_enabled() and self.checkpointing:
            return False  # the backward recomputes blocks (and restores RNG state), which a capture cannot hold
        return all(type(p) in PLAIN_PROCESSORS for p in self.unet.attn_processors.values()) \
            and [id(p) for p in self.unet.parameters() if p.requires_grad] == self.trained_ids  # what the graphs train
