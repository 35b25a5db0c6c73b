"""Test helpers: composing the Hydra configs in-process, and callbacks that tests inject into
train.py runs with +callbacks.<name>._target_=tests.helpers.<Class>."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from utils.config import register_resolvers
from utils.errors import ConfigError
from utils.io import AtomicCheckpointIO, atomic_path

CONF = Path(__file__).resolve().parents[1] / "conf"
register_resolvers()


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path):
    """The config an entry point would get for these overrides, with its output folder at output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def method_settings(method: str, *keys: str) -> dict:
    """conf/method/<method>.yaml's module section (unresolved), only `keys`: the defaults a module's code leaves
    to the yaml, for tests that build the module directly. Config files its defaults list reads into the module
    (`/<group>@module: <name>`) come first, the method's own values over them, as Hydra composes them."""
    cfg = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    sections = []
    for entry in cfg.get("defaults") or []:
        for target, name in (entry.items() if isinstance(entry, DictConfig) else ()):
            group, _, package = str(target).lstrip("/").partition("@")
            if package == "module":
                sections.append(OmegaConf.load(CONF / group / f"{name}.yaml"))
    # interpolations into the model (the model's own guidance) take their defaults: no model is composed here
    root = OmegaConf.create({"model": {}, "module": OmegaConf.merge(*sections, cfg.module)})
    return {k: _resolved_if_possible(root.module, k) for k in keys}


def _resolved_if_possible(node: DictConfig, key: str):
    try:
        return OmegaConf.to_container(node[key], resolve=True) if isinstance(node[key], DictConfig) else node[key]
    except InterpolationResolutionError:  # a value the yaml leaves to another config group (${seed}, ...)
        return OmegaConf.to_container(node, resolve=False)[key]


def style_diffusion_settings(**overrides) -> dict:
    """StyleDiffusionModule's settings from conf/style_diffusion/settings.yaml and conf/method/style_diffusion.yaml
    (less what a run fills in: backbone, image_encoder, num_steps, out_dir, seed), `overrides` replacing their
    values (nested dicts merge)."""
    yaml = method_settings("style_diffusion", "guidance_scale", "mapping", "inner", "adam", "early_stop",
                           "early_stop_growth", "attention_weight", "editing")
    return OmegaConf.to_container(OmegaConf.merge(yaml, overrides))


def assert_missing_and_unknown(cls, values: dict, key: str) -> None:
    """A Settings class's `from_config` stops `values` less `key`, and `values` with an unknown key, each with a
    one-line ConfigError naming the section."""
    section = re.escape(cls.key)
    with pytest.raises(ConfigError, match=rf"^{section} is missing {key}; ") as missing:
        cls.from_config({k: v for k, v in values.items() if k != key})
    assert "\n" not in str(missing.value)
    with pytest.raises(ConfigError, match=rf"^{section}\.colour is unknown"):
        cls.from_config({**values, "colour": 1})


class KillAtStep(L.Callback):
    """SIGKILL the training process once `step` optimizer steps are done (a crash, not a clean exit)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringCheckpointWrite(AtomicCheckpointIO):
    """Checkpoint IO that SIGKILLs the process in the middle of its `save`-th checkpoint write (a crash while
    the file is half written)."""

    def __init__(self, save: int):
        super().__init__()
        self.save, self.saves = save, 0

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self.saves += 1
        if self.saves == self.save:
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


class InjectNaN(L.Callback):
    """Make the gradients of optimizer step `step` NaN (a one-off bad batch); write the trained weights before
    and after that step to <dirpath>/nan_step.pt."""

    def __init__(self, step: int, dirpath: str):
        self.step, self.dirpath, self.before = step, Path(dirpath), None

    def _weights(self, pl_module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            self.before = self._weights(pl_module)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            torch.save({"before": self.before, "after": self._weights(pl_module)}, self.dirpath / "nan_step.pt")


class DumpTrainedRows(L.Callback):
    """Each rank writes its trained token rows and the prompts it saw to <dirpath>/rank<r>.pt."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.prompts: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts.extend(batch["prompt"])

    def on_train_end(self, trainer, pl_module):
        rows = [r.detach().cpu().clone() for r in pl_module.tokens.embeddings()]
        torch.save({"rows": rows, "prompts": self.prompts, "world_size": trainer.world_size},
                   self.dirpath / f"rank{trainer.global_rank}.pt")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below a folder, by relative path, with its bytes (to prove a refused run touched nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def slider_batch(template: dict, phrase: str) -> dict:
    """One slider training batch of a template (a conf/slider entry) for a phrase p, as the datamodule yields it."""
    from datamodules.sliders import SliderTemplate

    t = SliderTemplate.from_dict(template)
    return {**{k: [v] for k, v in t.prompts(phrase).items()}, "sign": torch.tensor([t.sign]),
            "guidance_scale": torch.tensor([t.guidance_scale])}
