"""AutoAttack (Croce and Hein, standard version) through an installed implementation.

Two implementations are supported, through this small adapter (neither is vendored):
``autoattack`` (the authors' code, ``pip install pyautoattack``) and torchattacks' port
(``pip install torchattacks``). The adapter follows the attack contract
``attack(model, x, y) -> x_adv``. Both implementations attack only the examples the model
classifies correctly and return the others unchanged.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from mixrobust.attacks.pgd import eval_mode
from mixrobust.errors import ConfigError, check_choice
from mixrobust.threat import Norm

IMPLEMENTATIONS = ("auto", "autoattack", "torchattacks")
INSTALL_HINT = "pip install pyautoattack (the authors' code) or pip install torchattacks"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def find_implementation(preferred: str = "auto") -> str:
    """The AutoAttack implementation to use: `preferred`, or for ``auto`` the authors' code if
    installed, else torchattacks. ConfigError naming the install commands if it is not installed.
    """
    check_choice("autoattack implementation", preferred, IMPLEMENTATIONS)
    candidates = ("autoattack", "torchattacks") if preferred == "auto" else (preferred,)
    for module in candidates:
        if _installed(module):
            return module
    raise ConfigError(
        f"attacks include autoattack but {' or '.join(candidates)} is not installed; {INSTALL_HINT}"
    )


class AutoAttack:
    """AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), on any model at call time.

    `num_classes` sets the targeted attacks' class count; `seed` their random starts.
    Runs in float32 with the model in eval mode (its modes are restored afterwards).
    """

    def __init__(self, norm: Norm | str, eps: float, num_classes: int, seed: int = 0,
                 implementation: str = "auto", batch_size: int = 500):
        self.norm = Norm.parse(norm)
        self.eps = float(eps)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.implementation = find_implementation(implementation)

    def __repr__(self) -> str:
        return (f"AutoAttack(norm={self.norm.value!r}, eps={self.eps:g}, version='standard', "
                f"implementation={self.implementation!r}, seed={self.seed})")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        norm = "Linf" if self.norm is Norm.LINF else "L2"
        x, y = x.detach(), y.detach().long()
        with eval_mode(model), torch.enable_grad():
            if self.implementation == "autoattack":
                from autoattack import AutoAttack as _AutoAttack

                adversary = _AutoAttack(model, norm=norm, eps=self.eps, version="standard",
                                        seed=self.seed, verbose=False, device=x.device)
                x_adv = adversary.run_standard_evaluation(x, y, bs=self.batch_size)
            else:
                import torchattacks

                adversary = torchattacks.AutoAttack(model, norm=norm, eps=self.eps, version="standard",
                                                    n_classes=self.num_classes, seed=self.seed)
                x_adv = adversary(x, y)
        return x_adv.detach().to(x.device, x.dtype)
