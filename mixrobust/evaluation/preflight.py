"""Pre-flight checks in the spirit of AutoAttack's: warnings about a model before a long evaluation.

Each check looks for a way an attack evaluation can silently overstate robustness:

- a model left in train mode (dropout, batch statistics): the sweep evaluates it in eval mode;
- outputs that look like probabilities (rows in [0,1] summing to 1) instead of logits: attacks
  and the mixture treat outputs as logits, and cross-entropy on probabilities has weak gradients;
- zero input gradients on a batch: gradient-based attacks (PGD) cannot move those examples;
- a randomized forward pass (two passes differ): a fixed-point PGD is the wrong attack, use
  expectation over transformation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mixrobust.attacks import eval_mode, model_device

log = logging.getLogger(__name__)

#: Relative tolerance of the randomness check (nondeterministic GPU kernels differ by ~1e-7).
RANDOM_RTOL = 1e-5


def _train_mode(model: nn.Module, name: str) -> list[str]:
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if not training:
        return []
    shown = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
    return [
        f"{name} is in train mode ({len(training)} modules: {shown}); it is evaluated and attacked in "
        "eval mode. If its defense relies on train-mode behaviour (dropout, batch statistics), the "
        "numbers do not reflect it."
    ]


def _probabilities(out: torch.Tensor, name: str) -> list[str]:
    in_unit = bool(((out >= 0) & (out <= 1)).all())
    sums_to_one = bool(((out.sum(dim=1) - 1).abs() < 1e-4).all())
    if not (in_unit and sums_to_one):
        return []
    return [
        f"{name}'s outputs look like probabilities (every row in [0,1] and summing to 1), not logits: "
        "the mixture applies softmax to them and attacks take them as logits, which flattens the "
        "loss and weakens gradient attacks. Remove the final softmax."
    ]


def _zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> list[str]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    zero = x.shape[0] if grad is None else int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero == 0:
        return []
    return [
        f"{name} has zero input gradient on {zero} of {x.shape[0]} examples of the first batch: "
        "gradient attacks (PGD) cannot move them, so robustness may be overestimated (gradient "
        "masking). Add a gradient-free attack (attacks=[...,autoattack] includes Square)."
    ]


def _randomized(out1: torch.Tensor, out2: torch.Tensor, name: str) -> list[str]:
    diff = (out1 - out2).abs().max().item()
    if diff <= RANDOM_RTOL * (1.0 + out1.abs().max().item()):
        return []
    return [
        f"{name}'s forward pass is randomized: two passes on the same inputs differ by up to {diff:.3g}. "
        "A fixed-point PGD misjudges randomized defenses; evaluate them with expectation over "
        "transformation (e.g. AutoAttack's rand version)."
    ]


def preflight_warnings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str = "model") -> list[str]:
    """The warnings (possibly none) for `model` on a batch `x` (N, C, H, W) in [0,1], labels `y` (N,).

    Runs three forward passes and one backward on the batch, in eval mode; the model's modes are
    restored afterwards and no parameter gradients are touched.
    """
    warnings = _train_mode(model, name)
    device = model_device(model, x.device)
    x, y = x.to(device), y.to(device).long()
    with eval_mode(model):
        with torch.no_grad():
            out1, out2 = model(x).float(), model(x).float()
        warnings += _probabilities(out1, name)
        warnings += _randomized(out1, out2, name)
        warnings += _zero_gradients(model, x, y, name)
    return warnings


def run_preflight(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Log (as warnings) and return the pre-flight warnings of every named model on batch (x, y)."""
    warnings = []
    for name, model in models.items():
        for message in preflight_warnings(model, x, y, name):
            log.warning("pre-flight: %s", message)
            warnings.append(message)
    return warnings
