"""The prompt-to-prompt controls of one edit, built from its prompts and settings: the attention controller
(AttentionReplace or AttentionRefine) and LocalBlend, both defined in diffusion/attention.py.

Every method that edits with prompt-to-prompt (the P2P baselines of diffusion/editing.py, StyleDiffusion's
P2Plus in diffusion/style_editing.py) builds them here, so the choice of controller and the check of the
blend words are the same for all.
"""

from __future__ import annotations

from typing import Sequence

from diffusion.attention import AttentionRefine, AttentionReplace, LocalBlend, prompt_words
from utils.errors import ConfigError

BlendWords = Sequence[str | Sequence[str]]  # one entry per prompt, the source's first: a word or a list of words


def edit_controller(tokenizer, source: str, targets: Sequence[str], mode: str = "auto", tau_c: float = 0.6,
                    tau_s: float = 0.8, tau_u: float | None = 0.5):
    """The prompt-to-prompt controller of an edit: replace (equal word counts), refine, or auto."""
    if mode == "auto":
        counts = {len(p.split()) for p in [source, *targets]}  # the words replacement_mapper aligns
        mode = "replace" if len(counts) == 1 else "refine"
    kinds = {"replace": AttentionReplace, "refine": AttentionRefine}
    if mode not in kinds:
        raise ConfigError(f"edit controller {mode!r} is unknown; use auto, replace or refine")
    return kinds[mode].from_prompts(tokenizer, source, list(targets), cross_steps=tau_c, self_steps=tau_s,
                                    uncond_self_steps=tau_u)


def check_blend_words(prompts: Sequence[str], blend_words: BlendWords) -> list[list[str]]:
    """blend_words as one list of words per prompt; a one-line ConfigError unless each is made of its prompt's words."""
    names = ["source", *(["target"] if len(prompts) == 2 else [f"target {k}" for k in range(1, len(prompts))])]
    if not isinstance(blend_words, (list, tuple)) or len(blend_words) != len(prompts):
        raise ConfigError(f"blend_words={blend_words!r} needs {len(prompts)} entries, the source prompt's words "
                          f"then each target's, e.g. [cat,dog] or [[cat],[dog,hat]]")
    lists = [[str(w) for w in entry] if isinstance(entry, (list, tuple)) else [str(entry)] for entry in blend_words]
    for name, prompt, words in zip(names, prompts, lists):
        for word in words:
            if word not in prompt_words(prompt):
                raise ConfigError(f"blend word {word!r} is not in the {name} prompt {prompt!r}; blend_words lists "
                                  f"the source prompt's words, then the target's")
    return lists


def edit_blend(tokenizer, prompts: Sequence[str], blend_words: BlendWords | None,
               threshold: float = 0.3) -> LocalBlend | None:
    """Prompt-to-prompt's LocalBlend over [source, *targets]; None (off) when blend_words is None.

    blend_words: one entry per prompt, the source's first, each a word or a list of words of that prompt:
    ["cat", "dog"] for "a cat" -> "a dog", [["cat"], ["cat", "hat"]] for "a cat" -> "a cat with a hat".
    """
    if blend_words is None:
        return None
    return LocalBlend.from_prompts(tokenizer, list(prompts), check_blend_words(prompts, blend_words),
                                   threshold=threshold)
