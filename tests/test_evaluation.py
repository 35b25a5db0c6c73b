"""Evaluation: prompts judged by the probes, job splitting, metric sets, evaluate.py and the sampling callbacks."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.shapes.world import SceneSampler, parse_caption
from metrics.evaluation import Sweep, plan, sample_grid, shard
from metrics.image_quality import PSNR
from metrics.shapes_metrics import ConceptIdentity, ShapesAttributeAccuracy, SizeSlope
from metrics.suite import MetricSuite
from utils.errors import ConfigError, DataError
from tests.helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]


# ----- prompts the probes can judge --------------------------------------------------------------
def test_parse_caption_recovers_what_every_sampled_caption_states():
    rng = random.Random(0)
    for _ in range(300):
        scene = SceneSampler(badge_p=0.3).sample(rng)
        parsed = parse_caption(scene.caption())
        assert parsed.background == scene.background and parsed.relation == scene.relation
        for got, spec in zip(parsed.objects, scene.objects, strict=True):
            assert got.shape == spec.shape and got.size_word == spec.size_word
            if spec.badge is None:
                assert (got.colour, got.texture) == (spec.colour, spec.texture)
            else:  # a caption names a badge by its class word only
                assert got.colour is None and got.texture is None
        if scene.relation:  # placed on the relation's sides, so the probes pair objects the same way
            axis = "x" if scene.relation in ("left of", "right of") else "y"
            a, b = (getattr(o, axis) for o in parsed.objects)
            assert (a < b) == (getattr(scene.objects[0], axis) < getattr(scene.objects[1], axis))


def test_parse_caption_leaves_unstated_attributes_out_and_refuses_other_prompts():
    scene = parse_caption("a badge on a teal background")
    assert scene.objects[0].shape == "badge" and scene.objects[0].size is None
    with pytest.raises(DataError, match="not a shapes-world caption"):
        parse_caption("a photo of a dog")
    with pytest.raises(DataError, match="cannot read"):
        parse_caption("a shiny circle on a gray background")


def test_attribute_accuracy_scores_only_stated_attributes():
    from datamodules.shapes.render import render_batch
    from datamodules.shapes.world import CONCEPTS, concept_scene

    renders = render_batch([concept_scene("sun_medal", random.Random(1), background="gray")])[0]
    metric = ShapesAttributeAccuracy()
    metric.update(renders, [parse_caption("a badge on a gray background")])
    values = metric.compute()
    assert values["background"] == 1 and values["shape"] == 1 and values["count"] == 1
    assert values["colour"].isnan() and values["size"].isnan()  # nothing stated, nothing scored
    assert CONCEPTS["sun_medal"]
    wrong = ShapesAttributeAccuracy()
    wrong.update(renders, [parse_caption("a badge on a navy background")])
    assert wrong.compute()["background"] == 0


# ----- jobs and metric sets ----------------------------------------------------------------------
def test_shards_split_groups_disjointly_and_keep_a_sweep_together():
    sweep = Sweep.from_config({"guidance_scale": [1.0, 3.0, 7.5]})
    jobs = plan(["a", "b", "c"], ["a", "b", "c"], [0, 1], sweep)
    assert len(jobs) == 18
    parts = [shard(jobs, r, 4) for r in range(4)]
    assert sorted((j for p in parts for j in p), key=repr) == sorted(jobs, key=repr)
    for part in parts:
        for group in {j.group for j in part}:
            assert sorted(j.value_index for j in part if j.group == group) == [0, 1, 2]
    with pytest.raises(ConfigError, match="cannot be split over 7 processes"):
        shard(jobs, 0, 7)
    with pytest.raises(ConfigError, match="one setting"):
        Sweep.from_config({"a": [1], "b": [2]})


def test_grid_layout_follows_the_sweep():
    jobs = plan(["p0", "p1"], ["p0", "p1"], [0, 1, 2], Sweep.from_config({"num_steps": [2, 4]}))
    images = {j: torch.full((3, 4, 4), 10 * j.prompt_index + j.seed, dtype=torch.uint8) for j in jobs}
    grid, legend = sample_grid(images, Sweep.from_config({"num_steps": [2, 4]}))
    assert grid.shape == (3, 6 * 4, 2 * 4)  # a row per (prompt, seed), a column per value
    assert legend["rows"][3] == {"prompt": "p1", "seed": 0} and legend["columns"] == {"num_steps": [2, 4]}
    assert grid[0, 3 * 4, 4].item() == pytest.approx(10 / 255)
    plain = {j: img for j, img in images.items() if j.value_index == 0}
    grid, legend = sample_grid(plain, Sweep())
    assert grid.shape == (3, 2 * 4, 3 * 4) and legend["columns"] == {"seed": [0, 1, 2]}


def test_suite_refuses_a_metric_nothing_feeds_and_names_the_remedy():
    suite = MetricSuite({"psnr": PSNR(), "identity": ConceptIdentity("sun_medal"), "slope": SizeSlope()})
    fields = {"images", "texts", "scenes"}
    with pytest.raises(ConfigError, match="'psnr' .* needs sources.*pairs=class_word"):
        suite.check(fields)
    assert suite.active(fields | {"sources"}) == ["psnr", "identity"]
    assert suite.active(fields | {"sources", "values", "groups"}) == ["psnr", "identity", "slope"]
    with pytest.raises(ConfigError, match="not an evaluation metric"):
        MetricSuite({"x": torch.nn.Identity()})


def test_suite_values_are_the_metrics_own():
    a = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    b = (a + 0.1).clamp(0, 1)
    suite = MetricSuite({"psnr": PSNR()})
    suite.update({"images": a, "sources": b}, ["psnr"])
    direct = PSNR()
    direct.update(a, b)
    assert suite.compute(["psnr"])["psnr"] == pytest.approx(direct.compute().item(), rel=1e-5)


# ----- evaluate.py -------------------------------------------------------------------------------
def concept_file(tmp_path: Path) -> Path:
    """A textual-inversion file for the shapes model: the class word's own embedding under a new name."""
    from safetensors.torch import save_file

    from diffusion.backbone import load_backbone

    backbone = load_backbone(str(ROOT / "models" / "shapes"))
    tokenizer, encoder = backbone.tokenizers[0], backbone.text_encoders[0]
    row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("badge</w>")]
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<sun>": row.detach().clone().view(1, -1)}, str(path))
    return path


def run_evaluate(*overrides: str, expect_ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "evaluate.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"evaluate.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


FAST = ["num_steps=4", "seeds=[0,1]", "batch_size=4"]


def test_evaluate_scores_a_textual_inversion_artifact(tmp_path):
    out = tmp_path / "run"
    run_evaluate(f"artifact={concept_file(tmp_path)}", "metrics=shapes_concept", *FAST,
                 "sweep={guidance_scale:[1,5]}", "pairs=first_value",
                 "+metrics.psnr._target_=metrics.image_quality.PSNR",
                 f"hydra.run.dir={out}")
    summary = json.loads((out / "metrics.json").read_text())
    rows = summary["rows"]
    assert [r["guidance_scale"] for r in rows] == [1, 5]
    assert rows[0]["psnr"] == float("inf") and rows[1]["psnr"] < 60  # the first value is its own source
    for row in rows:
        assert 0 <= row["attributes/background"] <= 1 and 0 <= row["identity/identity"] <= 1
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and "identity/identity_match" in table[0]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert len(samples) == 2 * 2 * 2 and all("<sun>" in s["prompt"] and "badge" in s["text"] for s in samples)
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, 4 * 64)  # (prompt, seed) rows x swept columns
    assert len(list((out / "images").glob("*.png"))) == 8


def test_evaluate_multirun_builds_one_table_and_splits_over_processes(tmp_path):
    """-m: each job adds its row to <sweep>/table.csv. devices=2 (two CPU processes) scores the same set
    to the same values as one process."""
    sweep = tmp_path / "sweep"
    run_evaluate("-m", "devices=1,2", "device=cpu", *FAST, "seeds=[0,1,2]",
                 "+metrics.slope._target_=metrics.shapes_metrics.SizeSlope", "sweep={num_steps:[3,4]}",
                 f"hydra.sweep.dir={sweep}", timeout=400)
    with open(sweep / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["job"], r["num_steps"]) for r in table] == [("0", "3"), ("0", "4"), ("0", "all"),
                                                          ("1", "3"), ("1", "4"), ("1", "all")]
    assert "devices=2" in table[3]["overrides"]
    one, two = table[:3], table[3:]
    for a, b in zip(one, two):
        for key in ("attributes/background", "attributes/shape", "attributes/colour", "slope/spearman"):
            if a[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    assert json.loads((sweep / "1" / "metrics.json").read_text())["world_size"] == 2
    for job in ("0", "1"):
        assert len(list((sweep / job / "images").glob("*.png"))) == 2 * 3 * 2  # every rank's images on disk


@pytest.mark.parametrize("overrides, message", [
    (["metrics=personalization", "paths.metric_models_dir=/nonexistent"], "metrics.clip_t.path=/nonexistent"),
    (["metrics=none", "+metrics.psnr._target_=metrics.image_quality.PSNR"], "'psnr' (PSNR) needs sources"),
    (["prompts=['a photo of a {}']"], "judge shapes-world captions and 'a photo of a badge' is not one"),
    (["sweep={strength:[0,1]}"], "sweep.strength is not a sampling setting"),
    (["strength=2"], "strength is set but no artifact is a slider"),
    (["prompts_file=/nonexistent.txt"], "prompts_file=/nonexistent.txt does not exist"),
    (["references=/nonexistent"], "references=/nonexistent is not a folder"),
])
def test_evaluate_bad_input_is_one_clear_line(tmp_path, overrides, message):
    proc = run_evaluate(*FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}", expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_evaluate_does_not_overwrite_a_previous_evaluation(tmp_path):
    out = tmp_path / "run"
    run_evaluate(*FAST, "metrics=none", f"hydra.run.dir={out}")
    before = snapshot(out)
    proc = run_evaluate(*FAST, "metrics=none", "seeds=[5]", f"hydra.run.dir={out}", expect_ok=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert snapshot(out) == before


def test_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes prompts\na small red circle on a gray background\n\na {} on a navy background\n")
    out = tmp_path / "run"
    run_evaluate(*FAST, "seeds=[0]", f"prompts_file={prompts}", f"hydra.run.dir={out}")
    texts = [s["text"] for s in json.loads((out / "samples.json").read_text())["samples"]]
    assert texts == ["a small red circle on a gray background", "a badge on a navy background"]


# ----- callbacks in a training run ---------------------------------------------------------------
def test_training_run_writes_sample_grids_and_evaluations(tiny_dir, image_folder, tmp_path):
    from tests.test_train import run_train

    run = tmp_path / "run"
    run_train("method=textual_inversion", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
              f"data.images_dir={image_folder / 'images'}", "callbacks.progress_bar.refresh_rate=0",
              "trainer.max_steps=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}",
              "callbacks=eval", "metrics=none", "+metrics.psnr._target_=metrics.image_quality.PSNR",
              "+metrics.ssim._target_=metrics.image_quality.SSIM", "callbacks.evaluation.pairs=class_word",
              "callbacks.evaluation.every_n_steps=2", "callbacks.evaluation.seeds=[0,1]",
              "callbacks.evaluation.num_steps=3", "callbacks.sample_grid.num_steps=3",
              "callbacks.sample_grid.sweep={guidance_scale:[1,3]}")
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.stem for g in grids] == ["step_000004"]
    legend = json.loads(grids[0].with_suffix(".json").read_text())
    assert len(legend["rows"]) == 2 * 2 and legend["columns"] == {"guidance_scale": [1, 3]}
    width, height = Image.open(grids[0]).size
    assert height == 2 * width  # 4 (prompt, seed) rows x 2 swept columns of square samples
    evaluations = json.loads((run / "metrics.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4]  # every 2 steps; the end falls on step 4 too
    assert 0 < evaluations[-1]["rows"][0]["ssim"] < 1
    logged = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "eval/psnr" in logged and "eval/ssim" in logged
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert list(checkpoint["state_dict"]) == ["tokens.rows.0.rows"]  # the metrics stay out of checkpoints
    assert not any(checkpoint["callbacks"].get(k) for k in checkpoint["callbacks"] if "Evaluation" in k)
    out = tmp_path / "eval"  # the run's own artifact, through evaluate.py
    run_evaluate("model=tiny", f"model.path={tiny_dir}", f"artifact={run}", "metrics=none", "seeds=[0]",
                 "num_steps=2", "prompts=['a photo of a {}']", f"hydra.run.dir={out}")
    names = json.loads((run / "learned_embeds.json").read_text())["names"]
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples["samples"]] == [f"a photo of a {' '.join(names)}"]
    assert samples["artifact"] == [str(run / "learned_embeds.safetensors")]


@pytest.mark.parametrize("overrides, message", [
    (["metrics=shapes"], "judge shapes-world captions and 'a photo of a object' is not one"),
    (["metrics=none"], "the evaluation callback has no metrics"),
])
def test_training_refuses_an_evaluation_it_cannot_run_before_training(tiny_dir, image_folder, tmp_path, capsys,
                                                                      overrides, message):
    from tests.test_errors import run_entry

    line = run_entry("train", ["trainer=cpu", "logger=csv", "model=tiny", f"model.path={tiny_dir}",
                               f"data.images_dir={image_folder / 'images'}", "callbacks=eval", *overrides],
                     tmp_path, capsys)
    assert message in line
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_a_run_folder_moved_elsewhere_still_evaluates(tmp_path):
    """Artifacts name their backbone portably: a run folder moved to another directory evaluates as it is."""
    import shutil

    trained = tmp_path / "trained"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "train.py", "trainer=cpu", "logger=csv", "trainer.max_steps=3",
                           "callbacks.sample_grid=null", f"hydra.run.dir={trained}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = Path(shutil.move(str(trained), str(tmp_path / "elsewhere" / "run")))
    info = json.loads((moved / "learned_embeds.json").read_text())
    assert info["backbone"] == "shapes" and info["backbone_model"] == "shapes"
    assert not any(str(tmp_path) in str(v) or str(ROOT) in str(v) for v in info.values())
    out = tmp_path / "eval"
    run_evaluate(f"artifact={moved}", "metrics=shapes_concept", *FAST, f"hydra.run.dir={out}")
    samples = json.loads((out / "samples.json").read_text())
    assert samples["artifact"] == [str(moved / "learned_embeds.safetensors")] and len(samples["samples"]) == 4


def test_sampling_callbacks_read_a_prompts_file(tmp_path):
    from callbacks.sampling import SampleGrid
    from utils.errors import ConfigError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na photo of a {}\n\na painting of a {}\n")
    grid = SampleGrid(str(tmp_path), prompts=["ignored"], prompts_file=str(prompts), class_word="cat")
    assert grid.templates == ["a photo of a {}", "a painting of a {}"]
    assert grid.texts == ["a photo of a cat", "a painting of a cat"]
    with pytest.raises(ConfigError, match=r"callbacks.\*.prompts_file=.*absent.txt does not exist"):
        SampleGrid(str(tmp_path), prompts=[], prompts_file=str(tmp_path / "absent.txt"))
