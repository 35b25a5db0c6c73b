"""Every conf/experiment/*.yaml composes through train's config and holds what its header promises:
the method, the evaluation's metric set and sweep (or, for a multirun, the sweeper's variants)."""

from pathlib import Path

import pytest

from tests.helpers import CONF, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

# name: (method_name, metric keys of the evaluation (None: no evaluation callback), sweep)
PROMISES = {
    "slider_size_shapes": ("prompt_slider", {"attributes", "size_slope"}, {"strength": [0, 0.5, 1, 2, 3]}),
    "slider_erase_shapes": ("prompt_slider", {"attributes"}, None),
    "residuals_shapes": ("residuals", {"attributes", "identity"}, {"lag": [False, True]}),
    "ti_shapes": ("textual_inversion", {"attributes", "identity"}, None),
    "em_masks_shapes": ("em_mask", None, None),
}


def test_every_experiment_is_checked():
    assert set(PROMISES) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"python train.py experiment={name}" in text
    if name not in PROMISES:
        return
    method, metrics, sweep = PROMISES[name]
    assert cfg.method_name == method
    evaluation = cfg.callbacks.get("evaluation")
    if metrics is None:
        assert evaluation is None
    else:
        assert set(evaluation.metrics) == metrics and set(cfg.metrics) == metrics
        assert (None if evaluation.sweep is None else dict(evaluation.sweep)) == sweep
        assert len(evaluation.prompts) >= 8 and list(evaluation.seeds) == [0, 1, 2, 3, 4]
    if "identity" in (metrics or ()):
        assert cfg.metrics.identity.concept == "sun_medal"
        assert Path(cfg.data.images_dir).parts[-3:] == ("shapes_concepts", "sun_medal", "images")
    if name == "slider_size_shapes":
        assert cfg.slider.name == "size"
    if name == "slider_erase_shapes":
        assert cfg.slider.name == "erase_red" and all(" red " in p for p in evaluation.prompts)
    if name == "em_masks_shapes":
        assert cfg.hydra.mode.name == "MULTIRUN"
        variants = cfg.hydra.sweeper.params["module.masks"].split(",")
        assert variants == ["em", "fixed", "ground_truth"]
