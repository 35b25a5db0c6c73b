"""What an offline wandb run holds: the evaluation table, the sample grid with its legend, the artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offline_wandb_run_holds_the_table_grid_and_artifact(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "train.py", "trainer=cpu", "trainer.max_steps=3", "logger=wandb", "callbacks=eval",
         "metrics=shapes_concept", "callbacks.evaluation.num_steps=2", "callbacks.evaluation.seeds=[0]",
         "callbacks.sample_grid.num_steps=2", f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = (run / "wandb").glob("offline-run-*")

    (table_file,) = (offline / "files" / "media" / "table" / "eval").glob("table_*.table.json")
    table = json.loads(table_file.read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    scored = json.loads((run / "metrics.json").read_text())["evaluations"][-1]["rows"][0]
    assert len(table["data"]) == 1 and row["step"] == 3
    assert row["identity/identity"] == scored["identity/identity"]

    assert len(list((offline / "files" / "media" / "images").glob("samples_*.png"))) == 1
    (record_file,) = offline.glob("run-*.wandb")
    record = record_file.read_bytes()
    assert b"rows: 0: prompt=a medium <concept>" in record and b"on a white background; 1: prompt=" in record
    assert b"columns: seed = 0, 1" in record
    assert b"textual_inversion-" in record and b"learned_embeds.safetensors" in record  # the artifact


def test_wandb_table_takes_a_sweep_with_its_over_the_sweep_row(monkeypatch):
    """A swept evaluation's rows hold the values (numbers) and "all" (metrics over the sweep) in one column."""
    import types

    from utils import loggers

    logged = []
    run = types.SimpleNamespace(log=lambda data, step: logged.append(data))
    monkeypatch.setattr(loggers, "wandb_runs", lambda trainer: [run])
    rows = [{"step": 3, "strength": 0, "attributes/shape": 1.0}, {"step": 3, "strength": 3, "attributes/shape": 0.5},
            {"step": 3, "strength": "all", "size_slope/spearman": 0.9}]
    loggers.log_wandb_table(types.SimpleNamespace(global_step=3), "eval/table", rows)
    (table,) = [data["eval/table"] for data in logged]
    assert [row[1] for row in table.data] == ["0", "3", "all"] and table.data[2][3] == 0.9


def test_artifact_files_keep_their_folders(tmp_path, monkeypatch):
    """An inversion run exports one mapping_networks.safetensors per image: the artifact names each by its path
    under the run folder, so they do not collide."""
    import utils.loggers as loggers

    logged = []

    class Run:
        id = "run0"

        def log_artifact(self, artifact):
            logged.append(artifact)

    paths = []
    for stem in ("00", "01"):
        folder = tmp_path / "style_diffusion" / stem
        folder.mkdir(parents=True)
        for name in ("mapping_networks.safetensors", "style_diffusion.json"):
            (folder / name).write_text(stem)
            paths.append(folder / name)
    monkeypatch.setattr(loggers, "wandb_runs", lambda trainer: [Run()])
    loggers.log_wandb_artifact(None, paths, name="style_diffusion", kind="model", root=tmp_path)
    entries = set(logged[0].manifest.entries)
    assert entries == {f"style_diffusion/{stem}/{name}" for stem in ("00", "01")
                       for name in ("mapping_networks.safetensors", "style_diffusion.json")}
