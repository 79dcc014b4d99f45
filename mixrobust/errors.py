"""Errors raised for bad user input, before any long work starts."""

from __future__ import annotations

import numbers


class MixrobustError(ValueError):
    """A user-facing error: the message names what is wrong and how to fix it."""


class ConfigError(MixrobustError):
    """A configuration value is invalid (unknown name, out-of-range number, ...)."""


class DataNotFoundError(MixrobustError, FileNotFoundError):
    """A dataset is missing from the folder it was looked for in."""


class CheckpointError(MixrobustError):
    """A checkpoint is missing, truncated, foreign or incompatible."""


def check_choice(name: str, value: str, choices) -> str:
    """Return `value` if it is one of `choices`, else raise a ConfigError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid values: {', '.join(map(str, choices))}")
    return value


def check_count(name: str, value) -> int:
    """Return `value` as an int if it is a whole number >= 1 (not a bool), else raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)
