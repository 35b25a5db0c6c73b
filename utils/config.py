"""OmegaConf resolvers the configs use, and instantiation helpers."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def auto_precision() -> str:
    """bf16 autocast on a GPU, fp32 on the CPU."""
    import torch
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("sum"):  # ${sum:${a},${b}}: a run's length from its stages
        OmegaConf.register_new_resolver("sum", lambda *values: sum(int(v) for v in values))


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a _target_ of a config group like callbacks/ or logger/."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]
