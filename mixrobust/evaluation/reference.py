"""The sweep computed the plain way: every (alpha, attack) pair from scratch, nothing cached.

Slow by design and obviously correct: the oracle that `run_sweep` is tested against, and the
baseline that benchmarks/bench_sweep.py measures the engine's reuse against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mixrobust.attacks import PGD, attack_in_batches, model_device
from mixrobust.evaluation.options import MixOption
from mixrobust.mixing import MixedClassifier


def predict_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> np.ndarray:
    """(N,) bool: `model` classifies each image of `x` as its label in `y` (chunks on the model's device)."""
    device = model_device(model, x.device)
    correct = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            correct.append((model(xb).argmax(-1) == yb).cpu())
    return torch.cat(correct).numpy()


def reference_sweep(
    g: nn.Module,
    h: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    alphas: Sequence[float],
    attack: PGD,
    option: MixOption = MixOption(),
    batch_size: int = 500,
) -> dict[str, np.ndarray]:
    """Raw correctness (A, N) of the mixture at each alpha on the clean, STD, ROB and MIX images.

    For every alpha separately: PGD on g, PGD on h and PGD on the mixture, each judged by the
    mixture; the keys are ``clean``, ``std``, ``rob``, ``mix``.
    """
    mixture = MixedClassifier(g, h, 0.5, option.r_option, option.mix_space, norm=attack.norm)
    out = {name: [] for name in ("clean", "std", "rob", "mix")}
    for alpha in alphas:
        mixture.alpha = float(alpha)
        out["clean"].append(predict_correct(mixture, x, y, batch_size))
        for name, target in (("std", g), ("rob", h), ("mix", mixture)):
            x_adv = attack_in_batches(attack, target, x, y, batch_size)
            out[name].append(predict_correct(mixture, x_adv, y, batch_size))
    return {name: np.stack(values) for name, values in out.items()}
