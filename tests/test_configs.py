"""Config composition: every group option composes and instantiates; debug runs work in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import compose_cfg


@pytest.mark.parametrize("model", ["tiny", "sd14", "sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp"])
def test_train_config_composes(model, trainer, tmp_path):
    cfg = compose_cfg("train", [f"model={model}", f"trainer={trainer}"], tmp_path)
    assert cfg.module._target_.endswith("TextualInversionModule")
    assert cfg.data.resolution == cfg.model.resolution
    assert cfg.data.token == cfg.module.token.name
    assert cfg.paths.output_dir == str(tmp_path)
    expected = {"gpu": "bf16-mixed", "ddp": "bf16-mixed", "cpu": "32-true"}.get(trainer)
    if expected:
        assert cfg.trainer.precision == expected
    assert set(cfg.callbacks) == {"non_finite", "run_identity", "model_checkpoint", "progress_bar", "artifact_export",
                                  "fast_unet", "step_timer", "sample_grid"}


@pytest.mark.parametrize("extra", [["debug=limit"], ["debug=overfit"], ["experiment=ti_tiny"], ["logger=many"]])
def test_debug_and_experiment_configs_compose(extra, tmp_path):
    cfg = compose_cfg("train", extra, tmp_path)
    if extra[0].startswith("debug"):
        assert cfg.trainer.accelerator == "cpu" and "csv" in cfg.logger
    if extra == ["experiment=ti_tiny"]:
        assert cfg.trainer.max_steps == 200 and cfg.model.name == "tiny"
    if extra == ["logger=many"]:
        assert set(cfg.logger) == {"csv", "tensorboard", "wandb"}


def test_fast_dev_run_in_process(tiny_dir, image_folder, tmp_path):
    """debug=fdr runs one training step through train.train (no checkpoints, no artifacts on disk)."""
    import train

    cfg = compose_cfg("train", ["debug=fdr", "model=tiny", f"model.path={tiny_dir}",
                                f"data.images_dir={image_folder / 'images'}",
                                "optimized_metric=train/loss"], tmp_path)
    loss = train.train(cfg)
    assert loss is not None and 0 < loss < 10
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.safetensors"))


def test_default_job_is_textual_inversion_on_a_shapes_concept(tmp_path):
    """`python train.py` with no overrides: the shipped shapes model learns the held-out concept sun_medal
    from its reference renders, each captioned in the world's language; one step runs (debug=fdr)."""
    import hydra

    import train

    cfg = compose_cfg("train", [], tmp_path)
    assert cfg.model.name == "shapes" and cfg.method_name == "textual_inversion"
    assert cfg.module.token.initializer == "badge" and cfg.data.templates == "captions"
    data = hydra.utils.instantiate(cfg.data)
    data.setup("fit")
    prompts = {data.image_set(k)["prompt"] for k in range(10)}
    assert len(prompts) >= 3 and all(p.startswith("a ") and "<concept> on a " in p for p in prompts)
    loss = train.train(compose_cfg("train", ["debug=fdr", "optimized_metric=train/loss"], tmp_path / "fdr"))
    assert loss is not None and 0 < loss < 10


def test_evaluate_config_composes(tmp_path):
    cfg = compose_cfg("evaluate", ["model=sdxl"], tmp_path)
    assert cfg.model.kind == "sdxl" and cfg.num_steps == 50 and cfg.guidance_scale == 7.5


@pytest.mark.parametrize("model, rare", [("shapes", "ckered"), ("sd14", "sks"), ("sdxl", "sks"), ("tiny", None)])
def test_residuals_config_has_the_papers_settings(model, rare, tmp_path):
    """Sec. 4.1: proj_out, r_i = 0.05 m_i, 150 iterations of batch 4 at lr 1e-3; V* from a rare token, frozen;
    prompts "... V* <macro class> ..."."""
    cfg = compose_cfg("train", ["method=residuals", f"model={model}"], tmp_path)
    module = cfg.module
    assert module._target_.endswith("ResidualModule") and module.targets == "proj_out" and module.rank_ratio == 0.05
    assert cfg.trainer.max_steps == 150 and cfg.data.batch_size == 4 and module.optimizer.lr == 1e-3
    assert module.token.initializer == rare and module.token.train is False and module.prior.images_dir is None
    assert cfg.data.token == f"<v> {cfg.model.initializer_word}"


@pytest.mark.parametrize("method", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method")
                                          .glob("*.yaml")))
def test_every_method_composes_with_no_further_argument(method, tmp_path):
    """`python train.py method=<m>` needs nothing else: no value is missing, everything resolves, and the data
    module finds its default data."""
    import hydra
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", [f"method={method}"], tmp_path)
    assert cfg.method_name == method
    for key in cfg:
        if key != "hydra":
            node = cfg[key]
            if OmegaConf.is_config(node):
                assert not OmegaConf.missing_keys(node), (key, OmegaConf.missing_keys(node))
                OmegaConf.to_container(node, resolve=True)
    data = hydra.utils.instantiate(cfg.data)
    if hasattr(data, "setup") and method not in ("pretrain", "pretrain_b"):  # pretraining streams rendered scenes
        data.setup("fit")


@pytest.mark.parametrize("model, guidance", [("shapes", 7.5), ("sdxl", 7.5), ("tiny_sd3", 7.0), ("flux_random", 3.5)])
def test_sampling_guidance_is_the_models_own(model, guidance, tmp_path):
    """FLUX.1-dev samples at 3.5 and SD3 at 7.0 (their pipelines' defaults); models that do not say, at 7.5."""
    train = compose_cfg("train", [f"model={model}", "method=prompt_slider"], tmp_path / "train")
    assert train.callbacks.sample_grid.guidance_scale == guidance
    assert train.module.pool.guidance_scale == guidance
    for entry in ("evaluate", "edit"):
        assert compose_cfg(entry, [f"model={model}"], tmp_path / entry).guidance_scale == guidance
