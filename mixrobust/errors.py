"""Errors raised for bad user input or untrustworthy numbers, before (or instead of) a wrong result.

Every error here is a `MixrobustError`: its message names what is wrong (the config key or the
file) and how to fix it. It derives from Hydra's ``CompactHydraException``, so the entry points
print the message alone, without a traceback, and exit non-zero (``HYDRA_FULL_ERROR=1`` or
``debug=true`` shows the traceback); it is also a ``ValueError`` for code that catches those.
"""

from __future__ import annotations

import numbers

from hydra.errors import CompactHydraException


class MixrobustError(CompactHydraException, ValueError):
    """A user-facing error: the message names what is wrong and how to fix it."""


class ConfigError(MixrobustError):
    """A configuration value is invalid (unknown name, out-of-range number, ...)."""


class DataNotFoundError(MixrobustError, FileNotFoundError):
    """A dataset is missing from the folder it was looked for in."""


class DataError(MixrobustError):
    """A dataset file is present but unreadable (truncated, corrupt, wrong shape)."""


class CheckpointError(MixrobustError):
    """A checkpoint is missing, truncated, foreign or incompatible."""


class NonFiniteError(MixrobustError):
    """A model returned NaN or inf outputs: its scores would be meaningless, so the run stops."""


class StoppedError(MixrobustError):
    """A run was stopped from outside (SIGTERM) before it finished."""


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
