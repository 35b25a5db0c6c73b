"""Train a method: `python train.py method=<name> model=<backbone> [overrides]`.

Instantiates the datamodule, module, callbacks, loggers and trainer from the Hydra config,
fits, and returns the metric named by `optimized_metric` (for sweepers).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from utils.checks import check_run_settings  # noqa: E402
from utils.config import instantiate_list, register_resolvers  # noqa: E402
from utils.errors import ConfigError  # noqa: E402
from utils.task import hydra_entry, refuse_to_overwrite, task  # noqa: E402

log = logging.getLogger("train")
register_resolvers()
# Frozen backbones stay in eval mode on purpose (no dropout); Lightning would warn about it every run.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def _ddp_under_multirun(cfg: DictConfig) -> None:
    """Lightning's 'ddp' relaunches this script, which under -m would start a new sweep: spawn instead."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # SLURM started one process per task: they are the DDP ranks, nothing relaunches
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and cfg.trainer.get("strategy") == "ddp":
        log.warning("multirun with strategy=ddp: using ddp_spawn so each job's workers stay in that job")
        cfg.trainer.strategy = "ddp_spawn"


@task
def train(cfg: DictConfig) -> float | None:
    import lightning as L
    import torch
    from hydra.utils import instantiate

    check_run_settings(cfg)
    refuse_to_overwrite(cfg.paths.output_dir, resuming=cfg.get("ckpt_path") is not None,
                        artifacts=tuple(cfg.run_dir_taken_by), can_resume=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    _ddp_under_multirun(cfg)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    return optimized_metric(cfg.get("optimized_metric"), trainer.callback_metrics)


def optimized_metric(name: str | None, metrics: dict) -> float | None:
    """The value a sweeper optimises; a name that the run never logged is an error that lists what it did log."""
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "nothing"
        raise ConfigError(f"optimized_metric={name} was not logged by this run (logged: {logged}); for eval/... "
                          f"metrics add callbacks=eval and a metric set, e.g. metrics=shapes_concept")
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    hydra_entry(main)
