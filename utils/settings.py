"""Typed settings read from a config section: the yaml holds the defaults, the dataclass the names and checks.

A `Settings` subclass is a frozen dataclass without defaults for what its yaml gives; `from_config` builds it
from the section's dict and stops a missing or unknown key with a one-line ConfigError naming the section.
Subclasses check their values in `__post_init__` (`check_choice` for the enums).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from utils.errors import ConfigError


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {choices}")


@dataclasses.dataclass(frozen=True)
class Settings:
    key: ClassVar[str] = ""                          # where the section sits in the config: errors name it
    nested: ClassVar[dict[str, type[Settings]]] = {}  # fields that are sections of their own

    @classmethod
    def from_config(cls, values: Mapping | Settings) -> Settings:
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError(f"{cls.key} is missing {', '.join(missing)}; set them (the method's yaml gives them)")
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ConfigError(f"{cls.key}.{unknown[0]} is unknown; use one of {tuple(names)}")
        for name, settings in cls.nested.items():
            values[name] = settings.from_config(values[name])
        return cls(**values)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
