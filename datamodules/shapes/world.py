"""Vocabulary, scenes and captions of the shapes world.

A scene is a background colour and one or two objects. An object is a plain shape (8 shapes,
10 colours, 4 textures, a continuous size, a position and a small rotation) or a *badge*: the
macro class of the personalization methods, an outer shape with an inner emblem of another shape
and colour. A handful of specific badges (`CONCEPTS`) never appear in training scenes: they are
the "my dog" of this world, learnt from a few reference renders.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from utils.errors import DataError

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 160, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "white": (245, 245, 245),
    "black": (20, 20, 20), "brown": (130, 80, 40),
}
BACKGROUNDS = {
    "gray": (128, 128, 128), "white": (235, 235, 235), "black": (30, 30, 30), "beige": (225, 210, 170),
    "navy": (25, 35, 90), "teal": (30, 110, 110),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Object radius as a fraction of the image side; the gaps keep size words unambiguous.
SIZES = {"small": (0.13, 0.18), "medium": (0.21, 0.26), "large": (0.30, 0.36)}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
BADGE_SHAPES = ("circle", "square", "hexagon", "diamond")  # outer shapes of badges
CLASS_WORD = "badge"
PARTS_WORD = "with"  # "a purple hexagon badge with a yellow star": a badge named part by part
BACKGROUND_ROLE = 2  # caption_words' role of the background words (objects are 0 and 1)
MIN_CONTRAST = 90.0  # RGB distance between an object's colour and its background


@dataclass(frozen=True)
class Badge:
    """The identity of a badge: what the personalization methods must preserve."""

    outer: str
    outer_colour: str
    inner: str
    inner_colour: str


# Held-out personalization concepts: never sampled as training badges.
CONCEPTS = {
    "sun_medal": Badge("hexagon", "purple", "star", "yellow"),
    "love_seal": Badge("circle", "blue", "heart", "pink"),
    "cross_shield": Badge("square", "green", "cross", "white"),
    "ember_gem": Badge("diamond", "black", "triangle", "orange"),
    "moon_token": Badge("circle", "brown", "diamond", "white"),
}


@dataclass
class ObjectSpec:
    shape: str                 # one of SHAPES, or "badge"
    colour: str | None         # main colour (a badge's outer colour); None: not stated (parsed captions)
    size: float | None         # radius / image side; None: not stated (parsed captions)
    x: float                   # centre, as a fraction of the width (0 = left)
    y: float                   # centre, as a fraction of the height (0 = top)
    texture: str | None = "plain"  # None: not stated (parsed captions)
    angle: float = 0.0         # degrees
    badge: Badge | None = None
    parts_named: bool = False  # a badge whose caption names its outer shape, inner shape and colours

    @property
    def size_word(self) -> str | None:
        if self.size is None:
            return None
        for word, (lo, hi) in SIZES.items():
            if lo - 1e-6 <= self.size <= hi + 1e-6:
                return word
        return min(SIZES, key=lambda w: abs(sum(SIZES[w]) / 2 - self.size))

    def phrase_words(self) -> list[str]:
        """The words that describe this object in a caption (after its article)."""
        if self.badge is not None and self.parts_named:
            b = self.badge
            return [self.size_word, b.outer_colour, b.outer, CLASS_WORD, PARTS_WORD, "a", b.inner_colour, b.inner]
        if self.badge is not None:
            return [self.size_word, CLASS_WORD]
        texture = [] if self.texture == "plain" else [self.texture]
        return [self.size_word, self.colour, *texture, self.shape]

    def phrase(self) -> str:
        return " ".join(self.phrase_words())


@dataclass
class Scene:
    background: str
    objects: list[ObjectSpec] = field(default_factory=list)
    relation: str | None = None  # between objects[0] and objects[1]

    def caption_words(self) -> list[tuple[str, int | None]]:
        """The caption word by word, each with what it names: an object's index, BACKGROUND_ROLE, or None
        (articles, relations, "on", "with"). The pretraining's attention loss reads the roles."""
        words: list[tuple[str, int | None]] = []
        for i, obj in enumerate(self.objects):
            if i == 1:
                words += [(w, None) for w in self.relation.split()]
            words.append(("a", None))
            words += [(w, None if w in (PARTS_WORD, "a") else i) for w in obj.phrase_words()]
        return words + [("on", None), ("a", None), (self.background, BACKGROUND_ROLE),
                        ("background", BACKGROUND_ROLE)]

    def caption(self) -> str:
        return " ".join(word for word, _ in self.caption_words())

    def to_dict(self) -> dict:
        return asdict(self)


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


def _contrasts(colour: str, background: str) -> bool:
    return _distance(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def contrasting_backgrounds(colour: str) -> list[str]:
    """The backgrounds an object of this colour may stand on (in BACKGROUNDS' order)."""
    return [b for b in BACKGROUNDS if _contrasts(colour, b)]


def vocabulary() -> list[str]:
    """Every word a caption can use (for the tokenizer)."""
    words = {"a", "on", "background", CLASS_WORD, PARTS_WORD, *SHAPES, *COLOURS, *BACKGROUNDS, *TEXTURES, *SIZES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


class SceneSampler:
    """Draws random scenes; `badge_p` of objects are badges (never one of the held-out CONCEPTS), and
    `parts_p` of badges are captioned part by part ("a medium purple hexagon badge with a yellow star")."""

    def __init__(self, two_object_p: float = 0.4, badge_p: float = 0.15, texture_p: float = 0.35,
                 parts_p: float = 0.0, max_angle: float = 15.0,
                 held_out: tuple[Badge, ...] = tuple(CONCEPTS.values())):
        self.two_object_p, self.badge_p, self.texture_p, self.parts_p = two_object_p, badge_p, texture_p, parts_p
        self.max_angle = max_angle
        self.held_out = set(held_out)

    def _badge(self, rng: random.Random, background: str) -> Badge:
        while True:
            outer_colour = rng.choice([c for c in COLOURS if _contrasts(c, background)])
            inner_colour = rng.choice([c for c in COLOURS
                                       if _distance(COLOURS[c], COLOURS[outer_colour]) > MIN_CONTRAST])
            badge = Badge(rng.choice(BADGE_SHAPES), outer_colour, rng.choice(SHAPES), inner_colour)
            if badge not in self.held_out:
                return badge

    def _object(self, rng: random.Random, background: str, sizes: tuple[str, ...]) -> ObjectSpec:
        """An object with its size, look and rotation; the caller places it (x, y)."""
        x = y = 0.5
        word = rng.choice(sizes)
        size = rng.uniform(*SIZES[word])
        angle = rng.uniform(-self.max_angle, self.max_angle)
        if rng.random() < self.badge_p:
            badge = self._badge(rng, background)
            named = self.parts_p > 0 and rng.random() < self.parts_p  # no draw at 0: v1's streams unchanged
            return ObjectSpec("badge", badge.outer_colour, size, x, y, "plain", angle, badge, named)
        colour = rng.choice([c for c in COLOURS if _contrasts(c, background)])
        texture = rng.choice(TEXTURES[1:]) if rng.random() < self.texture_p else "plain"
        return ObjectSpec(rng.choice(SHAPES), colour, size, x, y, texture, angle)

    def sample(self, rng: random.Random) -> Scene:
        background = rng.choice(list(BACKGROUNDS))
        if rng.random() >= self.two_object_p:
            obj = self._object(rng, background, tuple(SIZES))
            margin = obj.size + 0.04
            obj.x, obj.y = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
            return Scene(background, [obj])
        relation = rng.choice(list(RELATIONS))
        dx, dy = RELATIONS[relation]
        first = self._object(rng, background, ("small", "medium"))
        second = self._object(rng, background, ("small", "medium"))
        # `first` sits about a quarter of the image from the centre on the relation's side, `second` opposite
        for obj, side in ((first, 1), (second, -1)):
            along = 0.5 + side * (dx or dy) * rng.uniform(0.21, 0.29)
            along = min(max(along, obj.size + 0.02), 1 - obj.size - 0.02)
            across = rng.uniform(obj.size + 0.05, 1 - obj.size - 0.05)
            obj.x, obj.y = (along, across) if dx else (across, along)
        return Scene(background, [first, second], relation)


def concept_scene(name: str, rng: random.Random, background: str | None = None) -> Scene:
    """A render of a held-out concept in a random pose, size and background (reference sets)."""
    badge = CONCEPTS[name]
    background = background or rng.choice(contrasting_backgrounds(badge.outer_colour))
    size = rng.uniform(SIZES["medium"][0], SIZES["large"][1])
    margin = size + 0.04
    obj = ObjectSpec("badge", badge.outer_colour, size, rng.uniform(margin, 1 - margin),
                     rng.uniform(margin, 1 - margin), "plain", rng.uniform(-15, 15), badge)
    return Scene(background, [obj])


def _parse_phrase(tokens: list[str]) -> ObjectSpec | None:
    """One object phrase ("a small red striped star", "a badge", "a medium purple hexagon badge with a yellow
    star"), or None when it is outside the grammar."""
    if tokens and tokens[0] == "a":
        tokens = tokens[1:]
    if PARTS_WORD in tokens:  # <size> <outer colour> <outer> badge with a <inner colour> <inner>
        at = tokens.index(PARTS_WORD)
        head, tail = tokens[:at], tokens[at + 1:]
        size = head[0] if len(head) == 4 and head[0] in SIZES else None
        head = head[1:] if size else head
        if (len(head) != 3 or head[2] != CLASS_WORD or len(tail) != 3 or tail[0] != "a"
                or head[0] not in COLOURS or head[1] not in BADGE_SHAPES or tail[1] not in COLOURS
                or tail[2] not in SHAPES):
            return None
        badge = Badge(head[1], head[0], tail[2], tail[1])
        return ObjectSpec(CLASS_WORD, badge.outer_colour, sum(SIZES[size]) / 2 if size else None, 0.5, 0.5,
                          "plain", badge=badge, parts_named=True)
    size = next((t for t in tokens if t in SIZES), None)
    colour = next((t for t in tokens if t in COLOURS), None)
    texture = next((t for t in tokens if t in TEXTURES), None)
    shape = tokens[-1] if tokens else ""
    if shape not in (*SHAPES, CLASS_WORD) or any(t not in {size, colour, texture, shape} for t in tokens):
        return None
    return ObjectSpec(shape, colour, sum(SIZES[size]) / 2 if size else None, 0.5, 0.5,
                      texture or ("plain" if shape != CLASS_WORD else None))


def parse_caption(caption: str) -> Scene:
    """The scene a caption of this world states, for judging a generated image by its prompt.

    Unstated attributes are None (a bare "badge" has no colour; "a circle" no size), so caption-only
    scoring leaves them out. Objects are placed on the relation's sides, which is all `match_objects`
    reads. A caption outside the world's grammar is a DataError naming it.
    """
    words = caption.lower().replace(",", " ").split()
    text = " ".join(words)
    if not text.endswith(" background") or " on a " not in text:
        raise DataError(f"{caption!r} is not a shapes-world caption (want 'a <object> [<relation> a <object>] on "
                        f"a <colour> background')")
    body, background = text[:-len(" background")].rsplit(" on a ", 1)
    relation = next((r for r in RELATIONS if f" {r} a " in body), None)
    phrases = body.split(f" {relation} a ") if relation else [body]
    objects = []
    for phrase in phrases:
        obj = _parse_phrase(phrase.split())
        if background not in BACKGROUNDS or obj is None:
            raise DataError(f"{caption!r} is not a shapes-world caption: cannot read {phrase!r} on "
                            f"a {background!r} background")
        objects.append(obj)
    if relation:  # the first object on the relation's side, as the sampler places them
        dx, dy = RELATIONS[relation]
        for obj, side in zip(objects, (1, -1)):
            along = 0.5 + side * (dx or dy) * 0.25
            obj.x, obj.y = (along, 0.5) if dx else (0.5, along)
    return Scene(background, objects, relation)
