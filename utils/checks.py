"""Checks of a run's numeric and path settings before any work: one ConfigError naming the key.

Hydra passes an override such as `module.optimizer.lr=abc` through as a string and `=inf` as a float;
without these checks they surface as tracebacks deep in PyTorch or Lightning, or as a run that trains on NaN.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.errors import ConfigError

CHECKPOINT_KEY = "run_identity"  # where a checkpoint records the method and model that wrote it
NOT_LEARNING_RATES = ("lr_decay", "lr_scheduler")  # every other key `lr` or `lr_*` is one (lr_unet, lr_vae, ...)
POSITIVE_INTS = ("data.batch_size", "data.resolution", "model.resolution")
NON_NEGATIVE_INTS = ("callbacks.model_checkpoint.every_n_train_steps", "trainer.log_every_n_steps",
                     "data.num_workers")


def is_number(value: Any) -> bool:
    """An int or float from a config (a bool is neither, though Python counts it as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole(key: str, value: Any, low: int) -> None:
    """A setting that must be a whole number >= low."""
    if not _is_int(value) or value < low:
        raise ConfigError(f"{key}={value!r} must be a whole number >= {low}")


def _learning_rates(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every learning rate below a config node: a key `lr` or `lr_*` holding a value,
    save NOT_LEARNING_RATES (StyleDiffusion's lr_decay may be 0)."""
    if isinstance(node, DictConfig):
        for key, value in node.items():
            name = f"{prefix}.{key}"
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _learning_rates(value, name)
            elif (key == "lr" or str(key).startswith("lr_")) and key not in NOT_LEARNING_RATES:
                yield name, value
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            yield from _learning_rates(value, f"{prefix}[{i}]")


def check_learning_rates(cfg: DictConfig) -> None:
    if "module" not in cfg:
        return
    for key, value in _learning_rates(cfg.module, "module"):
        if value is None:
            continue
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a finite number > 0; e.g. {key}=1e-4")


def check_counts(cfg: DictConfig) -> None:
    for keys, low in ((POSITIVE_INTS, 1), (NON_NEGATIVE_INTS, 0)):
        for key in keys:
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None:
                check_whole(key, value, low)
    steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    if steps is not None and (not _is_int(steps) or (steps < 1 and steps != -1)):
        raise ConfigError(f"trainer.max_steps={steps!r} must be a whole number >= 1 (or -1: until the method stops)")
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r} must be a whole number; e.g. seed=0")


def check_device(cfg: DictConfig) -> None:
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer=gpu but this machine has no CUDA GPU; use trainer=cpu (or trainer=default, "
                              "which picks the GPU when there is one)")


def check_writable(folder: str | Path, key: str) -> None:
    """The folder must exist or be creatable, and take files (tried: permission bits say little to root)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={folder} cannot be written ({e.strerror or type(e).__name__}); "
                          f"choose a writable folder") from e


def check_checkpoint(path: str, identity: dict) -> None:
    """A checkpoint to resume from must be a readable checkpoint written by the same method on the same model."""
    import torch

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist; give a run's checkpoints/last.ckpt")
    if file.stat().st_size == 0:
        raise ConfigError(f"ckpt_path={path} is empty (0 bytes); resume from another checkpoint of the run")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"ckpt_path={path} cannot be read as a checkpoint ({type(e).__name__}); resume from "
                          f"another checkpoint of the run") from e
    written = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if written is not None and written != identity:
        raise ConfigError(f"ckpt_path={path} was written by method={written['method']} on model={written['model']}; "
                          f"this run is method={identity['method']} on model={identity['model']}: resume with the "
                          f"same method and model")


def check_generation_settings(cfg: DictConfig) -> None:
    """evaluate.py's and edit.py's generation settings: whole numbers in range, a finite guidance scale,
    whole-number seeds (a null num_steps means the method's own), a device there is."""
    for key, low in (("num_steps", 1), ("batch_size", 1), ("devices", 1), ("seed", 0)):
        if key in cfg and not (key == "num_steps" and cfg[key] is None):
            check_whole(key, cfg[key], low)
    guidance = cfg.get("guidance_scale")
    if "guidance_scale" in cfg and (not is_number(guidance) or not math.isfinite(guidance)):
        raise ConfigError(f"guidance_scale={guidance!r} must be a finite number; e.g. guidance_scale=7.5")
    if "seeds" in cfg:
        seeds = cfg.seeds if isinstance(cfg.seeds, ListConfig) else [cfg.seeds]
        if not seeds or not all(_is_int(s) for s in seeds):
            raise ConfigError(f"seeds={cfg.seeds!r} must be a whole number or a list of them; e.g. 'seeds=[0,1,2,3]'")
    device = cfg.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={device!r} is unknown; use auto, cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but this machine has no CUDA GPU; use device=cpu (or device=auto)")


def check_run_settings(cfg: DictConfig) -> None:
    """Every check a training run's config must pass before anything is loaded or trained."""
    check_counts(cfg)
    check_learning_rates(cfg)
    check_device(cfg)
    check_optimized_metric(cfg)
    if cfg.get("ckpt_path"):
        check_checkpoint(cfg.ckpt_path, {"method": cfg.method_name, "model": cfg.model.name})


def check_optimized_metric(cfg: DictConfig) -> None:
    """An eval/... metric for a sweeper needs the evaluation callback that computes it."""
    metric = cfg.get("optimized_metric")
    if metric and str(metric).startswith("eval/") and not (cfg.get("callbacks") or {}).get("evaluation"):
        raise ConfigError(f"optimized_metric={metric} comes from the evaluation callback, which this run does not "
                          f"have; add callbacks=eval and a metric set, e.g. metrics=shapes_concept")
