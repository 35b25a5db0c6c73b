"""Every conf/experiment/*.yaml composes through train's config and holds what its header promises: the method,
the model, the evaluation's metric set and sweep, or, for a multirun, the sweeper's variants and the evaluation
run after them. The multirun-then-evaluate mechanism and the inversion evaluation run end to end, cut short."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import CONF, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
EVAL_PROMPTS = 8

# name: (method_name, model, metric keys of the evaluation callback (None: none), its sweep)
PROMISES = {
    "slider_size_shapes": ("prompt_slider", "shapes", {"attributes", "size_slope"}, {"strength": [0, 0.5, 1, 2, 3]}),
    "slider_erase_shapes": ("prompt_slider", "shapes", {"attributes"}, None),
    "residuals_shapes": ("residuals", "shapes", {"attributes", "identity"}, {"lag": [False, True]}),
    "ti_shapes": ("textual_inversion", "shapes", {"attributes", "identity"}, None),
    "em_masks_shapes": ("em_mask", "shapes", None, None),
    "slider_compose_shapes": ("prompt_slider", "shapes", None, None),
    "slider_transfer_shapes": ("prompt_slider", "shapes", None, None),
    "style_inversion_shapes": ("style_diffusion", "shapes", None, None),
    "slider_age_sd15": ("prompt_slider", "sd15", {"clip_t", "lpips"}, {"strength": [0, 1, 2, 3]}),
    "slider_erase_sd15": ("prompt_slider", "sd15", {"clip_t"}, None),
    "slider_compose_sd15": ("prompt_slider", "sd15", None, None),
    "slider_transfer_sd": ("prompt_slider", "sdxl", None, None),
    "residuals_sd15": ("residuals", "sd15", {"clip_t", "clip_i", "dino"}, {"lag": [False, True]}),
    "ti_sd15": ("textual_inversion", "sd15", {"clip_t", "clip_i", "dino"}, None),
    "em_masks_sd15": ("em_mask", "sd15", None, None),
    "style_inversion_sd15": ("style_diffusion", "sd15", None, None),
}
# multirun experiments: (the swept key, its variants, the evaluation after the sweep: (name, artifacts) or None)
SWEEPS = {
    "em_masks_shapes": ("module.masks", "em,fixed,ground_truth", None),
    "em_masks_sd15": ("module.masks", "em,fixed,ground_truth", None),
    "slider_compose_shapes": ("slider", "shapes_size,shapes_dark", ("composition", "together")),
    "slider_compose_sd15": ("slider", "age,smile", ("composition", "together")),
    "slider_transfer_shapes": ("model", "shapes,shapes_b", ("transfer", "each")),
    "slider_transfer_sd": ("model", "sdxl,sd15", ("transfer", "each")),
}
# experiments scored by the inversion evaluation: its metric keys
INVERSIONS = {"style_inversion_shapes": {"attributes", "psnr", "ssim"},
              "style_inversion_sd15": {"clip_t", "lpips", "psnr", "ssim", "structure_dist"}}


def test_every_experiment_is_checked():
    assert set(EXPERIMENTS) - {"ti_tiny"} == set(PROMISES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"python train.py experiment={name}" in text
    if name not in PROMISES:
        return
    method, model, metrics, sweep = PROMISES[name]
    assert (cfg.method_name, cfg.model.name) == (method, model)
    evaluation = cfg.callbacks.get("evaluation")
    if metrics is None:
        assert evaluation is None
    else:
        assert set(evaluation.metrics) == metrics and set(cfg.metrics) == metrics
        assert (None if evaluation.sweep is None else dict(evaluation.sweep)) == sweep
        prompts = evaluation.prompts_file and [line for line in Path(evaluation.prompts_file).read_text().splitlines()
                                               if line and not line.startswith("#")]
        assert len(prompts or evaluation.prompts) >= (EVAL_PROMPTS if model == "shapes" else 4)
        assert len(evaluation.seeds) >= 4
    if name in SWEEPS:
        key, variants, after = SWEEPS[name]
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params[key] == variants
        callback = cfg.hydra.callbacks.get("evaluate_sweep")
        assert (None if callback is None else (callback.name, callback.artifacts)) == after
    if name in INVERSIONS:
        inversion = cfg.callbacks.inversion_evaluation
        assert set(cfg.metrics) == INVERSIONS[name] and list(inversion.baselines) == ["null_text_p2p"]
    if "identity" in (metrics or ()):
        assert cfg.metrics.identity.concept == "sun_medal"
        assert Path(cfg.data.images_dir).parts[-3:] == ("shapes_concepts", "sun_medal", "images")
    if name == "slider_size_shapes":
        assert cfg.slider.name == "size"
    if name == "slider_erase_shapes":
        assert cfg.slider.name == "erase_red" and all(" red " in p for p in evaluation.prompts)


def test_evaluate_sweep_commands(tmp_path):
    from utils.hydra_callbacks import EvaluateSweep

    jobs = [tmp_path / "0", tmp_path / "1"]
    together = EvaluateSweep(["metrics=shapes_readout"], artifacts="together", name="composition")
    command = together.command(tmp_path, jobs)
    assert command[1].endswith("evaluate.py") and command[2:] == [
        f"artifact=['{jobs[0]}','{jobs[1]}']", f"hydra.run.dir={tmp_path / 'composition'}", "metrics=shapes_readout"]
    each = EvaluateSweep([], artifacts="each", name="transfer").command(tmp_path, jobs)
    assert each[2:] == ["-m", f"artifact='{jobs[0]}','{jobs[1]}'", f"hydra.sweep.dir={tmp_path / 'transfer'}"]
    from utils.errors import UserError
    with pytest.raises(UserError, match="use together or each"):
        EvaluateSweep([], artifacts="both")


def test_composition_experiment_trains_both_sliders_then_scores_them_together(tmp_path):
    """experiment=slider_compose_shapes cut short: two 2-step sliders (a 1-image latent pool), then one evaluation
    with both, a row per [size, dark] strength pair (the prompt set and steps cut too)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a medium red circle on a gray background\n")
    sweep = tmp_path / "sweep"
    after = ["metrics=shapes_readout", f"prompts_file={prompts}", "seeds=[0]", "num_steps=2",
             "sweep={strength:[[0,0],[2,2]]}"]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "train.py", "experiment=slider_compose_shapes", "trainer.max_steps=2",
                           "module.pool.size=1", "module.pool.num_steps=2",
                           "logger=csv", "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep}",
                           "hydra.callbacks.evaluate_sweep.overrides=[" + ",".join(f"'{o}'" for o in after) + "]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [json.loads((sweep / job / "slider.json").read_text())["slider"] for job in ("0", "1")]
    assert names == ["size", "dark"]
    metrics = json.loads((sweep / "composition" / "metrics.json").read_text())
    assert [Path(a).parent for a in metrics["artifact"]] == [sweep / "0", sweep / "1"]  # both sliders, in job order
    assert [row["strength"] for row in metrics["rows"]] == [[0, 0], [2, 2]]
    assert all({"readout/area", "readout/background_brightness"} <= set(row) for row in metrics["rows"])
    table = (sweep / "composition" / "metrics.csv").read_text().splitlines()
    assert [line.split('",')[0] for line in table[1:]] == ['"[0, 0]', '"[2, 2]']  # the pairs as metrics.json has them
    assert Image.open(sweep / "composition" / "grid.png").size[0] >= 2 * 64


def test_inversion_evaluation_scores_every_method_and_output(tmp_path):
    """experiment=style_inversion_shapes cut short (T = 3, K = 2, the tiny encoder, null-text at 3 steps): a row per
    (method, output), reconstructions against the source caption, edits against the target; the grid holds, per
    image, the source and each method's reconstruction and edit."""
    import train

    out = tmp_path / "run"
    cfg = compose_cfg("train", ["experiment=style_inversion_shapes", "trainer=cpu", "logger=csv", "data.num_steps=3",
                                "module.inner.K=2", "module.image_encoder.build=tiny",
                                "callbacks.inversion_evaluation.baselines.null_text_p2p.num_steps=3",
                                f"paths.cache_dir={tmp_path / 'cache'}"], out)
    train.train(cfg)
    rows = json.loads((out / "inversion_metrics.json").read_text())["rows"]
    assert [(r["method"], r["output"]) for r in rows] == [
        ("style_diffusion", "reconstruction"), ("style_diffusion", "edit"),
        ("null_text_p2p", "reconstruction"), ("null_text_p2p", "edit")]
    for row in rows:
        assert {"psnr", "ssim", "attributes/shape", "attributes/colour", "attributes/background"} <= set(row)
        assert 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1
    by = {(r["method"], r["output"]): r for r in rows}
    # an edit changes the object's colour: further from the source than the same method's reconstruction
    assert by["null_text_p2p", "edit"]["psnr"] < by["null_text_p2p", "reconstruction"]["psnr"]
    header = (out / "inversion_metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["method", "output"] and len((out / "inversion_metrics.csv").read_text().splitlines()) == 5
    # per image: the source, then 2 methods x (reconstruction, edit)
    assert Image.open(out / "inversion_grid.png").size == (5 * 64, 3 * 64)


def test_inversion_evaluation_refuses_bad_edits_files(tmp_path):
    from callbacks.inversion_eval import read_edits
    from utils.errors import DataError

    assert read_edits(None, ["00"]) == {} and read_edits(tmp_path / "absent.json", ["00"]) == {}
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps({"00": "a medium blue circle on a black background"}))
    assert read_edits(edits, ["00"]) == {"00": "a medium blue circle on a black background"}
    with pytest.raises(DataError, match="no target prompt for image '01'"):
        read_edits(edits, ["00", "01"])
    edits.write_text(json.dumps(["a blue circle"]))
    with pytest.raises(DataError, match="must map image names to target prompts"):
        read_edits(edits, ["00"])


def test_benchmark_runs_train_through_the_experiment_configs(tmp_path):
    """benchmarks/slider_shapes.py and residuals_shapes.py train each run through its experiment config, with the
    experiment's evaluation left out (their own evaluate step scores more prompts and seeds)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import residuals_shapes
    import slider_shapes

    runs = {**{f"slider/{k}": v for k, v in slider_shapes.RUNS.items()},
            **{f"residuals/{k}": v for k, v in residuals_shapes.METHODS.items()}}
    through_experiments = 0
    for name, overrides in runs.items():
        cfg = compose_cfg("train", list(overrides), tmp_path)
        assert cfg.callbacks.get("evaluation") is None, name
        through_experiments += any(o.startswith("experiment=") for o in overrides)
    assert through_experiments >= 8


def test_composition_on_sd_evaluates_the_model_it_trained(tmp_path):
    cfg = compose_cfg("train", ["experiment=slider_compose_sd15", "model.path=/data/sd15"], tmp_path)
    assert {"model=sd15", "model.path=/data/sd15"} <= set(cfg.hydra.callbacks.evaluate_sweep.overrides)


def test_paired_identity_compares_each_image_with_the_baselines_same_prompt_and_seed(tmp_path):
    """residuals_shapes.py paired: a method whose images are the concept's renders beats a baseline that drew
    another badge on every pair, over all of each method's evaluation folders, LAG rows apart."""
    import shutil

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import residuals_shapes

    def folder(method: str, drawn: str, seeds: list[int], lags=(None,)) -> None:
        eval_dir = tmp_path / "ember_gem" / residuals_shapes.eval_dir_name(method, seeds)
        (eval_dir / "images").mkdir(parents=True)
        samples = []
        for lag in lags:
            for seed in seeds:
                for i in range(3):
                    name = f"images/p{i}_s{seed}_{lag}.png"
                    shutil.copy(ROOT / "assets" / "shapes_concepts" / drawn / "images" / f"0{i}.png", eval_dir / name)
                    samples.append({"file": name, "text": f"prompt {i}", "seed": seed,
                                    **({} if lag is None else {"lag": lag})})
        (eval_dir / "samples.json").write_text(json.dumps({"samples": samples}))

    for seeds in ([0, 1, 2, 3, 4], [5, 6]):
        folder("textual_inversion", "sun_medal", seeds)
        folder("kv", "ember_gem", seeds)
    folder("residuals", "ember_gem", [0, 1, 2, 3, 4], lags=(False, True))
    rows = residuals_shapes.paired(tmp_path, ["ember_gem"], ["textual_inversion", "kv", "residuals"])["rows"]
    assert [(r["method"], r["n"]) for r in rows] == [("kv", 21), ("residuals", 15), ("residuals + LAG", 15)]
    assert all(r["difference"] > 0.2 and r["wins"] == 1.0 for r in rows)
    assert residuals_shapes.eval_dir_name("kv", [5, 6, 7]) == "kv_eval_seeds5-7"
    assert json.loads((tmp_path / "paired.json").read_text()) == rows
    with pytest.raises(SystemExit, match="no evaluation of textual_inversion for sun_medal"):
        residuals_shapes.paired(tmp_path, ["sun_medal"], ["textual_inversion", "kv"])
