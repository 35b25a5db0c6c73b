"""Prompt templates ('{}' is where the concept token goes) and prompt-set files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from utils.errors import ConfigError

# Textual inversion's templates (Gal et al. 2022, as in the diffusers training script).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
NAMED = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named template set ('object', 'style') or an explicit list, each with one '{}'.

    ('captions', per-image captions, is resolved by the image set, which knows the files.)
    """
    if isinstance(templates, str):
        if templates not in NAMED:
            raise ConfigError(f"data.templates={templates!r} is unknown; use one of {sorted(NAMED)}, 'captions' "
                              f"(the images' own captions.json) or a list of strings with '{{}}'")
        return NAMED[templates]
    templates = tuple(templates)
    if not templates:
        raise ConfigError("data.templates is empty; give at least one template with '{}'")
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"template {t!r} must contain exactly one '{{}}' where the token goes")
    return templates


def read_prompt_file(path: str | Path, key: str = "prompts_file") -> list[str]:
    """A prompt set from a file: .txt (one prompt per line; blank lines and '#' comments skipped) or a .json list."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist; give a .txt (one prompt per line) or a .json list")
    if path.suffix == ".json":
        prompts = json.loads(path.read_text())
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{key}={path} must hold a JSON list of strings")
        return prompts
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
