"""Sweeps: jobs launched through submitit, and an Optuna search returning an evaluation metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FAST_EVAL = ["callbacks.evaluation.num_steps=2", "callbacks.evaluation.seeds=[0]"]


def run_train(*overrides: str, multirun: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "train.py", *(["-m"] if multirun else []), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_submitit_local_sweep_runs_each_job_in_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("hydra/launcher=submitit_local", "experiment=ti_tiny", "trainer.max_steps=5", "seed=0,1",
                     "logger=csv", "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    embeds = []
    for job in ("0", "1"):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        runtime = yaml.safe_load((sweep / job / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
        assert config["seed"] == int(job) and Path(runtime["output_dir"]) == sweep / job
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        embeds.append(load_file(sweep / job / "learned_embeds.safetensors"))
    assert embeds[0].keys() == embeds[1].keys()
    assert any(not embeds[0][k].equal(embeds[1][k]) for k in embeds[0])  # two seeds, two separate trainings
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(logs) == 2 and len(results) == 2 and logs[0].parent != logs[1].parent


def test_optuna_search_returns_the_evaluation_metric(tmp_path):
    sweep = tmp_path / "search"
    proc = run_train("hparams_search=textual_inversion_shapes", "trainer=cpu", "trainer.max_steps=3",
                     "hydra.sweeper.n_trials=3", *FAST_EVAL, "logger=csv", "callbacks.sample_grid=null",
                     f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = [json.loads((sweep / str(i) / "metrics.json").read_text())["evaluations"][-1]["rows"][0]
              ["identity/identity"] for i in range(3)]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(scores), rel=1e-5)
    assert set(result["best_params"]) == {"module.optimizer.lr", "module.optimizer.weight_decay",
                                          "module.token.num_vectors"}
    assert 1e-4 <= result["best_params"]["module.optimizer.lr"] <= 1e-2


@pytest.mark.parametrize("overrides, message", [
    ([], "comes from the evaluation callback, which this run does not have"),     # refused before training
    (["callbacks=eval", "metrics=shapes_concept", *FAST_EVAL], "was not logged by this run (logged: "),
])
def test_an_optimized_metric_the_run_cannot_return_is_one_error_line(tmp_path, overrides, message):
    run = tmp_path / "run"
    proc = run_train("trainer=cpu", "trainer.max_steps=2", "logger=csv", "callbacks.sample_grid=null",
                     "optimized_metric=eval/nope", *overrides, f"hydra.run.dir={run}", multirun=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "optimized_metric=eval/nope" in errors[0] and "Traceback" not in proc.stderr
    assert (run / "checkpoints").exists() == bool(overrides)  # the first is refused before any work
