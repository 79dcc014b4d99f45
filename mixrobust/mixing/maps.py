"""Maps applied to h's logits before mixing: MixedNUTS's nonlinear map (Bai et al., TMLR 2024; method.md).

    h_nonlin(x) = log( (1 - alpha) softmax(g(x)) + alpha softmax(M_{s,p,c}(h(x))) )

M_{s,p,c} standardizes each row of logits by the mean and standard deviation of its top-k entries,
adds a bias c, applies GELU (a soft clamp: entries far below the top ones go to about 0), then a
signed power p (``sign(u) |u|**p``) and a scale s. On the inputs h gets right its top logit stands
out after standardization, and p > 1 with a large s widens that margin, so the mixture leans on h
where h is confident without giving up g's accuracy where h is not.

`HMap` is the setting as configured (``identity`` or ``nonlinear`` with its parameters); calling it
maps logits. ``HMap()`` (identity) returns the logits themselves, so mixing with it is today's linear
mixing bit for bit. `NonlinearMap` is the map as an ``nn.Module``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixrobust.errors import ConfigError

MapKind = Literal["identity", "nonlinear"]
MAP_KINDS: tuple[str, ...] = get_args(MapKind)

#: Standardized logits are clamped to +-Z_MAX before the bias: GELU is 0 or the identity far beyond it,
#: and the power of a bounded value cannot overflow float64.
Z_MAX = 1e3
#: The mapped logits are clamped to +-OUT_MAX (float32 softmax is one-hot long before), so a large scale
#: or power cannot produce inf.
OUT_MAX = 1e6
#: Rows whose top-k logits are (nearly) equal have standard deviation at least STD_MIN: no division by 0.
STD_MIN = 1e-12
#: |u| is at least U_MIN under the power, so its gradient p |u|^(p-1) is finite for p < 1 too.
U_MIN = 1e-12


def nonlinear_map(logits: Tensor, scale, power, bias, top_k: int | None = None) -> Tensor:
    """M_{s,p,c}(logits) for logits (..., N, K), in float64, returned in the logits' dtype.

    ``u = clamp((z - mean_k(z)) / std_k(z), +-Z_MAX) + bias``; ``out = scale * sign(v) |v|**power`` with
    ``v = GELU(u)``, clamped to +-OUT_MAX. mean_k / std_k are the mean and (population) standard
    deviation of each row's `top_k` largest logits (all K when None). `scale`, `power` and `bias` are
    numbers or tensors that broadcast against the logits: parameters of shape (P, 1, 1) map (N, K)
    logits to (P, N, K) at once (the fit's grid). Differentiable in the logits, with finite gradients
    for every finite input.
    """
    k = logits.shape[-1]
    if top_k is not None and not 2 <= int(top_k) <= k:
        raise ConfigError(f"top_k must be between 2 and the number of classes ({k}), got {top_k}")
    z = logits.double()
    top = z if top_k is None or int(top_k) == k else z.topk(int(top_k), dim=-1).values
    mean = top.mean(dim=-1, keepdim=True)
    std = top.std(dim=-1, keepdim=True, correction=0).clamp_min(STD_MIN)
    u = ((z - mean) / std).clamp(-Z_MAX, Z_MAX) + _as64(bias, z)
    v = F.gelu(u)
    out = _as64(scale, z) * torch.sign(v) * v.abs().clamp_min(U_MIN) ** _as64(power, z)
    return out.clamp(-OUT_MAX, OUT_MAX).to(logits.dtype)


def _as64(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


class NonlinearMap(nn.Module):
    """`nonlinear_map` with fixed parameters as a module (no trainable parameters)."""

    def __init__(self, scale: float, power: float, bias: float, top_k: int | None = None):
        super().__init__()
        self.h_map = HMap("nonlinear", scale, power, bias, top_k)

    def forward(self, logits: Tensor) -> Tensor:
        return self.h_map(logits)

    def extra_repr(self) -> str:
        return self.h_map.label


@dataclass(frozen=True)
class HMap:
    """The map on h's logits of one mixing option: ``identity`` (linear mixing, eq. (4)) or ``nonlinear``.

    `scale` (s > 0), `power` (p > 0), `bias` (c) and `top_k` are the nonlinear map's parameters (ignored by
    the identity); `name` is the fit the parameters came from, if any (a record, not part of the map).
    """

    kind: MapKind = "identity"
    scale: float = 1.0
    power: float = 1.0
    bias: float = 0.0
    top_k: int | None = None
    name: str | None = None

    def __post_init__(self):
        if self.kind not in MAP_KINDS:
            raise ConfigError(f"unknown h_map {self.kind!r}; valid values: {', '.join(MAP_KINDS)}, or a fitted map's "
                              "name or file (python evaluate.py task=fit_map ...)")
        for key in ("scale", "power", "bias"):
            value = getattr(self, key)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"h_map_params.{key} must be a number, got {value!r}") from None
            if not math.isfinite(value) or (key != "bias" and value <= 0):
                raise ConfigError(f"h_map_params.{key} must be a finite number{' > 0' if key != 'bias' else ''}, "
                                  f"got {value!r}")
            object.__setattr__(self, key, value)
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k
                                       or self.top_k < 2):
            raise ConfigError(f"h_map_params.top_k must be null (all classes) or an integer >= 2, got {self.top_k!r}")

    @property
    def identity(self) -> bool:
        return self.kind == "identity"

    @property
    def label(self) -> str:
        """``identity``, or ``nonlinear(s=..,p=..,c=..[,k=..])``: the map by its values (results' ``h_map``)."""
        if self.identity:
            return "identity"
        k = f",k={self.top_k}" if self.top_k is not None else ""
        return f"nonlinear(s={self.scale:.4g},p={self.power:.4g},c={self.bias:.4g}{k})"

    def __call__(self, logits: Tensor) -> Tensor:
        if self.identity:
            return logits
        return nonlinear_map(logits, self.scale, self.power, self.bias, self.top_k)

    def check_classes(self, num_classes: int | None) -> None:
        """ConfigError when `top_k` exceeds the models' class count."""
        if self.top_k is not None and num_classes is not None and self.top_k > num_classes:
            raise ConfigError(f"h_map {self.label}: top_k={self.top_k} exceeds the models' {num_classes} classes; "
                              f"set h_map_params.top_k<={num_classes} (or null: all classes)")

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict) -> "HMap":
        unknown = set(values) - {"kind", "scale", "power", "bias", "top_k", "name"}
        if unknown:
            raise ConfigError(f"unknown h_map keys {sorted(unknown)}; valid: kind, scale, power, bias, top_k, name")
        return cls(**values)


#: What `load_fit` reads from a fit file: the map, and the fit's own alpha and estimates.
FIT_FILE = "h_map.json"


def fit_path(value: str, fits_dir: str | os.PathLike | None) -> Path:
    """Where a fitted map named `value` lives: the file itself (a path ending in .json or naming a fit folder) or
    ``<fits_dir>/<value>.json``."""
    path = Path(value).expanduser()
    if path.suffix == ".json" or path.is_dir() or os.sep in value:
        return path / FIT_FILE if path.is_dir() else path
    if fits_dir is None:
        raise ConfigError(f"h_map {value!r} is not identity or nonlinear and no fits folder is set (fits_dir=...)")
    return Path(fits_dir).expanduser() / f"{value}.json"


def load_fit(value: str, fits_dir: str | os.PathLike | None = None) -> dict:
    """A fit file written by ``task=fit_map`` (by name in `fits_dir`, or by path): its parsed JSON, with ``h_map``
    as an `HMap`. One ConfigError naming the file and the fix if it is missing or not a fit."""
    path = fit_path(value, fits_dir)
    if not path.is_file():
        known = sorted(p.stem for p in Path(fits_dir).expanduser().glob("*.json")) if fits_dir and \
            Path(fits_dir).expanduser().is_dir() else []
        raise ConfigError(f"h_map {value!r}: no fitted map at {path} (fitted maps in {fits_dir}: "
                          f"{', '.join(known) or 'none'}); fit one with python evaluate.py task=fit_map "
                          f"g_ckpt=... h_ckpt=... fit.name={Path(value).stem}, or give identity / nonlinear")
    try:
        record = json.loads(path.read_text())
        record["h_map"] = HMap.from_dict(record["h_map"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"h_map {value!r}: {path} is not a fitted map written by task=fit_map ({exc})") from None
    record["path"] = str(path)
    return record


def names_fit(value) -> bool:
    """Whether a ``mix.h_map`` entry names a fitted map (by name or file), not ``identity`` / ``nonlinear`` / a dict."""
    return not isinstance(value, (HMap, dict)) and str(value).lower() not in ("identity", "nonlinear")


def parse_h_map(value, params: dict | None = None, fits_dir: str | os.PathLike | None = None) -> HMap:
    """One ``mix.h_map`` entry: an `HMap`, ``identity``, ``nonlinear`` (with `params`: scale, power, bias, top_k),
    or a fitted map by name (in `fits_dir`) or file."""
    if isinstance(value, HMap):
        return value
    if isinstance(value, dict):
        return HMap.from_dict({"kind": "nonlinear", **value})
    text = str(value)
    if names_fit(value):
        return load_fit(text, fits_dir)["h_map"]
    if text.lower() == "identity":
        return HMap()
    params = dict(params or {})  # nonlinear
    unknown = set(params) - {"scale", "power", "bias", "top_k"}
    if unknown:
        raise ConfigError(f"unknown mix.h_map_params keys {sorted(unknown)}; valid: scale, power, bias, top_k")
    return HMap("nonlinear", **params)
