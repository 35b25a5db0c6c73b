"""Torch dtypes by the names configs use, and the frozen weights' dtype under a Lightning precision."""

from __future__ import annotations

import torch

from utils.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_for_precision(precision: str | int | None) -> torch.dtype:
    """Compute dtype for frozen weights under a Lightning precision setting."""
    text = str(precision)
    if "bf16" in text:
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter. diffusers' ModelMixin.dtype and .device walk every submodule for
    offloading hooks first (0.7 ms a call for the 6M-parameter shapes UNet, more for larger models), a cost paid on
    every training step that asks."""
    return next(module.parameters()).dtype


def weight_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (see weight_dtype)."""
    return next(module.parameters()).device
