"""diffusion.artifacts: runs recognised by their info file, one-line errors, a set that fills and composes, and an
EM run through evaluate.py (the other kinds' evaluate.py tests live with their methods' tests)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffusion.artifacts import (ArtifactSet, EMConcepts, Residuals, Slider, TextualInversion, check_settings,
                                 load_artifact, read_artifact)
from tests.test_evaluation import run_evaluate
from tests.test_train import run_train
from utils.errors import ArtifactError, ConfigError


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from datamodules.shapes.scenes import write_scene_set

    return write_scene_set(tmp_path_factory.mktemp("scenes") / "scenes", count=2, resolution=64)


def embedding_file(path, token: str = "<c>"):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: torch.randn(1, 32)}, str(path), {"token": token})
    return path


def run_folder(tmp_path, name: str, info: dict, files=("learned_embeds.safetensors",)):
    run = tmp_path / name
    for file in files:
        embedding_file(run / file)
    (run / info.pop("info_file")).write_text(json.dumps(info))
    return run


def test_each_kind_is_known_by_its_info_file(tmp_path):
    bare = embedding_file(tmp_path / "bare" / "mine.safetensors")
    ti = run_folder(tmp_path, "ti", {"info_file": "learned_embeds.json", "method": "textual_inversion",
                                     "file": "learned_embeds.safetensors"})
    slider = run_folder(tmp_path, "slider", {"info_file": "slider.json", "method": "prompt_slider",
                                             "file": "learned_embeds.safetensors"})
    em = run_folder(tmp_path, "em", {"info_file": "concepts.json", "method": "em_mask", "weights": None,
                                     "tokens": {"<a>": "tokens/a.safetensors"}}, files=("tokens/a.safetensors",))
    assert read_artifact(bare).kind is TextualInversion and read_artifact(bare).file == bare
    assert read_artifact(ti).kind is TextualInversion and read_artifact(ti).file == ti / "learned_embeds.safetensors"
    assert read_artifact(slider / "learned_embeds.safetensors").kind is Slider  # a file in the run: its run's kind
    assert read_artifact(em).kind is EMConcepts and read_artifact(em).file == em / "concepts.json"


def test_bad_runs_are_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    unknown = run_folder(tmp_path, "unknown", {"info_file": "slider.json", "method": "nope", "file": "x"})
    em = run_folder(tmp_path, "em", {"info_file": "concepts.json", "method": "em_mask", "weights": "unet",
                                     "tokens": {"<a>": "tokens/a.safetensors"}}, files=("tokens/a.safetensors",))
    cases = [(tmp_path / "none", "artifact=" + str(tmp_path / "none") + " does not exist; give a run's"),
             (tmp_path / "empty", "holds no artifact (none of slider.json, residuals.json, concepts.json"),
             (unknown, "names method 'nope', not an artifact kind this loader knows; give a run of prompt_slider"),
             (em, f"{em / 'unet'} does not exist though concepts.json names it; copy the whole run folder")]
    for path, message in cases:
        with pytest.raises(ArtifactError) as error:
            read_artifact(path)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_em_token_choice_and_settings_checks(tmp_path):
    info = {"tokens": {"<a>": "a", "<b>": "b"}}
    assert EMConcepts.chosen(info, "a") == "<a>" and EMConcepts.chosen(info, "<b>") == "<b>"
    EMConcepts.check_prompts(info, ["a <a> next to a <b>"], "prompts", None)  # tokens named: no choice needed
    with pytest.raises(ConfigError, match=r"prompts: prompt 'a \{\}' has a '\{\}'.*one of <a>, <b>"):
        EMConcepts.check_prompts(info, ["a {}"], "prompts", None)
    with pytest.raises(ConfigError, match="token=c is not a concept token"):
        EMConcepts.check_prompts(info, [], "prompts", "c")
    runs = {kind: read_artifact(run_folder(tmp_path, kind.__name__, {"info_file": kind.info_file,
                                                                      "method": kind.methods[0],
                                                                      "file": "learned_embeds.safetensors"}))
            for kind in (TextualInversion, Slider)}
    with pytest.raises(ConfigError, match="several artifacts fill one"):
        check_settings([runs[TextualInversion]] * 2)
    with pytest.raises(ConfigError, match="strength has 2 values for 1 sliders"):
        check_settings([runs[Slider], runs[TextualInversion]], strength=[1, 2])
    with pytest.raises(ConfigError, match="give a method=residuals run"):
        check_settings([runs[Slider]], lag=True)
    assert Residuals.settings == ("strength", "lag")


def test_a_set_fills_the_brace_then_appends_sliders(tiny, tmp_path):
    slider = run_folder(tmp_path, "slider", {"info_file": "slider.json", "method": "prompt_slider",
                                             "file": "learned_embeds.safetensors", "token": "<age>"})
    concept = embedding_file(tmp_path / "ti" / "learned_embeds.safetensors", "<sun>")
    loaded = ArtifactSet([load_artifact(tiny, slider), load_artifact(tiny, concept)])
    assert loaded.fill("a  photo of a {}", "dog") == "a photo of a <sun> <age>"
    assert ArtifactSet([load_artifact(tiny, slider)]).fill("a photo of a {}", "dog") == "a photo of a dog <age>"
    with loaded.applied(["a photo of a <sun> <age>"], strength=[0.5]) as hub:
        assert hub is None and loaded.artifacts[0].slider.strength == 0.5
    assert loaded.artifacts[0].slider.strength is None


def test_evaluate_an_em_run_with_its_tokens_and_fine_tuned_unet(tiny_dir, scenes_dir, tmp_path):
    """evaluate.py loads an em_mask run's tokens and joint-stage UNet; '{}' reads the concept named by token=."""
    from diffusers import UNet2DConditionModel

    from diffusion.backbone import load_backbone

    run = tmp_path / "run"
    run_train("method=em_mask", "model=tiny", f"model.path={tiny_dir}", "trainer=cpu", "logger=csv",
              f"data.scenes_dir={scenes_dir}", "module.em.steps=2", "module.em.every=2", "module.em.timesteps=1",
              "module.em.update_timesteps=1", "module.joint.steps=1", "module.joint.weights=full",
              "module.joint.lr=1e-2", "callbacks.sample_grid=null", f"hydra.run.dir={run}")
    assert json.loads((run / "concepts.json").read_text())["weights"] == "unet"
    backbone, plain = load_backbone(str(tiny_dir)), load_backbone(str(tiny_dir))
    artifact = load_artifact(backbone, run, token="<s00_c1>")
    tuned = UNet2DConditionModel.from_pretrained(run / "unet").state_dict()
    assert all(torch.equal(v, tuned[k]) for k, v in backbone.unet.state_dict().items())
    assert not all(torch.equal(v, tuned[k]) for k, v in plain.unet.state_dict().items())  # the joint stage trained it
    assert artifact.fill("a {} on a white background", "object") == "a <s00_c1> on a white background"

    common = ["model=tiny", f"model.path={tiny_dir}", f"artifact={run}", "metrics=none", "seeds=[0]", "num_steps=2"]
    out = tmp_path / "eval"
    run_evaluate(*common, "token=s00_c1", "prompts=['a {} on a white background', 'a <s01_c0> left of a <s01_c1>']",
                 f"hydra.run.dir={out}")
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples["samples"]] == ["a <s00_c1> on a white background",
                                                         "a <s01_c0> left of a <s01_c1>"]
    assert samples["artifact"] == [str(run / "concepts.json")]
    for overrides, message in ((["prompts=['a {}']"], "choose the one it stands for with token=<name> (one of "
                                                       "<s00_bg>, <s00_c0>, <s00_c1>, <s01_bg>, <s01_c0>, <s01_c1>)"),
                               (["token=nope"], "token=nope is not a concept token of this em_mask run")):
        proc = run_evaluate(*common, *overrides, f"hydra.run.dir={tmp_path / 'refused'}", expect_ok=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
