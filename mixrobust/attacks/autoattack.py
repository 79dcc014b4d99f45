"""AutoAttack (Croce and Hein, standard version) through an installed implementation.

Three implementations are supported through this small adapter (none is vendored), chosen with
the config key ``autoattack.implementation``:

- ``autoattack``: the authors' code from GitHub, ``pip install git+https://github.com/fra31/auto-attack``;
- ``pyautoattack``: the authors' code as packaged on PyPI (module ``pyautoattack``, its own
  keyword-only API), ``pip install pyautoattack``;
- ``torchattacks``: torchattacks' port, ``pip install --no-deps torchattacks`` (its metadata pins
  ``requests~=2.25.1``, which a plain install would downgrade; it does not use requests).

``auto`` takes the first of these that is installed, in that order. The adapter follows the attack
contract ``attack(model, x, y) -> x_adv`` and says which code ran: `AutoAttack.provenance` is
``"<module> <version>"`` (e.g. ``"pyautoattack 0.2.0"``), so a reported number can be traced to
the implementation that produced it. All three attack only the examples the model classifies
correctly and return the others unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mixrobust.attacks.pgd import eval_mode
from mixrobust.errors import ConfigError, check_choice, check_count
from mixrobust.threat import Norm

IMPLEMENTATIONS = Literal["auto", "autoattack", "pyautoattack", "torchattacks"]
IMPLEMENTATION_NAMES: tuple[str, ...] = get_args(IMPLEMENTATIONS)
#: What ``auto`` tries, in this order: the authors' code (GitHub, then PyPI), then torchattacks' port.
AUTO_ORDER: tuple[str, ...] = tuple(name for name in IMPLEMENTATION_NAMES if name != "auto")

#: module -> (install command, what it is)
INSTALLS = {
    "autoattack": ("pip install git+https://github.com/fra31/auto-attack", "the authors' code"),
    "pyautoattack": ("pip install pyautoattack", "the authors' code on PyPI"),
    "torchattacks": ("pip install --no-deps torchattacks", "torchattacks' port"),
}
INSTALL_HINT = ", ".join(f"{command} ({what}, module {module})" for module, (command, what) in INSTALLS.items())
#: module -> the distribution whose metadata gives its version
DISTRIBUTIONS = {"autoattack": "autoattack", "pyautoattack": "pyautoattack", "torchattacks": "torchattacks"}
#: the logger through which the authors' code reports progress (and its own pre-flight warnings)
AUTHORS_LOGGER = "auto-attack"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def find_implementation(preferred: IMPLEMENTATIONS = "auto") -> str:
    """The module of the AutoAttack implementation to use: `preferred`, or for ``auto`` the first
    installed of `AUTO_ORDER`. ConfigError naming the config key and the install commands if
    it is not installed.
    """
    check_choice("autoattack.implementation", preferred, IMPLEMENTATION_NAMES)
    candidates = AUTO_ORDER if preferred == "auto" else (preferred,)
    for module in candidates:
        if _installed(module):
            return module
    if preferred == "auto":
        raise ConfigError(f"attacks include autoattack but no implementation is installed "
                          f"(autoattack.implementation=auto looked for {', '.join(AUTO_ORDER)}); "
                          f"install one: {INSTALL_HINT}")
    raise ConfigError(f"autoattack.implementation={preferred} but the module {preferred} is not installed; "
                      f"install it with {INSTALLS[preferred][0]}, or set autoattack.implementation to "
                      f"another one (auto takes whichever is installed): {INSTALL_HINT}")


def implementation_provenance(module: str) -> str:
    """``"<module> <version>"`` of an installed implementation, from its distribution's metadata.

    The version is ``unknown`` without metadata (e.g. a clone put on ``sys.path``). A git install
    (whose version never changes: the authors' code stays at 0.1) adds its commit, read from the
    install record (PEP 610): ``"autoattack 0.1 (git 1b76134e9fc1)"``.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTIONS[module])
    except importlib.metadata.PackageNotFoundError:
        return f"{module} unknown"
    text = f"{module} {dist.version or 'unknown'}"
    try:
        commit = json.loads(dist.read_text("direct_url.json") or "{}").get("vcs_info", {}).get("commit_id")
    except (ValueError, AttributeError):  # an unreadable install record costs the commit only
        commit = None
    return f"{text} (git {commit[:12]})" if commit else text


@contextlib.contextmanager
def _quiet_authors_logger() -> Iterator[None]:
    """The authors' logger at WARNING unless the user set its level: their progress messages
    (INFO and DEBUG) stay out of the console, their pre-flight warnings do not."""
    logger = logging.getLogger(AUTHORS_LOGGER)
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """Every implementation reseeds torch's global generators, and the authors' check for dynamic
    defenses ends with ``sys.settrace(None)``: restore the caller's random state and tracer
    (a debugger, coverage) afterwards."""
    devices = []
    if device.type == "cuda":
        current = torch.cuda.current_device()
        devices = sorted({current, current if device.index is None else device.index})
    tracer = sys.gettrace()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


class AutoAttack:
    """AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), on any model at call time.

    `num_classes` sets the targeted attacks' class count (the authors' nine target classes, or
    fewer for a model with fewer than ten classes); `seed` their random draws, so equal seeds give
    equal results (as far as the model's kernels are deterministic); `batch_size` how many images
    the implementation attacks at once. Runs in float32 with the model in eval mode (its modes
    are restored afterwards); torch's global random state is left as it was.

    `implementation` is the module that runs (after resolving ``auto``) and `provenance` its
    ``"<module> <version>"``; both are plain attributes, so they are part of the attack's
    settings (and of the evaluation cache's key for its images).
    """

    def __init__(self, norm: Norm | str, eps: float, num_classes: int, seed: int = 0,
                 implementation: IMPLEMENTATIONS = "auto", batch_size: int = 500):
        self.norm = Norm.parse(norm)
        self.eps = float(eps)
        self.num_classes = check_count("autoattack num_classes", num_classes)
        self.seed = int(seed)
        self.batch_size = check_count("batch_size", batch_size)
        self.implementation: str = find_implementation(implementation)
        self.provenance: str = implementation_provenance(self.implementation)

    def __repr__(self) -> str:
        return (f"AutoAttack(norm={self.norm.value!r}, eps={self.eps:g}, version='standard', "
                f"seed={self.seed}, provenance={self.provenance!r})")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x32, y = x.detach().float(), y.detach().long()
        with eval_mode(model), torch.enable_grad(), _quiet_authors_logger(), _isolated(x.device):
            x_adv = self._run(model, x32, y)
        return x_adv.detach().to(x.device, x.dtype)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        norm = "Linf" if self.norm is Norm.LINF else "L2"
        if self.implementation == "torchattacks":
            import torchattacks

            adversary = torchattacks.AutoAttack(model, norm=norm, eps=self.eps, version="standard",
                                                n_classes=self.num_classes, seed=self.seed)
            return torch.cat([adversary(xb, yb) for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size))])
        if self.implementation == "pyautoattack":
            import pyautoattack

            adversary = pyautoattack.AutoAttack(model, norm=norm, eps=self.eps, version="standard",
                                                seed=self.seed, device=x.device)
            adversary.verbose = False  # no constructor argument; skips building its DEBUG messages
            self._limit_targets(adversary)
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)
            return x_adv
        import autoattack

        adversary = autoattack.AutoAttack(model, norm=norm, eps=self.eps, version="standard",
                                          seed=self.seed, verbose=False, device=x.device)
        self._limit_targets(adversary)
        return adversary.run_standard_evaluation(x, y, bs=self.batch_size)

    def _limit_targets(self, adversary) -> None:
        """The authors' code always targets nine classes; a model with fewer has num_classes - 1."""
        for attack in (adversary.apgd_targeted, adversary.fab):
            attack.n_target_classes = min(attack.n_target_classes, self.num_classes - 1)
