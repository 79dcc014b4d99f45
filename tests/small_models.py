"""Small models and digits batches shared by the unit tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch
from torch import nn

from mixrobust.models import create_model


def cnn(seed: int, width: int = 4) -> nn.Module:
    """A small CNN on 8x8 digits, initialized from `seed`, in eval mode."""
    torch.manual_seed(seed)
    return create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25], width=width, hidden=16).eval()


def digits(n: int = 48):
    """The first `n` digits test images (N, 1, 8, 8) in [0,1] and their labels."""
    from mixrobust.data import DigitsDataModule

    x, y = DigitsDataModule().eval_tensors("test")
    return x[:n], y[:n]


def fit_cnns() -> list[nn.Module]:
    """Two small CNNs fitted for a few full-batch steps on digits: ~80-95% clean accuracy."""
    from mixrobust.data import DigitsDataModule

    xt, yt = DigitsDataModule().eval_tensors("train")
    models = []
    for seed in (0, 1):
        m = cnn(seed, width=8).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(25):
            loss = nn.functional.cross_entropy(m(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(m.eval())
    return models


def mlp() -> nn.Module:
    """A fixed random 5-class MLP on (N, 3, 4, 4) images."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5)).eval()
