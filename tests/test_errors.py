"""Bad input through the entry points: one 'error: ...' line on stderr, exit code 2, nothing written, and nothing
of an earlier run touched. The catalogue runs each case in-process where the error comes from the entry point's
body, and as a subprocess where Hydra itself (composition, the run folder) finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import compose_cfg, snapshot

ROOT = Path(__file__).resolve().parents[1]
LONG = "a red circle " + " ".join(["and a blue square"] * 25)  # over 75 tokens


def run_entry(entry: str, overrides: list[str], tmp_path, capsys) -> str:
    """Run train.train / evaluate.evaluate / edit.edit in-process; return the error line after asserting exit code
    2, one `error:` line and no traceback."""
    module = __import__(entry)
    cfg = compose_cfg(entry, overrides, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        getattr(module, entry)(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def _entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2, one `error:` line on stderr that holds `message`, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----- what the catalogue reads: an earlier run, and bad inputs ----------------------------------------
@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A textual-inversion run on the tiny model as a run leaves it: its records, a checkpoint and its artifact."""
    import torch
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("logs") / "2026-01-01_00-00-00_textual_inversion"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("method_name: textual_inversion\nseed: 0\n")
    (run / ".hydra" / "overrides.yaml").write_text("- model=tiny\n")
    (run / "train.log").write_text("[train][INFO] - TextualInversionModule: 32 trainable parameters\n")
    (run / "checkpoints").mkdir()
    torch.save({"run_identity": {"method": "textual_inversion", "model": "tiny"}, "global_step": 4,
                "state_dict": {"tokens.rows.0.rows": torch.zeros(1, 32)}}, run / "checkpoints" / "last.ckpt")
    save_file({"<concept>": torch.randn(1, 32)}, str(run / "learned_embeds.safetensors"), {"token": "<concept>"})
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dir) -> Path:
    """Good and bad inputs, written once: images and masks, broken folders and files."""
    from PIL import Image, ImageDraw

    from diffusion.image_encoder import build_random_encoder

    root = tmp_path_factory.mktemp("inputs")
    for name in ("images", "masks", "empty", "small"):
        (root / name).mkdir()
    for i, bg in enumerate([(200, 200, 200), (40, 90, 160), (230, 220, 170)]):
        image, mask = Image.new("RGB", (80, 80), bg), Image.new("L", (80, 80), 0)
        ImageDraw.Draw(image).ellipse((10 + 5 * i, 12, 50 + 5 * i, 52), fill=(210, 30, 30))
        ImageDraw.Draw(mask).ellipse((10 + 5 * i, 12, 50 + 5 * i, 52), fill=255)
        image.save(root / "images" / f"{i:02d}.png")
        mask.save(root / "masks" / f"{i:02d}.png")
    Image.new("RGB", (40, 50)).save(root / "small" / "a.png")
    shutil.copytree(root / "images", root / "broken_images")
    (root / "broken_images" / "zz.png").write_bytes(b"not a png")
    shutil.copytree(root / "masks", root / "masks_missing")
    (root / "masks_missing" / "02.png").unlink()
    shutil.copytree(tiny_dir, root / "no_unet")
    shutil.rmtree(root / "no_unet" / "unet")
    encoder = build_random_encoder(root / "encoder_bad", size="tiny")
    weights = encoder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "residuals_bad").mkdir()
    (root / "residuals_bad" / "residuals.json").write_text('{"method": "residuals"}')
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + bytes(64))
    (root / "empty.safetensors").write_bytes(b"")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    (root / "afile").write_text("a file, not a folder")
    (root / "no_braces.txt").write_text("a medium badge on a gray background\n")
    return root


# ----- the catalogue ------------------------------------------------------------------------------------
# <tiny>, <in> and <run> stand for the tiny model, the inputs folder and the earlier run; BARE drops the entry
# point's common overrides (for cases that pick another model or method).
COMMON = {"train": ["trainer=cpu", "logger=csv", "model=tiny", "model.path=<tiny>"],
          "evaluate": ["model=tiny", "model.path=<tiny>", "metrics=none"],
          "edit": ["model=tiny", "model.path=<tiny>"]}
IMAGES = "data.images_dir=<in>/images"
CKPT = "ckpt_path=<run>/checkpoints/last.ckpt"
SWAP = ("edit_method=null_text_p2p", "source=a red circle", "target=a big blue circle")

IN_PROCESS = [
    # train.py: data, tokens, model folders
    ("train", ("data.images_dir=<in>/empty",), "has no images"),
    ("train", ("data.images_dir=<in>/broken_images",), "cannot read image"),
    ("train", ("data.images_dir=<in>/small",), "is 40x50, smaller than the model resolution 64"),
    ("train", (IMAGES, "data.masks_dir=<in>/masks_missing"), "no mask for 02.png"),
    ("train", (IMAGES, "data.templates=photo"), "data.templates='photo' is unknown"),
    ("train", ("data.images_dir=<in>/nothing",), "is not a folder"),
    ("train", (IMAGES, "module.token.num_vectors=0"), "num_vectors=0 must be at least 1"),
    ("train", (IMAGES, "module.token.name=cat"), "token 'cat' is already in the tokenizer's vocabulary"),
    ("train", (IMAGES, "module.token.initializer='van gogh'"), "token.initializer='van gogh' is 2 tokens"),
    ("train", ("BARE", "trainer=cpu", "logger=csv", "model=sd15", "model.path=<in>/no_unet", IMAGES),
     "model.path=<in>/no_unet has no unet/; point it at a diffusers-format Stable Diffusion folder"),
    # train.py: settings checked before any work
    ("train", ("module.optimizer.lr=-1",), "module.optimizer.lr=-1 must be a finite number > 0"),
    ("train", ("module.optimizer.lr=nan",), "module.optimizer.lr=nan must be a finite number > 0"),
    ("train", ("module.optimizer.lr=inf",), "module.optimizer.lr=inf must be a finite number > 0"),
    ("train", ("module.optimizer.lr=abc",), "module.optimizer.lr='abc' must be a finite number > 0"),
    ("train", ("BARE", "method=pretrain", "trainer=cpu", "logger=csv", "module.lr_unet=0"),
     "module.lr_unet=0 must be a finite number > 0"),
    ("train", ("seed=abc",), "seed='abc' must be a whole number"),
    ("train", ("data.batch_size=0",), "data.batch_size=0 must be a whole number >= 1"),
    ("train", ("data.resolution=0",), "data.resolution=0 must be a whole number >= 1"),
    ("train", ("trainer.max_steps=abc",), "trainer.max_steps='abc' must be a whole number >= 1"),
    ("train", ("callbacks.model_checkpoint.every_n_train_steps=-5",), "every_n_train_steps=-5 must be a whole number"),
    ("train", ("callbacks.non_finite.mode=sometimes",), "callbacks.non_finite.mode='sometimes' is unknown"),
    ("train", ("callbacks.non_finite.max_consecutive_skips=-1",),
     "callbacks.non_finite.max_consecutive_skips=-1 must be a whole number >= 0"),
    # train.py: checkpoints to resume from
    ("train", ("ckpt_path=<in>/none.ckpt",), "none.ckpt does not exist"),
    ("train", ("ckpt_path=<in>/empty.ckpt",), "empty.ckpt is empty (0 bytes)"),
    ("train", ("ckpt_path=<in>/corrupt.safetensors",), "corrupt.safetensors cannot be read as a checkpoint"),
    ("train", ("method=prompt_slider", CKPT),
     "was written by method=textual_inversion on model=tiny; this run is method=prompt_slider on model=tiny"),
    ("train", ("model.name=tiny_other", CKPT), "this run is method=textual_inversion on model=tiny_other"),
    # train.py: StyleDiffusion's images and encoder
    ("train", ("method=style_diffusion", IMAGES), "prompts.json does not exist"),
    ("train", ("method=style_diffusion", "module.image_encoder.path=<in>/encoder_bad",
               "module.image_encoder.build=null"),
     "module.image_encoder.path=<in>/encoder_bad is not a loadable CLIP vision model"),
    # evaluate.py: generation settings
    ("evaluate", ("seeds=abc",), "seeds='abc' must be a whole number or a list of them"),
    ("evaluate", ("seeds=[0,x]",), "must be a whole number or a list of them"),
    ("evaluate", ("num_steps=0",), "num_steps=0 must be a whole number >= 1"),
    ("evaluate", ("guidance_scale=abc",), "guidance_scale='abc' must be a finite number"),
    ("evaluate", ("batch_size=0",), "batch_size=0 must be a whole number >= 1"),
    ("evaluate", ("devices=0",), "devices=0 must be a whole number >= 1"),
    ("evaluate", ("device=tpu",), "device='tpu' is unknown; use auto, cpu or cuda"),
    ("evaluate", ("strength=2",), "strength is set but no artifact is a slider"),
    ("evaluate", ("sweep={strength:[0,1]}",), "sweep.strength is not a sampling setting"),
    ("evaluate", ("prompts_file=<in>/none.txt",), "prompts_file=<in>/none.txt does not exist"),
    # evaluate.py: artifacts
    ("evaluate", ("artifact=<in>/none.safetensors",), "none.safetensors does not exist"),
    ("evaluate", ("artifact=<in>/corrupt.safetensors",), "artifact=<in>/corrupt.safetensors is not a readable"),
    ("evaluate", ("artifact=<in>/empty.safetensors",), "artifact=<in>/empty.safetensors is not a readable"),
    ("evaluate", ("artifact=<run>/train.log",), "artifact=<run>/train.log is not a readable safetensors file"),
    ("evaluate", ("artifact=<in>/residuals_bad",), "residuals.json is not the residuals.json a run writes (no file)"),
    ("evaluate", ("BARE", "model=shapes", "metrics=none", "artifact=<run>"),
     "vectors of size 32 do not fit text encoder 0 (size 256); the file was trained on another model"),
    ("evaluate", ("artifact=<run>", "prompts=[a red circle]"),
     "prompts: prompt 'a red circle' has no '{}' where the artifact's token goes"),
    ("evaluate", ("artifact=<run>", "prompts_file=<in>/no_braces.txt"), "no_braces.txt: prompt 'a medium badge"),
    # edit.py
    ("edit", ("num_steps=abc",), "num_steps='abc' must be a whole number >= 1"),
    ("edit", ("edit_method=sdedit", "edit_method.strength=abc"), "strength='abc' must be a number in [0, 1]"),
    ("edit", ("edit_method=sdedit", "edit_method.strength=1.5"), "strength=1.5 must be a number in [0, 1]"),
    ("edit", ("seed=x",), "seed='x' must be a whole number >= 0"),
    ("edit", ("device=tpu",), "device='tpu' is unknown"),
    ("edit", ("image=<in>/none.png",), "image=<in>/none.png does not exist"),
    ("edit", ("edit_method=sdedit", "image=<in>/text.png"), "cannot read image <in>/text.png"),
    ("edit", ("target=''",), "target is empty"),
    ("edit", ("edit_method=null_text_p2p", "edit_method.tau_c=abc"), "tau_c='abc' must be a number in [0, 1]"),
    ("edit", ("edit_method.editing.tau_v=2",), "edit_method.editing.tau_v=2 must be a number in [0, 1]"),
    ("edit", ("edit_method.controller=swap",), "controller='swap' is unknown"),
    ("edit", (*SWAP, "edit_method.controller=replace"),
     "controller=replace swaps words one for one, but source has 3 words"),
    ("edit", ("edit_method=null_text_p2p", f"target={LONG}"), "more than the 75 the text encoder reads"),
    ("edit", ("edit_method=null_text_p2p", "edit_method.blend_words=[red,green]"),
     "blend word 'red' is not in the source prompt"),
    ("edit", ("edit_method.image_encoder.path=<in>/encoder_bad", "edit_method.image_encoder.build=null"),
     "image_encoder.path=<in>/encoder_bad is not a loadable CLIP vision model"),
    ("edit", ("BARE", "model=sd15", "model.path=<in>/no_unet", "edit_method=sdedit"), "has no unet/"),
]

SUBPROCESS = [
    ("train", ("method=nope",), "Could not find 'method/nope'; available options in 'method': concept_slider"),
    ("train", ("model=nope",), "Could not find 'model/nope'"),
    ("train", ("logger=nope",), "Could not find 'logger/nope'"),
    ("train", ("module.optimzer.lr=1",), "Could not override 'module.optimzer.lr'"),
    ("train", ("trainer=gpu",), "trainer=gpu but this machine has no CUDA GPU"),
    ("train", ("logger=csv", "hydra.run.dir=<in>/afile/run"), "Not a directory"),
    ("train", ("logger=csv", "hydra.run.dir=<in>/afile"), "File exists"),
    ("train", ("hydra.run.dir=<run>",), "already holds a run (checkpoints); choose a new hydra.run.dir or resume"),
    ("evaluate", ("metrics=nope",), "Could not find 'metrics/nope'"),
    ("evaluate", ("hydra.run.dir=<run>",), "<run> already holds a run (checkpoints); choose a new hydra.run.dir"),
    ("edit", ("model=nope",), "Could not find 'model/nope'"),
    ("edit", ("edit_method=nope",),
     "Could not find 'edit_method/nope'; available options in 'edit_method': ddim_word_swap, flow_p2p, "
     "negative_prompt_p2p"),
    ("edit", ("hydra.run.dir=<run>",), "<run> already holds a run (checkpoints); choose a new hydra.run.dir"),
]


def _case_id(case) -> str:
    entry, args, _ = case
    return f"{entry}:{' '.join(a for a in args if a != 'BARE')}"[:80]


def _fill(items, tiny: Path, inputs: Path, run: Path) -> list[str]:
    swap = {"<tiny>": str(tiny), "<in>": str(inputs), "<run>": str(run)}
    out = []
    for item in items:
        for marker, value in swap.items():
            item = item.replace(marker, value)
        out.append(item)
    return out


def _written(folder: Path) -> list[Path]:
    """Results a refused run must not leave: checkpoints, weights, images, metrics, edits."""
    return [p for p in folder.rglob("*") if p.suffix in (".ckpt", ".safetensors", ".png") or
            p.name in ("metrics.json", "edit.json")]


@pytest.mark.parametrize("case", IN_PROCESS, ids=[_case_id(c) for c in IN_PROCESS])
def test_bad_input_in_process(case, tiny_dir, inputs, earlier_run, tmp_path, capsys):
    entry, args, message = case
    before = snapshot(earlier_run), snapshot(inputs)
    common = [] if args[0] == "BARE" else COMMON[entry]
    overrides = _fill([*common, *(a for a in args if a != "BARE")], tiny_dir, inputs, earlier_run)
    line = run_entry(entry, overrides, tmp_path, capsys)
    assert _fill([message], tiny_dir, inputs, earlier_run)[0] in line, line
    assert not _written(tmp_path)
    assert (snapshot(earlier_run), snapshot(inputs)) == before


@pytest.mark.parametrize("case", SUBPROCESS, ids=[_case_id(c) for c in SUBPROCESS])
def test_bad_input_as_a_command(case, tiny_dir, inputs, earlier_run, tmp_path):
    entry, args, message = case
    if "trainer=gpu" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = snapshot(earlier_run), snapshot(inputs)
    args = _fill(args, tiny_dir, inputs, earlier_run)
    run_dir = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _entry(f"{entry}.py", *args, *run_dir, cwd=ROOT)
    assert_one_error(proc, _fill([message], tiny_dir, inputs, earlier_run)[0])
    assert not _written(tmp_path)
    assert (snapshot(earlier_run), snapshot(inputs)) == before


def test_the_catalogue_covers_every_entry_point():
    cases = {(entry, tuple(args)) for entry, args, _ in IN_PROCESS + SUBPROCESS}
    assert len(cases) == len(IN_PROCESS) + len(SUBPROCESS) >= 40
    assert {entry for entry, _ in cases} == {"train", "evaluate", "edit"}


# ----- divergence ---------------------------------------------------------------------------------------
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


def _skip_run(tiny_dir, image_folder, *extra: str) -> list[str]:
    return ["trainer=cpu", "logger=csv", "model=tiny", f"model.path={tiny_dir}", "callbacks.sample_grid=null",
            f"data.images_dir={image_folder / 'images'}", "callbacks.non_finite.mode=skip", *extra]


def test_skip_mode_skips_a_one_off_bad_step(tiny_dir, image_folder, tmp_path, caplog):
    """A NaN gradient at step 3 under mode=skip: that step changes nothing, it is named and counted, and the run
    ends with finite weights."""
    import torch
    from safetensors.torch import load_file

    import train

    out = tmp_path / "out"
    cfg = compose_cfg("train", _skip_run(tiny_dir, image_folder, "trainer.max_steps=6", "trainer.log_every_n_steps=1",
                                         "+callbacks.nan._target_=tests.helpers.InjectNaN", "+callbacks.nan.step=3",
                                         f"+callbacks.nan.dirpath={tmp_path}"), out)
    with caplog.at_level("WARNING"):
        train.train(cfg)
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        "step 3: the loss or a gradient is NaN or infinite; its update is skipped (1 skipped in all, 1 in a row)"]
    weights = torch.load(tmp_path / "nan_step.pt")
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"], strict=True))
    embedding = load_file(out / "learned_embeds.safetensors")["<concept>"]
    assert torch.isfinite(embedding).all() and not torch.equal(embedding, weights["after"][0])  # steps 4-6 trained
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]["NonFiniteGuard"] == {
        "skipped": 1, "consecutive": []}
    assert "train/skipped_steps" in (out / "csv" / "metrics.csv").read_text()


def test_skip_mode_stops_after_too_many_bad_steps_in_a_row(tiny_dir, image_folder, tmp_path, capsys):
    """lr=1e30 (lr=inf is refused before any work) makes the weights non-finite at once: every later step is
    skipped, and the fourth in a row ends the run with one line."""
    overrides = _skip_run(tiny_dir, image_folder, "trainer.max_steps=30", "module.optimizer.lr=1e30",
                          "callbacks.non_finite.max_consecutive_skips=3")
    line = run_entry("train", overrides, tmp_path, capsys)
    assert "at 4 steps in a row" in line and "more than callbacks.non_finite.max_consecutive_skips=3" in line
    assert not list((tmp_path / "out").rglob("*.safetensors")) and not list((tmp_path / "out").rglob("*.ckpt"))

