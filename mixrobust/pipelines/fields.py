"""Typed settings from Hydra config nodes: frozen dataclasses, parsed and checked in one place.

`parse` builds a frozen dataclass from a config node, field by field, from the field's type
hint: ``bool``, ``int`` (a whole number), ``float`` (finite unless ``allow_inf``), ``str``,
``Path``, ``Literal[...]`` (the valid values come from ``typing.get_args``, so each option list
is written once), ``Enum`` classes, ``X | None``, ``tuple[X, ...]`` (a single value becomes a
1-tuple) and nested dataclasses; `bounded` adds ``ge``/``gt``/``le``/``lt`` bounds. A bad value
gives one `ConfigError` that names the config key, what it must be and what it got, e.g.
``threat.eps must be a number >= 0, got 'abc'``.

`build` instantiates a ``_target_`` node (data module, model factory, objective, attack, ...)
with Hydra and turns whatever the constructor raises into one ConfigError naming the node.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import types
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mixrobust.errors import ConfigError, MixrobustError

T = TypeVar("T")


def bounded(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, allow_inf: bool = False,
            min_len: int | None = None) -> Any:
    """A dataclass field with numeric bounds (or a minimal tuple length) that `parse` enforces."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, min_len=min_len).items() if v is not None}
    return dataclasses.field(default=default, metadata={**meta, "allow_inf": allow_inf})


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def value_at(node: Any, name: str, key: str) -> Any:
    """``node[name]`` resolved, with ``???`` and interpolation failures as ConfigErrors naming the key."""
    try:
        if isinstance(node, DictConfig):
            if OmegaConf.is_missing(node, name):
                raise ConfigError(f"missing config value {join(key, name)}; set it on the command line, e.g. "
                                  f"{join(key, name)}=...")
            value = node[name]
            return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
                else value
        return node[name]
    except MissingMandatoryValue:
        raise ConfigError(f"missing config value {join(key, name)} (or a value it refers to); set it on the "
                          f"command line, e.g. {join(key, name)}=...") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{join(key, name)} cannot be resolved: {str(exc).splitlines()[0]}") from None


def _bounds_text(meta: Mapping) -> str:
    return " and ".join(f"{op} {meta[name]:g}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                        if name in meta)


def _check_bounds(value: float, key: str, what: str, meta: Mapping, raw: Any) -> None:
    ok = all(test(value, meta[name]) for name, test in (
        ("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b), ("lt", lambda v, b: v < b))
        if name in meta)
    if not ok:
        raise ConfigError(f"{key} must be {what} {_bounds_text(meta)}, got {raw!r}")


def _number(value: Any, key: str, meta: Mapping, whole: bool) -> float | int:
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        bounds = _bounds_text(meta)
        raise ConfigError(f"{key} must be {what}{' ' + bounds if bounds else ''}, got {value!r}")
    if whole:
        if not (math.isfinite(value) and int(value) == value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not meta.get("allow_inf")):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    _check_bounds(value, key, what, meta, value)
    return value


def convert(value: Any, tp: Any, key: str, meta: Mapping | None = None) -> Any:
    """`value` converted to type hint `tp` (see the module docstring), or a ConfigError naming `key`."""
    meta = meta or {}
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        errors = []
        for option in options:  # the first member the value converts to
            try:
                return convert(value, option, key, meta)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if value is None:
        raise ConfigError(f"{key} must be set, got null")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"unknown {key} {value!r}; valid values: {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        if len(items) < meta.get("min_len", 0):
            raise ConfigError(f"{key} must hold at least {meta['min_len']} value(s), got {value!r}")
        elem = get_args(tp)[0]
        return tuple(convert(v, elem, f"{key}[{i}]", {k: v for k, v in meta.items() if k != "min_len"})
                     for i, v in enumerate(items))
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise ConfigError(f"unknown {key} {value!r}; valid values: {', '.join(str(e.value) for e in tp)}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        return _number(value, key, meta, whole=tp is int)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"{key} must be a path, got {value!r}")
        return Path(value).expanduser()
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    return value


def parse(cls: type[T], node: Any, key: str = "", *, strict: bool = True, **given: Any) -> T:
    """Build the dataclass `cls` from config node `node` at config key `key` (see the module docstring).

    Fields in `given` are taken as they are (already checked); a field absent from `node` takes its
    default. With `strict` a key of `node` that is not a field is refused, so a misspelt setting
    never goes unseen (the top level of a task's config, which also holds other tasks' groups, is
    parsed with ``strict=False``: Hydra already refuses unknown top-level keys).
    """
    if node is None:
        node = {}
    if not isinstance(node, (Mapping, DictConfig)):
        raise ConfigError(f"{key or 'the config'} must be a group of settings, got {node!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(node.keys()) - names - set(given) - {"_target_"}) if strict else []
    if unknown:
        raise ConfigError(f"unknown setting {join(key, unknown[0])}; valid settings of {key or 'the config'}: "
                          f"{', '.join(sorted(names))}")
    hints = get_type_hints(cls)
    values = dict(given)
    present = set(node.keys())  # `in` on a DictConfig is False for a ``???`` value, which must not be skipped
    for f in dataclasses.fields(cls):
        if not f.init or f.name in given:
            continue
        if f.name in present:
            values[f.name] = convert(value_at(node, f.name, key), hints[f.name], join(key, f.name), f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config value {join(key, f.name)}; set it on the command line, e.g. "
                              f"{join(key, f.name)}=...")
    return cls(**values)


def require(node: DictConfig, *names: str) -> None:
    """One ConfigError naming every one of `names` that is missing (``???``) or null in `node`."""
    missing = [n for n in names if n not in node or OmegaConf.is_missing(node, n) or node.get(n) is None]
    if missing:
        example = " ".join(f"{n}=..." for n in missing)
        raise ConfigError(f"missing config value{'s' if len(missing) > 1 else ''} {', '.join(missing)}; set "
                          f"{'them' if len(missing) > 1 else 'it'} on the command line, e.g. {example}")


def plain(node: Any, key: str = "the config") -> Any:
    """A config node as plain, resolved Python containers; resolution failures as ConfigErrors."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"missing config value {getattr(exc, 'full_key', '') or key}; set it on the command "
                          "line") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', '') or key} cannot be resolved: {str(exc).splitlines()[0]}") \
            from None


def check_arguments(node: Any, key: str, ignore: tuple[str, ...] = ()) -> dict:
    """Check a ``_target_`` node without building it: the target imports, and every key (but `ignore`) is an
    argument it takes. For nodes whose construction has side effects (the Trainer, a W&B run). Returns the
    plain node (None for an empty node)."""
    container = plain(node, key)
    if not container:
        return container
    if not isinstance(container, Mapping) or "_target_" not in container:
        raise ConfigError(f"{key} must be a config group with a _target_ (pick one with {key}=<option>)")
    from hydra.utils import get_method

    try:
        target = get_method(container["_target_"])
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types for an unimportable path
        raise ConfigError(f"{key}._target_={container['_target_']!r} cannot be loaded: "
                          f"{str(exc).splitlines()[-1]}") from None
    params = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(container) - set(params) - {"_target_", "_partial_", *ignore})
        if unknown:
            raise ConfigError(f"{join(key, unknown[0])} is not a setting of {container['_target_']}")
    return container


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def build(node: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, *args, **kwargs)`` with one ConfigError naming `key` for any failure.

    Our own errors (`MixrobustError`) pass through unchanged: they already name the setting.
    """
    if node is None:
        return None
    container = plain(node, key)
    if not isinstance(container, Mapping) or "_target_" not in container:
        raise ConfigError(f"{key} must be a config group with a _target_ (pick one with {key}=<option>), "
                          f"got {container!r}")
    try:
        return instantiate(container, *args, **kwargs)
    except InstantiationException as exc:  # Hydra wraps whatever the constructor raised
        cause = exc.__cause__ or exc
        if isinstance(cause, MixrobustError):
            raise cause from None
        target = container["_target_"]
        if str(exc).startswith("Error locating target"):  # Hydra could not import it
            detail = str(cause).splitlines()[-1]
            raise ConfigError(f"{key}._target_={target!r} cannot be loaded: {detail}") from None
        unexpected = _UNEXPECTED.search(str(cause))
        if isinstance(cause, TypeError) and unexpected:
            raise ConfigError(f"{join(key, unexpected.group(1))} is not a setting of {target}") from None
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ConfigError(f"{key} ({target}) is invalid: {message}") from None
