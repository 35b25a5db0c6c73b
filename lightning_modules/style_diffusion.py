"""StyleDiffusion (paper 003) under Lightning: Algorithm 1 on every image of a folder, then P2Plus editing.

The method itself is plain code in diffusion/: Algorithm 1 (`StyleDiffusionFitter`, its inner-iteration
schedule and Adam settings) in style_inversion.py, replay and editing in style_editing.py. This module wraps
it for train.py: it keeps the Hydra-facing settings, builds the fitter around the frozen backbone in
`configure_model`, hands it Lightning's optimizer, and checkpoints and exports what it trains.

Lightning. Manual optimisation; one `training_step` is one image: the whole of Algorithm 1 for it,
each inner iteration one `optimizer.step()` (so `global_step` counts Adam updates). The trajectory
data module streams images (batch 1) and the module stops the run (`trainer.should_stop`) once every
image of the folder is done; `trainer.max_steps` is -1. Each image starts from freshly drawn
N(0, 0.01) weights, and its trained networks are exported as soon as they are done
(`out_dir/style_diffusion/<image stem>/`: mapping_networks.safetensors, with E(x) and z*_T, and
style_diffusion.json with the settings), so a run's checkpoint only holds the image in progress.

Replay and editing. `reconstruct` and `edit` apply diffusion/style_editing.py to the latest inversion or
an exported folder, with `module.editing`'s taus, controller, LocalBlend and SDEdit settings.

Settings. The sections are typed (utils/settings.py): `module.image_encoder` (ImageEncoderSettings),
`module.mapping` (MappingSettings), `module.inner` / `module.adam` (FitSettings' InnerSettings, AdamSettings)
and `module.editing` (StyleEditingSettings, shared with edit.py's StyleDiffusionEdit); the yamls
conf/style_diffusion/settings.yaml and conf/method/style_diffusion.yaml hold every default.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from diffusion.backbone import Backbone
from diffusion.editing import StyleEditingSettings
from diffusion.image_encoder import ImageEncoder, ImageEncoderSettings
from diffusion.inversion import Trajectory
from diffusion.mapping import MappingNetworks, MappingSettings
from diffusion.style_editing import edit, reconstruct
from diffusion.style_inversion import FitSettings, StyleDiffusionFitter, StyleInversion, load_inversion, save_inversion
from lightning_modules.base import DiffusionModule
from utils.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)


# ----- the module ----------------------------------------------------------------------------------
class StyleDiffusionModule(DiffusionModule):
    """Algorithm 1 of StyleDiffusion, one image per training step (see the module docstring)."""

    def __init__(self, backbone: dict, image_encoder: dict, num_steps: int, guidance_scale: float, mapping: dict,
                 inner: dict, adam: dict, early_stop: float, early_stop_growth: float, attention_weight: float,
                 editing: dict, out_dir: str | None = None, seed: int = 0, cuda_graphs: bool = True):
        super().__init__(backbone, optimizer=None, lr_scheduler=None, seed=seed)
        self.automatic_optimization = False
        self.encoder_settings = ImageEncoderSettings.from_config(image_encoder)
        self.settings = FitSettings(num_steps, guidance_scale, inner=inner, adam=adam, early_stop=early_stop,
                                    early_stop_growth=early_stop_growth,
                                    attention_weight=attention_weight)  # checks the schedule and Adam preset now
        self.inner, self.adam = self.settings.inner.as_dict(), self.settings.optimizer  # hparams and exports name them
        self.mapping = MappingSettings.from_config(mapping)
        self.editing = StyleEditingSettings.from_config(editing)
        self.out_dir = Path(out_dir) if out_dir else None
        self.cuda_graphs = cuda_graphs
        self.save_hyperparameters({"backbone": self.backbone_config, "image_encoder": self.encoder_settings.as_dict(),
                                   "num_steps": num_steps, "guidance_scale": guidance_scale,
                                   "mapping": self.mapping.as_dict(), "inner": self.inner, "adam": self.adam,
                                   "early_stop": early_stop, "early_stop_growth": early_stop_growth,
                                   "attention_weight": attention_weight, "editing": self.editing.as_dict(),
                                   "seed": seed, "cuda_graphs": cuda_graphs}, logger=False)
        self.fitter: StyleDiffusionFitter | None = None
        self.encoder: ImageEncoder | None = None
        self.mappings: MappingNetworks | None = None
        self.done: set[int] = set()
        self.exported: list[Path] = []
        self.latest: StyleInversion | None = None

    # ----- model ----------------------------------------------------------------------------------
    def build(self, backbone: Backbone) -> None:
        encoder = self.encoder_settings.load().to(backbone.device)
        self.fitter = StyleDiffusionFitter.create(backbone, encoder, self.settings, self.mapping, self.cuda_graphs)
        self.encoder, self.mappings = self.fitter.encoder, self.fitter.mappings  # submodules: moved and checkpointed

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.fitter.new_optimizer()

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        datamodule.prepare(self.backbone)  # DDIM trajectories and maps (cached)
        self.settings.map_blocks = tuple(datamodule.hparams.get("map_blocks", self.settings.map_blocks))
        num_steps = self.settings.num_steps
        if datamodule.hparams.get("num_steps", num_steps) != num_steps:
            raise ConfigError(f"data.num_steps={datamodule.hparams.num_steps} differs from module.num_steps="
                              f"{num_steps}; the trajectory and the mapping networks need the same T")

    # ----- Algorithm 1 ----------------------------------------------------------------------------
    def fit_image(self, pixels: torch.Tensor, prompt: str, trajectory: Trajectory, name: str = "image",
                  generator: torch.Generator | None = None) -> StyleInversion:
        """Algorithm 1 on one image and its trajectory: under a trainer with Lightning's optimizer and
        backward (precision, strategy), else with the fitter's own Adam."""
        loop = {} if self._trainer is None else {"optimizer": self.optimizers(), "backward": self.manual_backward}
        self.latest = self.fitter.fit(self.attention_hub(), pixels, prompt, trajectory, name, generator, **loop)
        return self.latest

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["prompt"]) != 1:
            raise ConfigError(f"StyleDiffusion fits one image at a time; set data.batch_size=1 "
                              f"(got {len(batch['prompt'])})")
        index = batch["index"][0]  # a host number (datamodules/stream.py's collate)
        datamodule = self.trainer.datamodule
        if index not in self.done:
            name = self._image_name(datamodule, index)
            generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + index)
            trajectory = Trajectory(batch["latents"][0], batch["maps"][0])
            inversion = self.fit_image(batch["pixel_values"], batch["prompt"][0], trajectory, name, generator)
            self.log_dict({"train/iterations": float(sum(inversion.iterations)),
                           "train/final_loss": float(inversion.losses[-1])}, batch_size=1)
            if self.out_dir is not None and self.trainer.is_global_zero:
                self.exported += self._export(self.out_dir, inversion)
            self.done.add(index)
        total = len(getattr(datamodule, "records", None) or [])
        if total and len(self.done) >= total:
            self.trainer.should_stop = True

    @property
    def batches_done(self) -> int:
        """The data stream's position on resume (a batch takes many optimizer steps): the stream visits
        the images in a fresh order each pass, one per batch, so the batches done are the images done."""
        return len(self.done)

    @staticmethod
    def _image_name(datamodule, index: int) -> str:
        records = getattr(datamodule, "records", None)
        return records[index].image.stem if records else f"{index:04d}"

    # ----- replay, editing, artifacts -------------------------------------------------------------
    def _inversion(self, image: StyleInversion | str | Path | None) -> StyleInversion:
        if image is None:
            if self.latest is None:
                raise ArtifactError("no image has been inverted yet; train first or pass an exported folder")
            return self.latest
        return image if isinstance(image, StyleInversion) else load_inversion(image)

    @torch.no_grad()
    def reconstruct(self, image: StyleInversion | str | Path | None = None, decode: bool = True) -> torch.Tensor:
        """The replay of an inverted image (default: the latest), [1, 3, H, W] in [0, 1] (latents if not decode)."""
        z = reconstruct(self.backbone, self.attention_hub(), self._inversion(image))
        return self.backbone.decode_latents(z) if decode else z

    @torch.no_grad()
    def edit(self, targets: Sequence[str] | str, image: StyleInversion | str | Path | None = None,
             decode: bool = True, **settings) -> torch.Tensor:
        """[source replay, edits...] of an inverted image; settings (StyleEditingSettings' names) override
        module.editing for this call."""
        unknown = sorted(set(settings) - set(self.editing.as_dict()))
        if unknown:
            raise ConfigError(f"{StyleEditingSettings.key}.{unknown[0]} is unknown; use one of "
                              f"{tuple(self.editing.as_dict())}")
        cfg = replace(self.editing, **settings)  # checked again
        z = edit(self.backbone, self.attention_hub(), self._inversion(image), targets, **cfg.as_dict())
        return self.backbone.decode_latents(z) if decode else z

    def _export(self, root: Path, inversion: StyleInversion) -> list[Path]:
        s = self.settings
        extra = {**self.backbone_identity(), "image_encoder": Path(str(self.encoder_settings.path)).name,
                 "inner": self.inner,
                 "adam": {**self.adam, "betas": list(self.adam["betas"])}, "attention_weight": s.attention_weight,
                 "early_stop": [s.early_stop, s.early_stop_growth], "editing": self.editing.as_dict()}
        paths = save_inversion(root / "style_diffusion" / inversion.name, inversion, extra)
        log.info("wrote %s", paths[0].parent)
        return paths

    def export_artifacts(self, out_dir: str | Path) -> list[Path]:
        """Every image exported during the run, plus the latest one under out_dir if it went elsewhere."""
        out = Path(out_dir)
        if self.latest is not None and (self.out_dir is None or self.out_dir != out):
            self.exported += self._export(out, self.latest)
        return list(dict.fromkeys(self.exported))

    # ----- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["style_diffusion_done"] = sorted(self.done)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.done = set(checkpoint.get("style_diffusion_done", []))
