"""Slider templates (the Concept / Prompt Sliders schema) and the prompt stream a textual slider trains on.

A template names the prompts of eq. (5) of Prompt Sliders:

    eps(alpha) = eps(z_t, c_t) + alpha * eta * sum_{p in P} (eps(z_t, c+, p) - eps(z_t, c-, p))

    target         c_t, the prompt the slider token is appended to (an erased word must appear in it)
    positive       c+ (default: target)
    unconditional  c- (default ""; `negative` is accepted as its name, not both)
    neutral        the prompt of the base prediction eps(z_t, c_t) (default: target, as in eq. 5;
                   Concept Sliders' code defaults it to unconditional)
    action         enhance (eq. 5) | erase (eq. 7, the difference is subtracted)
    guidance_scale eta
    preserve       P, phrases the edit must keep working for; '{p}' in a prompt marks where a phrase
                   goes, a prompt without it gets the phrase in front ("{p} {prompt}", as Concept
                   Sliders combine attributes)
    resolution, batch_size, dynamic_resolution: training settings shared by a slider's templates

Unknown keys are errors: the authors' own templates carried a misspelt key that was silently ignored.
The sum over P is taken in expectation: each sample draws one phrase (Concept Sliders' code draws one
attribute per step), so eta stands for eta * |P|.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.stream import IndexedStream, item_generator, stream_position
from utils.errors import ConfigError

log = logging.getLogger(__name__)
ACTIONS = ("enhance", "erase")
KEYS = ("name", "target", "positive", "unconditional", "negative", "neutral", "action", "guidance_scale",
        "preserve", "resolution", "batch_size", "dynamic_resolution")


@dataclass(frozen=True)
class SliderTemplate:
    target: str
    positive: str
    unconditional: str
    neutral: str
    action: str = "enhance"
    guidance_scale: float = 1.0
    preserve: tuple[str, ...] = ()
    resolution: int | None = None
    batch_size: int = 1  # Prompt Sliders, Sec. 4: batch size 1
    name: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "template") -> "SliderTemplate":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping with a target (and positive, unconditional, ...); "
                              f"got {raw!r}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}; allowed keys: {', '.join(KEYS)}")
        if raw.get("target") is None:
            raise ConfigError(f"{where} has no 'target': give the prompt the slider applies to (it may be '')")
        if raw.get("unconditional") is not None and raw.get("negative") is not None:
            raise ConfigError(f"{where} gives both 'unconditional' and 'negative' (two names of c-); keep one")
        action = raw.get("action", "enhance")
        if action not in ACTIONS:
            raise ConfigError(f"{where}.action={action!r} is unknown; use enhance or erase")
        if raw.get("dynamic_resolution"):
            raise ConfigError(f"{where}.dynamic_resolution=true is not supported; training is square at 'resolution'")
        preserve = raw.get("preserve") or ()
        if isinstance(preserve, str) or not all(isinstance(p, str) for p in preserve):
            raise ConfigError(f"{where}.preserve must be a list of phrases; got {preserve!r}")
        batch_size = int(raw.get("batch_size", 1))
        if batch_size < 1:
            raise ConfigError(f"{where}.batch_size={batch_size} must be at least 1")
        target = str(raw["target"])
        negative = raw.get("unconditional", raw.get("negative"))
        return cls(target=target, positive=str(raw.get("positive", target)),
                   unconditional="" if negative is None else str(negative),
                   neutral=str(raw.get("neutral", target)), action=action,
                   guidance_scale=float(raw.get("guidance_scale", 1.0)), preserve=tuple(preserve),
                   resolution=None if raw.get("resolution") is None else int(raw["resolution"]),
                   batch_size=batch_size, name=str(raw.get("name", "")))

    @property
    def sign(self) -> float:
        return -1.0 if self.action == "erase" else 1.0

    def prompts(self, phrase: str | None) -> dict[str, str]:
        """The four prompts with a preserve phrase filled in (None: the template has no P)."""
        def fill(prompt: str) -> str:
            if phrase is None:
                return prompt
            text = prompt.replace("{p}", phrase) if "{p}" in prompt else f"{phrase} {prompt}"
            return " ".join(text.split())
        return {"target": fill(self.target), "positive": fill(self.positive),
                "unconditional": fill(self.unconditional), "neutral": fill(self.neutral)}


def load_templates(templates: Sequence[Mapping] | Mapping | str | Path) -> list[SliderTemplate]:
    """Templates from a list of mappings, one mapping, or a YAML file holding either."""
    if isinstance(templates, (str, Path)):
        path = Path(templates).expanduser()
        if not path.is_file():
            raise ConfigError(f"slider templates file {path} does not exist")
        import yaml
        templates = yaml.safe_load(path.read_text())
    if isinstance(templates, Mapping):
        templates = [templates]
    if not templates:
        raise ConfigError("slider.templates is empty; give at least one template with a target")
    out = [SliderTemplate.from_dict(t, f"slider.templates[{i}]") for i, t in enumerate(templates)]
    for key in ("batch_size", "resolution"):
        values = {getattr(t, key) for t in out}
        if len(values) > 1:
            raise ConfigError(f"slider.templates disagree on {key} ({sorted(values, key=str)}); a slider trains "
                              f"with one {key}: make them equal")
    return out


class SliderPrompts:
    """Sample k of the stream: a template and one of its preserve phrases, drawn from (seed, k)."""

    def __init__(self, templates: Sequence[SliderTemplate], seed: int = 0):
        self.templates, self.seed = list(templates), seed

    def __call__(self, k: int) -> dict:
        g = item_generator(self.seed, k)
        i = int(torch.randint(len(self.templates), (1,), generator=g))
        template = self.templates[i]
        phrase = None
        if template.preserve:
            phrase = template.preserve[int(torch.randint(len(template.preserve), (1,), generator=g))]
        return {**template.prompts(phrase), "template": i, "sign": template.sign,
                "guidance_scale": template.guidance_scale}


class SliderPromptDataModule(L.LightningDataModule):
    """Streams slider prompts (target, positive, unconditional, neutral, eta, sign) for as many steps as
    the trainer runs; a batch has the templates' batch_size."""

    def __init__(self, templates: Sequence[Mapping] | str, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.templates = load_templates(templates)
        self.batch_size = self.templates[0].batch_size
        self.resolution = self.templates[0].resolution  # None: the model's
        self.seed, self.num_workers = seed, num_workers

    def target_prompts(self) -> list[str]:
        """Every target prompt the stream can yield (each template with each of its preserve phrases)."""
        return list(dict.fromkeys(t.prompts(p)["target"] for t in self.templates for p in (t.preserve or (None,))))

    def train_dataloader(self) -> DataLoader:
        start, rank, world = stream_position(self.trainer)
        stream = IndexedStream(SliderPrompts(self.templates, self.seed), self.batch_size, start, rank, world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)
