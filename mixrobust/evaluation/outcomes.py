"""Per-example outcomes of a sweep, their aggregation into result rows, and the outcomes file.

Counting rule (the same for every row): an example counts for an attack only if the model
classifies it correctly both on the clean image and on that attack's image (as AutoAttack
counts robust accuracy), so every attacked accuracy is at most the clean one; ``worst`` counts
an example only if it is classified correctly on the clean image and on every attack's image.
The stored booleans are the raw per-image outcomes, so other rules can be applied later.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixrobust.runtime.files import atomic_write
from mixrobust.evaluation.options import CLEAN, WORST, MixOption
from mixrobust.mixing.maps import HMap

#: Columns of results.csv / results.json, in order. ``g_model`` / ``h_model``: which base models (checkpoint path or
#: zoo source, and the weights' sha256 prefix), from ``meta["models"]``; empty where the sweep did not say.
COLUMNS = ("model", "alpha", "r_option", "mix_space", "h_map", "norm", "eps", "attack", "implementation", "steps", "accuracy",
           "n", "g_model", "h_model")
#: Columns that results files of earlier versions lack (read as empty; no ``h_map``: identity, linear mixing).
OPTIONAL_COLUMNS = ("h_map", "g_model", "h_model")
BASE_MODELS = ("g", "h")
BASE_IMAGES = (CLEAN, "std", "rob")  # g and h are judged on the clean, g-PGD and h-PGD images
BASE_OWN = ("apgd",)  # and, when it ran, on the adaptive attack's images of the model itself


@dataclass
class Outcomes:
    """Raw per-example correctness of a sweep over M mixing options, A alphas and N examples.

    - ``mix[name]``: (M, A, N) bool, the mixture correct on image set `name` (``clean`` and
      every attack in `attacks`);
    - ``base[model][name]``: (N,) bool, base model g or h correct on image set `name` in
      `BASE_IMAGES` (``std`` = PGD on g, ``rob`` = PGD on h) and, when the sweep ran it, ``apgd``
      (the adaptive attack on that model alone);
    - `index`: (N,) positions of the examples in the evaluated split; `labels`: (N,).
    `steps` are the PGD steps of std / rob / mix (None where the attack has no step count).
    """

    alphas: np.ndarray  # (A,) float64
    options: tuple[MixOption, ...]  # (M,)
    attacks: tuple[str, ...]  # attacks run on the mixture, in order
    mix: dict[str, np.ndarray]
    base: dict[str, dict[str, np.ndarray]]
    index: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    norm: str
    eps: float
    steps: int
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def _steps(outcomes: Outcomes, attack: str) -> int | None:
    if attack == CLEAN:
        return 0
    if attack == "apgd":
        return outcomes.meta.get("apgd_steps")
    return None if attack == "autoattack" else outcomes.steps


def _implementation(outcomes: Outcomes, attacks) -> str | None:
    """Which code ran `attacks` (see the module docstring); None for the clean images alone."""
    known = outcomes.meta.get("implementations") or {}
    names = sorted({known.get(a, "unknown") for a in attacks if a != CLEAN})
    return " + ".join(names) or None


def base_images(outcomes: Outcomes, model: str) -> tuple[str, ...]:
    """The image sets base model `model` was judged on, in column order."""
    return BASE_IMAGES + tuple(a for a in BASE_OWN if a in outcomes.base[model])


def _row(outcomes: Outcomes, model: str, alpha: float, option: MixOption | None, attack: str, acc: float) -> dict:
    if attack == WORST:
        attacks = base_images(outcomes, model) if model in BASE_MODELS else outcomes.attacks
    else:
        attacks = (attack,)
    return {
        "model": model,
        "alpha": alpha,
        "r_option": option.r_option.value if option else None,
        "mix_space": option.mix_space.value if option else None,
        "h_map": option.h_map.label if option else None,
        "norm": outcomes.norm,
        "eps": outcomes.eps,
        "attack": attack,
        "implementation": _implementation(outcomes, attacks),
        "steps": _steps(outcomes, attack),
        "accuracy": acc,
        "n": outcomes.n,
        "g_model": (outcomes.meta.get("models") or {}).get("g"),
        "h_model": (outcomes.meta.get("models") or {}).get("h"),
    }


def _accuracy(correct: np.ndarray) -> float:
    return float(correct.mean()) if correct.size else math.nan


def aggregate(outcomes: Outcomes) -> list[dict]:
    """Result rows (dicts with `COLUMNS`) from per-example outcomes, by the module's counting rule.

    First the base models (``model`` g / h, alpha NaN, no mixing option; attacks clean, std,
    rob, apgd where it ran, worst), then, per mixing option and alpha, the mixture (``model`` mix; clean, each
    attack in ``outcomes.attacks``, worst).
    """
    rows = []
    for model in BASE_MODELS:
        res = outcomes.base[model]
        worst = res[CLEAN].copy()
        for name in base_images(outcomes, model):
            correct = res[name] & res[CLEAN]
            worst &= correct
            rows.append(_row(outcomes, model, math.nan, None, name, _accuracy(correct)))
        rows.append(_row(outcomes, model, math.nan, None, WORST, _accuracy(worst)))
    clean = outcomes.mix[CLEAN]  # (M, A, N)
    for m, option in enumerate(outcomes.options):
        for a, alpha in enumerate(outcomes.alphas.tolist()):
            worst = clean[m, a].copy()
            rows.append(_row(outcomes, "mix", alpha, option, CLEAN, _accuracy(clean[m, a])))
            for name in outcomes.attacks:
                correct = outcomes.mix[name][m, a] & clean[m, a]
                worst &= correct
                rows.append(_row(outcomes, "mix", alpha, option, name, _accuracy(correct)))
            rows.append(_row(outcomes, "mix", alpha, option, WORST, _accuracy(worst)))
    return rows


def concat_outcomes(parts: list[Outcomes]) -> Outcomes:
    """Outcomes of disjoint example shards (same alphas, options, attacks), joined in the given order."""
    first = parts[0]
    for other in parts[1:]:
        if (not np.array_equal(other.alphas, first.alphas) or other.options != first.options
                or other.attacks != first.attacks):
            raise ValueError("cannot join outcomes of different sweeps (alphas, options or attacks differ)")
    return Outcomes(
        alphas=first.alphas, options=first.options, attacks=first.attacks,
        mix={k: np.concatenate([p.mix[k] for p in parts], axis=-1) for k in first.mix},
        base={m: {k: np.concatenate([p.base[m][k] for p in parts]) for k in first.base[m]} for m in first.base},
        index=np.concatenate([p.index for p in parts]), labels=np.concatenate([p.labels for p in parts]),
        norm=first.norm, eps=first.eps, steps=first.steps, meta=first.meta,
    )


# --- the outcomes file ---------------------------------------------------------------------------

def save_outcomes(path: str | os.PathLike, outcomes: Outcomes) -> Path:
    """Write `outcomes` as a compressed .npz (bool matrices, indices, alphas, a JSON header), atomically."""
    header = {
        "options": [[o.r_option.value, o.mix_space.value, o.h_map.as_dict()] for o in outcomes.options],
        "attacks": list(outcomes.attacks),
        "norm": outcomes.norm,
        "eps": outcomes.eps,
        "steps": outcomes.steps,
        "meta": outcomes.meta,
    }
    arrays = {
        "header": np.array(json.dumps(header, sort_keys=True, default=float)),
        "alphas": np.asarray(outcomes.alphas, dtype=np.float64),
        "index": np.asarray(outcomes.index, dtype=np.int64),
        "labels": np.asarray(outcomes.labels, dtype=np.int64),
    }
    for name, values in outcomes.mix.items():
        arrays[f"mix/{name}"] = np.asarray(values, dtype=bool)
    for model, results in outcomes.base.items():
        for name, values in results.items():
            arrays[f"base/{model}/{name}"] = np.asarray(values, dtype=bool)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")


def load_outcomes(path: str | os.PathLike) -> Outcomes:
    """Read a file written by `save_outcomes` (no pickles are loaded)."""
    with np.load(Path(path), allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        mix, base = {}, {m: {} for m in BASE_MODELS}
        for key in data.files:
            parts = key.split("/")
            if parts[0] == "mix":
                mix[parts[1]] = data[key]
            elif parts[0] == "base":
                base[parts[1]][parts[2]] = data[key]
        return Outcomes(
            alphas=data["alphas"],
            options=tuple(MixOption(o[0], o[1], HMap.from_dict(o[2]) if len(o) > 2 else HMap())
                          for o in header["options"]),
            attacks=tuple(header["attacks"]),
            mix=mix,
            base=base,
            index=data["index"],
            labels=data["labels"],
            norm=header["norm"],
            eps=float(header["eps"]),
            steps=int(header["steps"]),
            meta=header.get("meta", {}),
        )
