"""Errors that mean 'the user asked for something that cannot work'.

The entry points print these as one line and exit with a non-zero code instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config value, a path or a file. The message says what is wrong and what to do."""


class ConfigError(UserError):
    """A config value is missing, unknown or out of range."""


class DataError(UserError):
    """An input data folder or file is missing, empty, unreadable or too small."""


class ModelLoadError(UserError):
    """A backbone path is missing or not a diffusers-format folder."""


class ArtifactError(UserError):
    """An artifact to load is missing or malformed, or one to write already exists."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind an exception, following the cause chain (Hydra wraps errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
