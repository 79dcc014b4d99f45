"""The closed vocabularies of an evaluation sweep: attack names and mixing options.

Names of the image sets an example is judged on (the ``attack`` column of results):

- ``clean``: the test image itself;
- ``std``: PGD on g alone (for a mixture: a transfer attack);
- ``rob``: PGD on h alone (for a mixture: a transfer attack);
- ``mix``: PGD on the mixture end to end (adaptive), one run per alpha: the paper's attack;
- ``apgd``: the adaptive attack on the mixture (`mixrobust.attacks.AdaptiveMixAttack`: APGD-CE, APGD-DLR,
  then targeted APGD-DLR, early exit), one run per alpha: within a point of AutoAttack on the digits and
  MNIST mixtures at a fraction of its cost; for a mixture, also the same attack's images on g and on h
  alone (the log-mixture, and a saturating map on h more so, can flatten the mixture's gradient);
- ``autoattack``: AutoAttack (standard version) on the mixture, one run per alpha;
- ``worst``: the per-example worst case over clean and every attack run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from mixrobust.errors import ConfigError
from mixrobust.mixing import HMap, MixSpace, ROption


class AttackName(str, Enum):
    """An attack the sweep can run on the mixture (see the module docstring)."""

    STD = "std"
    ROB = "rob"
    MIX = "mix"
    APGD = "apgd"
    AUTOATTACK = "autoattack"


CLEAN, WORST = "clean", "worst"


def parse_attacks(names: Iterable[str]) -> tuple[AttackName, ...]:
    """Validate a list of attack names; keeps the order, drops duplicates; ConfigError on a bad one."""
    if isinstance(names, str):
        names = [names]
    out: list[AttackName] = []
    for name in names:
        try:
            attack = AttackName(str(name).lower())
        except ValueError:
            valid = ", ".join(a.value for a in AttackName)
            raise ConfigError(f"unknown attack {name!r}; valid values: {valid}") from None
        if attack not in out:
            out.append(attack)
    return tuple(out)


@dataclass(frozen=True)
class MixOption:
    """How g and h are mixed: the R_i option of eq. (3), the space (prob or logit) it mixes in, and the map on
    h's logits (identity: linear mixing; nonlinear: MixedNUTS, `mixrobust.mixing.maps`)."""

    r_option: ROption = ROption.ONE
    mix_space: MixSpace = MixSpace.PROB
    h_map: HMap = HMap()

    def __post_init__(self):
        object.__setattr__(self, "r_option", ROption.parse(self.r_option))
        object.__setattr__(self, "mix_space", MixSpace.parse(self.mix_space))
        if not isinstance(self.h_map, HMap):
            raise TypeError(f"h_map must be an HMap, got {self.h_map!r}")

    @property
    def label(self) -> str:
        """``"<r_option>/<mix_space>"``, e.g. ``"one/prob"``, then ``/<h_map label>`` for a map other than identity."""
        base = f"{self.r_option.value}/{self.mix_space.value}"
        return base if self.h_map.identity else f"{base}/{self.h_map.label}"

    @property
    def cached(self) -> bool:
        """True when the mixture's outputs follow from g's and h's logits alone (R_i = 1; any h map)."""
        return self.r_option is ROption.ONE


def option_key(row: dict) -> tuple[str, str, str]:
    """A mixture row's option as (r_option, mix_space, h_map); results of earlier versions (no h_map) are linear."""
    return row["r_option"], row["mix_space"], row.get("h_map") or "identity"


def option_text(key: tuple[str, str, str]) -> str:
    """How tables and legends name an option key: ``one/prob``, or ``one/prob/nonlinear(...)``."""
    r_option, mix_space, h_map = key
    return f"{r_option}/{mix_space}" + ("" if h_map == "identity" else f"/{h_map}")


def mix_options(r_options: Sequence[str], mix_spaces: Sequence[str],
                h_maps: Sequence[HMap] = (HMap(),)) -> tuple[MixOption, ...]:
    """Every (r_option, mix_space, h_map) triple, r_option-major; ConfigError on an unknown name or empty list."""
    if isinstance(r_options, str):
        r_options = [r_options]
    if isinstance(mix_spaces, str):
        mix_spaces = [mix_spaces]
    if not r_options or not mix_spaces or not h_maps:
        raise ConfigError("mix.r_options, mix.mix_spaces and mix.h_map must each name at least one option")
    options = [MixOption(r, s, m) for r, s, m in itertools.product(r_options, mix_spaces, h_maps)]
    return tuple(dict.fromkeys(options))  # drop duplicates, keep order
