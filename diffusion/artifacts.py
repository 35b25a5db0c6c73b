"""One loader for every method's artifact: `read_artifact(path)` recognises a run by its info JSON (no model
needed, so a bad config fails first); `load_artifact(backbone, path)` adds it to a backbone and returns an
object with one interface: `fill(prompt, class_word)`, `applied(prompts, strength=, lag=)`, `fills_token`,
`settings`. `ArtifactSet` composes several (one fills '{}', sliders append and compose). Kinds, by info
file: learned_embeds.json (textual inversion; a bare diffusers .safetensors too), slider.json (prompt / visual
/ concept sliders), residuals.json, concepts.json (EM concept tokens and their joint-stage weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from diffusion.residuals import read_residual_info
from diffusion.sliders import SliderSet, read_slider_info
from diffusion.tokens import fill_template
from utils.errors import ArtifactError, ConfigError
from utils.io import check_safetensors, read_info_beside

EMBEDDINGS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class ArtifactInfo:
    kind: type["Artifact"]
    file: Path    # what names the artifact (the path given, or the run's main file)
    folder: Path  # the run folder its info file names files in
    info: dict


class Artifact:
    """The common interface; the defaults are a kind that neither fills '{}' nor takes a setting."""
    methods: tuple[str, ...] = ()
    info_file = ""
    fills_token = False           # stands for the prompts' '{}' (at most one artifact may)
    needs_braces = False          # every prompt must hold that '{}'
    word: str | None = None       # what fills '{}' once loaded
    settings: tuple[str, ...] = ()  # sampling settings it takes besides the generation ones
    composes = False              # takes one value of a strength list (sliders); else a strength is one number
    slider = None                 # a diffusion.sliders slider, for the set's prompt encoder

    def __init__(self, info: ArtifactInfo):
        self.info = info

    @classmethod
    def read_info(cls, path: Path) -> dict | None:
        return read_info_beside(path, cls.info_file, required=("method", "file"))

    @classmethod
    def main_file(cls, info: dict, folder: Path) -> Path:
        return folder / info["file"]

    @classmethod
    def files(cls, info: dict, folder: Path) -> list[Path]:
        """The safetensors files a load reads, checked before any model is."""
        return [folder / info["file"]]

    @classmethod
    def check_prompts(cls, info: dict, templates: Sequence[str], key: str, token: str | None) -> None:
        """Refuse prompts (or a token choice) this kind cannot fill; `key` names where the prompts came from."""
        for template in templates if cls.needs_braces else ():
            if "{}" not in template:
                raise ConfigError(f"{key}: prompt {template!r} has no '{{}}' where the artifact's token goes; write "
                                  f"'{{}}' in every prompt (e.g. 'a photo of a {{}}')")

    def fill(self, prompt: str, class_word: str) -> str:
        return prompt if self.word is None else fill_template(prompt, self.word)

    def applied(self, prompts: Sequence[str], strength=None, lag: bool = False):
        """Inside the block the artifact acts at these settings; yields an attention hub for the sampler, or None."""
        return contextlib.nullcontext()


class TextualInversion(Artifact):
    methods, info_file, fills_token, needs_braces = ("textual_inversion",), "learned_embeds.json", True, True

    def load(self, backbone, token: str | None = None) -> None:
        from diffusion.tokens import load_embeddings

        self.word = " ".join(load_embeddings(backbone, self.info.file, token=token))

    def __str__(self):
        return f"{self.word} from {self.info.file}"


class Slider(Artifact):
    methods, info_file, settings, composes = ("prompt_slider", "concept_slider"), "slider.json", ("strength",), True

    read_info = staticmethod(read_slider_info)

    def load(self, backbone, token=None) -> None:
        from diffusion.sliders import load_slider

        self.slider = load_slider(backbone, self.info.file)

    def fill(self, prompt, class_word):
        return self.slider.prompt(prompt)

    def applied(self, prompts, strength=None, lag=False):
        return SliderSet([self.slider]).strengths(strength)

    def __str__(self):
        return f"{self.info.info['method']} slider {self.info.info.get('slider', '')} from {self.info.file}"


class Residuals(Artifact):
    methods, info_file, settings = ("residuals",), "residuals.json", ("strength", "lag")
    fills_token = needs_braces = True

    read_info = staticmethod(read_residual_info)

    @classmethod
    def files(cls, info, folder):
        return [folder / info["file"], folder / info["embeddings"]]

    def load(self, backbone, token=None) -> None:
        from diffusion.residuals import load_residuals

        self.sampler, self.word = load_residuals(backbone, self.info.folder)

    def applied(self, prompts, strength=None, lag=False):
        return self.sampler.applied(prompts, lag=lag, strength=1.0 if strength is None else float(strength))

    def __str__(self):
        info, folder = self.info.info, self.info.folder
        return f"residuals on {info['targets']} ({info['parameters']} parameters) for {self.word} from {folder}"


class EMConcepts(Artifact):
    """An em_mask run: every concept token, and the joint stage's weights (a full UNet or a LoRA)."""
    methods, info_file, fills_token = ("em_mask",), "concepts.json", True
    adapter_name = "em_joint"  # the LoRA adapter's name in training (EMMaskModule)

    @classmethod
    def read_info(cls, path):
        return read_info_beside(path, cls.info_file, required=("method", "tokens", "weights"))

    @classmethod
    def main_file(cls, info, folder):
        return folder / cls.info_file

    @classmethod
    def files(cls, info, folder):
        weights = [] if info["weights"] is None else [folder / info["weights"]]  # "unet": a diffusers folder
        return [folder / file for file in info["tokens"].values()] + weights

    @classmethod
    def chosen(cls, info: dict, token: str | None) -> str | None:
        """The concept token `token` names ('s00_c0' reads as '<s00_c0>': Hydra overrides need no quotes)."""
        if token is None or token in info["tokens"]:
            return token
        if f"<{token}>" not in info["tokens"]:
            raise ConfigError(f"token={token} is not a concept token of this em_mask run; give one of "
                              f"{', '.join(info['tokens'])}")
        return f"<{token}>"

    @classmethod
    def check_prompts(cls, info, templates, key, token):
        tokens = ", ".join(info["tokens"])
        braced = [t for t in templates if "{}" in t] if cls.chosen(info, token) is None else []
        if braced:  # prompts may name the tokens themselves; a '{}' needs one chosen
            raise ConfigError(f"{key}: prompt {braced[0]!r} has a '{{}}' but the em_mask run learnt "
                              f"{len(info['tokens'])} concept tokens; choose the one it stands for with "
                              f"token=<name> (one of {tokens}), or name the tokens in the prompts")

    def load(self, backbone, token=None) -> None:
        from diffusion.tokens import load_embeddings

        info, folder = self.info.info, self.info.folder
        token = self.chosen(info, token)
        if info["weights"] == "unet":
            from diffusers import UNet2DConditionModel

            backbone.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        elif info["weights"]:
            from diffusion.lora import load_lora

            load_lora(backbone.unet, folder / info["weights"], adapter_name=self.adapter_name)
            backbone.unet.set_adapters(list(backbone.unet.peft_config))  # active beside any slider's
        for name, file in info["tokens"].items():
            load_embeddings(backbone, folder / file, token=name)
        self.word = token

    def fill(self, prompt, class_word):
        self.check_prompts(self.info.info, [prompt], "prompts", self.word)
        return super().fill(prompt, class_word)

    def __str__(self):
        info = self.info.info
        weights = {"unet": "the fine-tuned UNet", None: "no weights"}.get(info["weights"], info["weights"])
        return f"{len(info['tokens'])} em_mask concept tokens and {weights} from {self.info.folder}"


KINDS: tuple[type[Artifact], ...] = (Slider, Residuals, EMConcepts, TextualInversion)  # the order they are looked for
METHODS = [m for kind in KINDS for m in kind.methods]


def _kind_info(kind: type[Artifact], path: Path) -> dict | None:
    info = kind.read_info(path)
    if info is not None and info["method"] not in kind.methods:
        raise ArtifactError(f"{path}: its {kind.info_file} names method {info['method']!r}, not an artifact kind "
                            f"this loader knows; give a run of {', '.join(METHODS)}")
    return info


def read_artifact(path: str | Path, key: str = "artifact") -> ArtifactInfo:
    """A run folder (or a file in it) recognised by its info JSON, its files checked readable; a
    .safetensors with no info beside it is a textual inversion (diffusers' format). Errors name `key`."""
    given = Path(str(path)).expanduser()
    if not given.exists():
        raise ArtifactError(f"{key}={path} does not exist; give a run's {EMBEDDINGS_FILE} (or its run folder)")
    folder = given if given.is_dir() else given.parent
    found = next(((kind, info) for kind in KINDS if (info := _kind_info(kind, given)) is not None), None)
    if found is None and given.is_dir() and not (given / EMBEDDINGS_FILE).is_file():
        raise ArtifactError(f"{key}={path} holds no artifact (none of {', '.join(k.info_file for k in KINDS)}, nor "
                            f"a {EMBEDDINGS_FILE}); give the run folder of a {', '.join(METHODS)} run")
    kind, info = found or (TextualInversion, {"method": "textual_inversion",
                                              "file": given.name if given.is_file() else EMBEDDINGS_FILE})
    files = kind.files(info, folder)
    for file in files:
        if not file.exists():
            raise ArtifactError(f"{key}={path}: {file} does not exist though {kind.info_file} names it; copy the "
                                f"whole run folder")
        if file.is_file():  # a corrupt file stops here, before the model loads
            check_safetensors(file, key)
    return ArtifactInfo(kind, given if given.is_file() else kind.main_file(info, folder), folder, info)


def load_artifact(backbone, path: str | Path | ArtifactInfo, token: str | None = None) -> Artifact:
    """The artifact added to `backbone`. `token`: a textual inversion's name for its token (None: the file's);
    for an EM run, the concept token that fills '{}'."""
    info = path if isinstance(path, ArtifactInfo) else read_artifact(path)
    artifact = info.kind(info)
    artifact.load(backbone, token=token)
    return artifact


class ArtifactSet:
    """Several artifacts on one backbone, sampled together."""

    def __init__(self, artifacts: Sequence[Artifact] = ()):
        self.artifacts = list(artifacts)

    def fill(self, template: str, class_word: str) -> str:
        """The prompt: '{}' filled by the artifact that stands for it (else the class word), sliders appended."""
        prompt = template
        for artifact in sorted(self.artifacts, key=lambda a: not a.fills_token):
            prompt = artifact.fill(prompt, class_word)
        return fill_template(prompt, class_word)

    @contextlib.contextmanager
    def applied(self, prompts: Sequence[str], strength=None, lag: bool = False) -> Iterator[object | None]:
        """Each artifact at its settings; a list of strengths goes one per artifact that takes a strength list
        (sliders), a number to all. Yields the attention hub the sampler should use (None without one)."""
        listed = isinstance(strength, (list, tuple))
        values = iter(strength if listed else ())
        hub = None
        with contextlib.ExitStack() as stack:
            for artifact in self.artifacts:
                value = (next(values) if artifact.composes else None) if listed else strength
                hub = stack.enter_context(artifact.applied(prompts, strength=value, lag=lag)) or hub
            yield hub

    def encoder(self, backbone):
        """The prompt encoding `generate` should use (None: the backbone's own)."""
        return SliderSet([a.slider for a in self.artifacts if a.slider is not None]).encoder(backbone)


def accepted_settings(infos: Sequence[ArtifactInfo]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for info in infos for s in info.kind.settings))


def _runs_taking(setting: str) -> str:
    methods = [m for kind in KINDS if setting in kind.settings for m in kind.methods]
    return ", ".join(methods[:-1]) + f" or {methods[-1]}" if len(methods) > 1 else methods[0]


def check_settings(infos: Sequence[ArtifactInfo], strength=None, lag: bool = False) -> None:
    """What the artifacts together cannot honour, before any loads: two of them filling '{}', a setting none
    takes, a strength list that is not one per slider."""
    if sum(info.kind.fills_token for info in infos) > 1:
        raise ConfigError("several artifacts fill one '{}' (textual inversions, residuals or em_mask runs); give at "
                          "most one (sliders may be many)")
    settings = accepted_settings(infos)
    if lag and "lag" not in settings:
        raise ConfigError(f"lag=true but no artifact is a residuals run; give a method={_runs_taking('lag')} run")
    if strength is not None and "strength" not in settings:
        raise ConfigError(f"strength is set but no artifact is a slider or residuals run; give a "
                          f"{_runs_taking('strength')} run")
    listed = isinstance(strength, (list, tuple))
    single = [info.info["method"] for info in infos if "strength" in info.kind.settings and not info.kind.composes]
    if listed and single:
        raise ConfigError(f"strength of a {single[0]} run is one number; a list is for composing sliders")
    sliders = sum(info.kind.composes for info in infos)
    if listed and len(strength) != sliders:
        raise ConfigError(f"strength has {len(strength)} values for {sliders} sliders; give one per slider artifact")
