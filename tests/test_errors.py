"""Bad input through the entry points: one 'error: ...' line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def run_entry(entry: str, overrides: list[str], tmp_path, capsys) -> str:
    """Run train.train / evaluate.evaluate in-process; return the error line after asserting exit code 2."""
    module = __import__(entry)
    cfg = compose_cfg(entry, overrides, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        getattr(module, entry)(cfg)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def empty_folder(tmp, images):
    (tmp / "empty").mkdir()
    return [f"data.images_dir={tmp / 'empty'}"], "has no images"


def unreadable_image(tmp, images):
    (images / "images" / "zz.png").write_bytes(b"not a png")
    return [f"data.images_dir={images / 'images'}"], "cannot read image"


def too_small_image(tmp, images):
    from PIL import Image

    (tmp / "small").mkdir()
    Image.new("RGB", (40, 50)).save(tmp / "small" / "a.png")
    return [f"data.images_dir={tmp / 'small'}"], "is 40x50, smaller than the model resolution 64"


def missing_mask(tmp, images):
    shutil.copytree(images / "masks", tmp / "masks2")
    (tmp / "masks2" / "02.png").unlink()
    return [f"data.images_dir={images / 'images'}", f"data.masks_dir={tmp / 'masks2'}"], "no mask for 02.png"


def unknown_templates(tmp, images):
    return [f"data.images_dir={images / 'images'}", "data.templates=photo"], "data.templates='photo' is unknown"


def zero_vectors(tmp, images):
    return [f"data.images_dir={images / 'images'}", "module.token.num_vectors=0"], "num_vectors=0 must be at least 1"


@pytest.mark.parametrize("case", [empty_folder, unreadable_image, too_small_image, missing_mask, unknown_templates,
                                  zero_vectors], ids=lambda f: f.__name__)
def test_train_rejects_bad_input(case, tiny_dir, image_folder, tmp_path, capsys):
    overrides, message = case(tmp_path, image_folder)
    overrides = ["trainer=cpu", "logger=csv", "model=tiny", f"model.path={tiny_dir}", *overrides]
    assert message in run_entry("train", overrides, tmp_path, capsys)
    assert not list((tmp_path / "out").rglob("*.ckpt")) and not list((tmp_path / "out").rglob("*.safetensors"))


def test_train_rejects_a_model_folder_without_unet(tiny_dir, image_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    line = run_entry("train", ["model=sd15", f"model.path={broken}", f"data.images_dir={image_folder / 'images'}"],
                     tmp_path, capsys)
    assert line == (f"error: model.path={broken} has no unet/; point it at a diffusers-format Stable Diffusion "
                    f"folder")


def test_evaluate_rejects_a_missing_artifact(tiny_dir, tmp_path, capsys):
    line = run_entry("evaluate", ["model=tiny", f"model.path={tiny_dir}", "metrics=none",
                                  f"artifact={tmp_path / 'nope.safetensors'}"],
                     tmp_path, capsys)
    assert "nope.safetensors does not exist" in line


# ----- settings checked before any work, Hydra's own errors, divergence ------------------------------
@pytest.mark.parametrize("override, message", [
    ("module.optimizer.lr=-1", "module.optimizer.lr=-1 must be a finite number > 0"),
    ("module.optimizer.lr=nan", "module.optimizer.lr=nan must be a finite number > 0"),
    ("module.optimizer.lr=inf", "module.optimizer.lr=inf must be a finite number > 0"),
    ("module.optimizer.lr=abc", "module.optimizer.lr='abc' must be a finite number > 0"),
    ("seed=abc", "seed='abc' must be a whole number"),
    ("data.batch_size=0", "data.batch_size=0 must be a whole number >= 1"),
    ("data.resolution=0", "data.resolution=0 must be a whole number >= 1"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc' must be a whole number >= 1"),
    ("callbacks.model_checkpoint.every_n_train_steps=-5", "every_n_train_steps=-5 must be a whole number >= 0"),
])
def test_train_checks_numeric_settings_before_any_work(override, message, tiny_dir, image_folder, tmp_path, capsys):
    overrides = ["trainer=cpu", "logger=csv", "model=tiny", f"model.path={tiny_dir}",
                 f"data.images_dir={image_folder / 'images'}", override]
    assert message in run_entry("train", overrides, tmp_path, capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_method_learning_rate_of_its_own_is_checked(tmp_path, capsys):
    line = run_entry("train", ["method=pretrain", "trainer=cpu", "logger=csv", "module.lr_unet=0"], tmp_path, capsys)
    assert "module.lr_unet=0 must be a finite number > 0" in line


def _entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2, one `error:` line on stderr that holds `message`, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("train.py", "method=nope"), "Could not find 'method/nope'; available options in 'method': concept_slider"),
    (("train.py", "model=nope"), "Could not find 'model/nope'"),
    (("train.py", "logger=nope"), "Could not find 'logger/nope'"),
    (("train.py", "module.optimzer.lr=1"), "Could not override 'module.optimzer.lr'"),
    (("train.py", "trainer=gpu"), "trainer=gpu but this machine has no CUDA GPU"),
    (("evaluate.py", "metrics=nope"), "Could not find 'metrics/nope'"),
    (("edit.py", "model=nope"), "Could not find 'model/nope'"),
])
def test_hydra_errors_are_one_line(args, message, tmp_path):
    if "trainer=gpu" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _entry(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT)
    assert_one_error(proc, message)


@pytest.mark.parametrize("folder, message", [("afile/run", "Not a directory"), ("afile", "File exists")])
def test_an_unwritable_run_folder_is_refused_before_any_work(folder, message, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    proc = _entry("train.py", "logger=csv", f"hydra.run.dir={tmp_path / folder}", cwd=ROOT)
    assert_one_error(proc, message)
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_a_diverging_run_stops_with_one_line_and_exports_nothing(tiny_dir, image_folder, tmp_path):
    proc = _entry("train.py", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
                  f"data.images_dir={image_folder / 'images'}", "trainer.max_steps=30", "module.optimizer.lr=1e30",
                  "callbacks.sample_grid=null", f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT)
    assert_one_error(proc, "became NaN or infinite at step")
    assert not list((tmp_path / "run").rglob("*.safetensors")) and not list((tmp_path / "run").rglob("*.ckpt"))


def test_the_guard_keeps_checkpoints_before_the_first_bad_step():
    """Finite steps pass every read; after a NaN the next read (a save, an export) raises naming that step."""
    from types import SimpleNamespace

    import torch

    from callbacks.non_finite import NonFiniteGuard, TrainingDiverged, ensure_finite

    guard = NonFiniteGuard(every_n_steps=0)
    trainer = SimpleNamespace(global_step=0, callbacks=[guard])
    for step, loss in enumerate([0.5, 0.4, 0.3], start=1):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    guard.on_save_checkpoint(trainer, None, {})  # a checkpoint at step 3 is written
    trainer.global_step = 4
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 4)
    trainer.global_step = 5
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.2)}, None, 5)
    with pytest.raises(TrainingDiverged, match="at step 4"):
        guard.on_save_checkpoint(trainer, None, {})
    with pytest.raises(TrainingDiverged, match="at step 4"):
        ensure_finite(trainer)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    optimizer.param_groups[0]["params"][0].grad = torch.tensor([1.0, float("inf")])
    fresh = NonFiniteGuard(every_n_steps=0)
    fresh.on_before_optimizer_step(SimpleNamespace(global_step=6), None, optimizer)
    with pytest.raises(TrainingDiverged, match="at step 7"):
        fresh.check()


@pytest.mark.parametrize("args, message", [
    (("evaluate.py", "seeds=abc"), "seeds='abc' must be a whole number or a list of them"),
    (("evaluate.py", "seeds=[0,x]"), "must be a whole number or a list of them"),
    (("evaluate.py", "num_steps=0"), "num_steps=0 must be a whole number >= 1"),
    (("evaluate.py", "guidance_scale=abc"), "guidance_scale='abc' must be a finite number"),
    (("evaluate.py", "batch_size=0"), "batch_size=0 must be a whole number >= 1"),
    (("evaluate.py", "devices=0"), "devices=0 must be a whole number >= 1"),
    (("edit.py", "num_steps=abc"), "num_steps='abc' must be a whole number >= 1"),
    (("edit.py", "strength=abc"), "strength='abc' must be a number in [0, 1]"),
    (("edit.py", "strength=1.5"), "strength=1.5 must be a number in [0, 1]"),
    (("edit.py", "seed=x"), "seed='x' must be a whole number >= 0"),
])
def test_generation_settings_are_checked_before_any_work(args, message, tmp_path):
    edit = ("image=assets/shapes_scenes/00.png", "source=a red circle on a gray background",
            "target=a blue circle on a gray background", "method=sdedit") if args[0] == "edit.py" else ()
    proc = _entry(*args, *edit, f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT)
    assert_one_error(proc, message)
    assert not list((tmp_path / "run").glob("*.png")) and not list((tmp_path / "run").glob("*.json"))
