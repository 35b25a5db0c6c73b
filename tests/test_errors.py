"""Bad input through the entry points: one 'error: ...' line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import compose_cfg


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
