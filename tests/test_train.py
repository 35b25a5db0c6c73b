"""train.py end to end on the tiny model: artifacts, resume after a crash, multirun, DDP, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, expect_ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def base(tiny_dir, image_folder, tmp_path) -> list[str]:
    """Overrides for a fast CPU textual-inversion run on the tiny model and the test images."""
    return [
        "method=textual_inversion", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
        f"data.images_dir={image_folder / 'images'}", f"paths.log_dir={tmp_path / 'logs'}",
        "callbacks.progress_bar.refresh_rate=0", "trainer.log_every_n_steps=1",
    ]


def trained_rows(checkpoint: Path) -> torch.Tensor:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return state["tokens.rows.0.rows"]


def test_textual_inversion_artifact_loads_in_diffusers(base, tiny_dir, tmp_path):
    """The exported embedding loads with diffusers' load_textual_inversion and equals the trained row."""
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    run_train(*base, "trainer.max_steps=20", f"hydra.run.dir={run}")
    embeds = run / "learned_embeds.safetensors"
    assert embeds.is_file() and (run / "learned_embeds.json").is_file()
    rows = trained_rows(run / "checkpoints" / "last.ckpt")
    file_rows = load_file(embeds)["<concept>"]
    assert file_rows.shape == rows.shape == (1, 32)
    assert torch.equal(file_rows, rows)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    initial = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("object")].clone()
    pipe.load_textual_inversion(str(embeds))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<concept>")
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(loaded, rows[0])
    assert not torch.allclose(loaded, initial), "20 steps of training left the initializer's row unchanged"
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics
    # the files name the backbone portably: no absolute path of this machine
    info = json.loads((run / "learned_embeds.json").read_text())
    with safe_open(str(embeds), "pt") as f:
        header = f.metadata()
    for record in (info, header):
        assert record["backbone"] == "tiny" and record["backbone_model"] == tiny_dir.name
        assert len(record["backbone_fingerprint"]) == 16
        assert not any(str(v).startswith("/") or str(tmp_path) in str(v) for v in record.values()), record


def test_killed_run_resumes_to_the_same_embedding(base, tmp_path):
    """SIGKILL at step 6 (last checkpoint at step 4), resume: final rows equal an uninterrupted run's."""
    common = [*base, "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=4"]
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    run_train(*common, f"hydra.run.dir={full}")

    proc = run_train(*common, f"hydra.run.dir={crashed}", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                     "+callbacks.kill.step=6", expect_ok=False)
    assert proc.returncode != 0
    assert not (crashed / "learned_embeds.safetensors").exists()
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    run_train(*common, f"hydra.run.dir={resumed}", f"ckpt_path={last}")
    expected = load_file(full / "learned_embeds.safetensors")["<concept>"]
    got = load_file(resumed / "learned_embeds.safetensors")["<concept>"]
    assert torch.equal(got, expected)
    at_kill = trained_rows(last)
    assert not torch.equal(at_kill, expected), "the resumed run must have trained past the checkpoint"


def test_checkpoint_holds_only_trained_weights(base, tmp_path):
    run = tmp_path / "run"
    run_train(*base, "trainer.max_steps=2", f"hydra.run.dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert list(ckpt["state_dict"]) == ["tokens.rows.0.rows"]
    assert ckpt["optimizer_states"], "optimizer state is needed to resume"


def test_multirun_jobs_get_separate_dirs_and_logs(base, tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *base, "trainer.max_steps=2,3", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, steps in zip(jobs, (2, 3)):
        assert (job / "train.log").is_file() and (job / ".hydra" / "overrides.yaml").is_file()
        assert f"trainer.max_steps={steps}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert (job / "learned_embeds.safetensors").is_file()
        assert torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)["global_step"] == steps
        lines = (job / "csv" / "metrics.csv").read_text().splitlines()
        assert len(lines) >= 2, "each job writes its own metrics"


def test_ddp_two_cpu_processes_agree(base, tmp_path):
    """DDP on 2 CPU processes (gloo): ranks see different samples yet end with the same embedding."""
    run = tmp_path / "run"
    run_train(*base, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
              "trainer.max_steps=6", "data.batch_size=2", f"hydra.run.dir={run}",
              "+callbacks.dump._target_=tests.helpers.DumpTrainedRows", f"+callbacks.dump.dirpath={run}",
              timeout=400)
    r0, r1 = (torch.load(run / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["prompts"]) == len(r1["prompts"]) == 12
    assert r0["prompts"] != r1["prompts"], "ranks must train on different slices of the stream"
    assert torch.equal(r0["rows"][0], r1["rows"][0])
    exported = load_file(run / "learned_embeds.safetensors")["<concept>"]
    assert torch.equal(exported, r0["rows"][0])


def test_wandb_is_the_default_logger_and_runs_offline(base, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in base if not o.startswith("logger=")]
    run_train(*overrides, "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert list((run / "wandb").glob("offline-run-*")), "wandb must write an offline run under the run dir"
    assert not (run / "csv").exists()


def test_csv_tensorboard_and_wandb_together(base, tmp_path):
    run = tmp_path / "run"
    run_train(*base, "logger=many", "trainer.max_steps=3", f"hydra.run.dir={run}")
    assert "train/loss" in (run / "csv" / "metrics.csv").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))


def test_the_progress_bar_shows_the_loss(base, tmp_path):
    """The methods log their loss without prog_bar (Lightning would read it from the device every step); the
    bar shows it, read when the bar refreshes."""
    proc = run_train(*base, "callbacks.progress_bar.refresh_rate=2", "trainer.max_steps=4",
                     f"hydra.run.dir={tmp_path / 'run'}")
    shown = re.findall(r"4/4 \[.*?train/loss=([0-9.e+-]+)", proc.stdout)
    assert shown and all(0 < float(v) < 10 for v in shown), proc.stdout[-2000:]


@pytest.mark.parametrize("override, message", [
    (("model=sd15", "model.path=/nonexistent/sd15"), "model.path=/nonexistent/sd15 does not exist"),
    (("data.images_dir=/nonexistent/images",), "data.images_dir=/nonexistent/images is not a folder"),
    (("module.token.name=cat",), "token 'cat' is already in the tokenizer's vocabulary"),
    (("module.token.initializer='van gogh'",), "token.initializer='van gogh' is 2 tokens"),
])
def test_bad_input_is_one_clear_line(base, tmp_path, override, message):
    proc = run_train(*base, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", *override,
                     expect_ok=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_existing_run_dir_is_not_overwritten(base, tmp_path):
    run = tmp_path / "run"
    run_train(*base, "trainer.max_steps=2", f"hydra.run.dir={run}")
    before = snapshot(run)
    proc = run_train(*base, "trainer.max_steps=3", f"hydra.run.dir={run}", expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "already holds a run" in errors[0]
    assert snapshot(run) == before  # the records (.hydra/, train.log) too: nothing is written before the refusal


def test_step_timer_times_steps_after_the_warmup(tmp_path):
    """CPU marks: one time per step after `warmup`, logged as perf/step_s and summarised in timing.json."""
    import time
    from types import SimpleNamespace

    import torch

    from callbacks.throughput import StepTimer

    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), trainer=SimpleNamespace(precision="32-true"),
                             log=lambda name, value, batch_size: logged.append((name, value)))
    timer = StepTimer(str(tmp_path), warmup=2)
    for batch_idx in range(5):
        time.sleep(0.01)
        timer.on_train_batch_end(None, module, None, None, batch_idx)
    assert len(timer.times) == 3 and all(t >= 0.009 for t in timer.times)
    assert [name for name, _ in logged] == ["perf/step_s"] * 3
    # CPU tensors: Lightning would copy a float to the module's device, and on a GPU that copy waits for the GPU
    assert [value.device.type for _, value in logged] == ["cpu"] * 3
    assert [value.item() for _, value in logged] == pytest.approx(timer.times)
    timer.on_train_end(SimpleNamespace(is_global_zero=True), module)
    import json
    summary = json.loads((tmp_path / "timing.json").read_text())
    assert summary["timed_steps"] == 3 and summary["median_step_s"] >= 0.009
    assert summary["first_timed_batch"] == 2 and summary["step_s"] == [round(t, 6) for t in timer.times]


def test_resume_refuses_bad_and_foreign_checkpoints(base, tmp_path):
    """A missing, empty or corrupt file, and a checkpoint of another method or model, stop before any work with
    one line; the checkpoint records which method and model wrote it."""
    run = tmp_path / "run"
    run_train(*base, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.sample_grid=null", f"hydra.run.dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["run_identity"] == {
        "method": "textual_inversion", "model": "tiny"}
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "corrupt.ckpt").write_bytes(last.read_bytes()[:1000])
    cases = [
        ((f"ckpt_path={tmp_path / 'nope.ckpt'}",), "nope.ckpt does not exist"),
        ((f"ckpt_path={tmp_path / 'empty.ckpt'}",), "empty.ckpt is empty (0 bytes)"),
        ((f"ckpt_path={tmp_path / 'corrupt.ckpt'}",), "corrupt.ckpt cannot be read as a checkpoint"),
        (("method=prompt_slider", f"ckpt_path={last}"),
         "was written by method=textual_inversion on model=tiny; this run is method=prompt_slider on model=tiny"),
        (("model.name=tiny_other", f"ckpt_path={last}"), "this run is method=textual_inversion on model=tiny_other"),
    ]
    for i, (overrides, message) in enumerate(cases):
        slider = "method=prompt_slider" in overrides  # a slider run reads no image folder
        common = [a for a in base if not (slider and a.startswith("data.images_dir"))]
        proc = run_train(*common, "trainer.max_steps=3", *overrides, f"hydra.run.dir={tmp_path / f'r{i}'}",
                         expect_ok=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_a_checkpoint_with_other_shapes_is_refused(tiny_dir):
    from lightning_modules.textual_inversion import TextualInversionModule
    from utils.errors import ArtifactError

    module = TextualInversionModule(backbone={"path": str(tiny_dir)}, token={"name": "<c>", "initializer": None},
                                    optimizer=torch.optim.AdamW)
    module.configure_model()
    state = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    module.on_load_checkpoint({"state_dict": state})  # its own shapes load
    key = next(iter(state))
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    with pytest.raises(ArtifactError, match=f"checkpoint's {key} has shape"):
        module.on_load_checkpoint({"state_dict": state})


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(base, tmp_path):
    """SIGKILL half-way through writing step 8's last.ckpt: last.ckpt is still step 4's, whole, and resuming
    from it ends with the uninterrupted run's embedding."""
    common = [*base, "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=4",
              "callbacks.sample_grid=null"]
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    run_train(*common, f"hydra.run.dir={full}")
    # two saves per interval (step_N.ckpt, then last.ckpt): the 4th is step 8's last.ckpt
    plugin = "trainer.plugins=[{_target_:tests.helpers.KillDuringCheckpointWrite,save:4}]"
    assert run_train(*common, plugin, f"hydra.run.dir={crashed}", expect_ok=False).returncode != 0
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    assert list((crashed / "checkpoints").glob(".last.ckpt.*.tmp")), "the half-written file is left beside it"
    run_train(*common, f"hydra.run.dir={resumed}", f"ckpt_path={last}")
    assert torch.equal(load_file(resumed / "learned_embeds.safetensors")["<concept>"],
                       load_file(full / "learned_embeds.safetensors")["<concept>"])
