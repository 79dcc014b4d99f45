"""NaN or inf model outputs stop attacks and smoothing with a NonFiniteError instead of a meaningless score."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixrobust.attacks import FGSM, PGD
from mixrobust.attacks.pgd import check_finite, nonfinite_rows, raise_if_nonfinite
from mixrobust.certify.mixture import sample_votes
from mixrobust.certify.smoothing import SmoothedClassifier
from mixrobust.errors import NonFiniteError
from tests.small_models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


# --- small models ---------------------------------------------------------------------------


def _nan_model(in_features: int = 48) -> nn.Module:
    """A 3-class linear model whose weights are NaN, as loaded from a diverged checkpoint."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    return model.eval()


class LogReLU(nn.Module):
    """Logits (log relu(mean(x) - 1/2), 0, 0): -inf on images of mean <= 1/2, finite on brighter ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(x.flatten(1).mean(dim=1) - 0.5).log()  # (N,)
        zero = torch.zeros_like(z)
        return torch.stack([z, zero, zero], dim=1)  # (N, 3)


DARK = [1, 4, 6]  # images of mean ~0.2: LogReLU is -inf there (and within any ball used below)


def _dark_and_bright(n: int = 8, shape=(3, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0.1, 0.3] at positions DARK and in [0.7, 0.9] elsewhere, with labels in 0..2."""
    g = torch.Generator().manual_seed(5)
    x = 0.7 + 0.2 * torch.rand((n, *shape), generator=g)
    x[DARK] -= 0.6
    return x, torch.randint(0, 3, (n,), generator=g)


# --- the helpers ----------------------------------------------------------------------------


def test_check_finite_counts_rows_with_nan_or_inf():
    logits = torch.zeros(5, 3)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    logits[4, 1] = -float("inf")
    assert nonfinite_rows(logits).tolist() == [False, True, False, True, True]
    with pytest.raises(NonFiniteError, match=r"^g returned NaN or inf outputs on 3 of 5 examples; its scores "
                                             r"would be meaningless: check the checkpoint's weights \(NaN\?\)"):
        check_finite(logits, "g")
    check_finite(torch.full((4, 3), 1e30), "g")  # large but finite
    raise_if_nonfinite(torch.zeros(4, dtype=torch.bool), "g")
    with pytest.raises(NonFiniteError, match=r"^h returned NaN or inf outputs on 1 of 2 examples during x; "):
        raise_if_nonfinite(torch.tensor([False, True]), "h", during=" during x")


# --- attacks --------------------------------------------------------------------------------

ATTACKS = {
    "pgd-linf": lambda: PGD("linf", eps=0.05, step_size=0.02, steps=3),
    "pgd-l2-restarts": lambda: PGD("l2", eps=0.5, step_size=0.2, steps=3, loss="margin", random_start=True,
                                   restarts=2),
    "fgsm": lambda: FGSM("linf", eps=0.05),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_nan_weights_make_the_attack_raise_with_every_example_counted(name):
    attack, model = ATTACKS[name](), _nan_model()
    model.train()
    x, y = _dark_and_bright()
    search = "FGSM" if name == "fgsm" else "PGD"
    with pytest.raises(NonFiniteError, match=rf"^the model returned NaN or inf outputs on 8 of 8 examples during "
                                             rf"the {search} search; its scores would be meaningless"):
        attack(model, x, y)
    assert model.training and model[1].training  # modes restored on the error too
    assert model[1].weight.grad is None


@pytest.mark.parametrize("name", ATTACKS)
def test_inf_on_part_of_the_batch_counts_those_examples(name):
    x, y = _dark_and_bright()
    with pytest.raises(NonFiniteError, match=rf"outputs on {len(DARK)} of 8 examples during"):
        ATTACKS[name]()(LogReLU(), x, y)


def test_inf_at_a_visited_point_only_still_raises():
    """The clean outputs are finite; the search (pushing the mean below 1/2) meets -inf at its iterates."""
    x = torch.full((4, 3, 4, 4), 0.52)
    x[2:] = 0.9  # stays finite: the search cannot get below mean 0.85
    y = torch.zeros(4, dtype=torch.long)  # the loss grows as logit 0 falls, i.e. as the mean falls
    check_finite(LogReLU()(x), "the model")
    with pytest.raises(NonFiniteError, match=r"outputs on 2 of 4 examples during the PGD search"):
        PGD("linf", eps=0.05, step_size=0.03, steps=3)(LogReLU(), x, y)


# (sum of x_adv, sum of x_adv weighted by linspace(-1, 1), examples misclassified at x_adv) of
# each attack on `_mlp`, recorded with the attacks before the non-finite check existed; the single
# searches' again when their final iterate came to be judged too (the highest-loss point kept, no
# longer the final iterate: the same 13 examples fooled).
SEEDED = [
    (lambda: PGD("linf", eps=0.02, step_size=0.008, steps=4, random_start=True, restarts=2, seed=3),
     (378.324792, -2.219237, 13)),
    (lambda: PGD("l2", eps=0.1, step_size=0.04, steps=4, loss="margin", random_start=True, seed=3),
     (379.124283, -1.926137, 13)),
    (lambda: FGSM("linf", eps=0.02), (378.262017, -2.163628, 13)),
]


@pytest.mark.parametrize(("make", "expected"), SEEDED)
def test_finite_models_get_the_same_adversarial_examples_as_before(make, expected):
    g = torch.Generator().manual_seed(11)
    x = torch.rand((16, 3, 4, 4), generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    model = mlp()
    x_adv = make()(model, x, y)
    weights = torch.linspace(-1, 1, 48).view(1, 3, 4, 4)
    total, weighted, fooled = expected
    assert x_adv.double().sum().item() == pytest.approx(total, abs=1e-4)
    assert (x_adv.double() * weights).sum().item() == pytest.approx(weighted, abs=1e-4)
    assert int((model(x_adv).argmax(dim=1) != y).sum()) == fooled


class _HostSyncs:
    """Counts conversions of tensors to Python values (each one a host sync on a GPU)."""

    METHODS = ("__bool__", "__int__", "__float__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_the_search_syncs_twice_whatever_the_number_of_steps(monkeypatch):
    x, y = _dark_and_bright()
    x, y = x[[0, 2, 3]], y[[0, 2, 3]]  # bright images only: finite outputs
    syncs = _HostSyncs(monkeypatch)
    counts = []
    for steps in (1, 10):
        syncs.count = 0
        PGD("linf", eps=0.05, step_size=0.02, steps=steps, random_start=True, restarts=2)(LogReLU(), x, y)
        counts.append(syncs.count)
    assert counts == [2, 2]  # the [0,1] range check and the non-finite check


# --- smoothing ------------------------------------------------------------------------------

SAMPLERS = {
    "sample_counts": lambda sm, x: sm.sample_counts(x, 40),
    "sample_soft_moments": lambda sm, x: sm.sample_soft_moments(x, 40),
    "probs": lambda sm, x: sm.probs(x, 40),
    "predict": lambda sm, x: sm.predict(x, 40, 0.01),
    "certify": lambda sm, x: sm.certify(x, 40, 40, 0.01),  # n0 = n: the messages' counts are those of n
    "sample_votes": lambda sm, x: sample_votes(sm, x, 40, 40),
}


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "pooled"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_nan_base_model_votes_raise_naming_every_image(sampler, workers):
    sm = SmoothedClassifier(_nan_model(64), 0.25, batch_size=16, workers=workers)
    x = torch.rand(5, 1, 8, 8)
    with pytest.raises(NonFiniteError, match=r"^the base model returned NaN or inf outputs on noisy copies of 5 "
                                             r"of 5 images \(200 of 200 noisy copies\) during smoothing "
                                             r"\(sigma=0.25\); its scores would be meaningless"):
        SAMPLERS[sampler](sm, x)
    assert torch.get_num_threads() == 1  # the pool's thread count is restored


@pytest.mark.parametrize("votes", ["hard", "soft"])
@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "pooled"])
def test_inf_on_some_images_counts_those_images(workers, votes):
    """Dark images' noisy copies (mean ~0.2, noise std 0.25/8 on the mean) all give -inf; bright ones none."""
    x, _ = _dark_and_bright(8, (1, 8, 8))
    sm = SmoothedClassifier(LogReLU(), 0.25, votes=votes, batch_size=16, workers=workers)
    with pytest.raises(NonFiniteError, match=rf"noisy copies of {len(DARK)} of 8 images "
                                             rf"\({len(DARK) * 30} of 240 noisy copies\)"):
        sm.sample_counts(x, 30)
    bright = [i for i in range(8) if i not in DARK]
    counts = sm.sample_counts(x[bright], 30)  # finite votes are counted as before
    assert counts.sum(dim=1).tolist() == pytest.approx([30] * len(bright))


def test_autocast_passes_are_checked_in_every_pool_thread():
    sm = SmoothedClassifier(_nan_model(64), 0.5, batch_size=8, workers=2, autocast_dtype="bfloat16")
    with pytest.raises(NonFiniteError, match="on noisy copies of 2 of 2 images"):
        sm.sample_counts(torch.rand(2, 1, 8, 8), 24)


def test_smoothing_syncs_once_per_call_whatever_the_number_of_passes(monkeypatch):
    x, _ = _dark_and_bright(8, (1, 8, 8))
    x = x[[0, 2]]  # bright: finite votes
    syncs = _HostSyncs(monkeypatch)
    counts = []
    for batch_size in (64, 4):  # 1 pass and 16 passes
        sm = SmoothedClassifier(LogReLU(), 0.25, batch_size=batch_size, workers=1)
        syncs.count = 0
        sm.sample_counts(x, 32)
        counts.append(syncs.count)
    assert counts == [1, 1]  # the non-finite check
