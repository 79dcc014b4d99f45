"""The AutoAttack adapter: each implementation through the attack contract, how ``auto`` chooses,
the provenance it reports, and the error when none is installed.

A budget large enough for APGD-CE to break every example keeps the later attacks (APGD-T, FAB-T,
Square: minutes on a CPU) from running, so each run takes about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging

import pytest
import torch

from mixrobust.attacks import PGD, AutoAttack, find_implementation
from mixrobust.attacks.autoattack import AUTHORS_LOGGER, implementation_provenance
from mixrobust.errors import ConfigError
from mixrobust.evaluation import run_sweep
from mixrobust.evaluation.sweep import attack_settings
from mixrobust.mixing import MixedClassifier
from tests.small_models import digits, fit_cnns


@pytest.fixture(scope="module")
def fitted():
    return fit_cnns()


def installed_only(monkeypatch, *modules: str) -> None:
    """Make importlib.util.find_spec see exactly `modules` among the implementations."""
    real = importlib.util.find_spec
    implementations = {"autoattack", "pyautoattack", "torchattacks"}

    def find_spec(name, *args):
        if name in implementations:
            return (real(name, *args) or object()) if name in modules else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ---------------------------------------------------------------- choosing an implementation


@pytest.mark.parametrize("present, chosen", [
    (("autoattack", "pyautoattack", "torchattacks"), "autoattack"),
    (("pyautoattack", "torchattacks"), "pyautoattack"),
    (("pyautoattack",), "pyautoattack"),
    (("torchattacks",), "torchattacks"),
])
def test_auto_prefers_the_authors_code(monkeypatch, present, chosen):
    installed_only(monkeypatch, *present)
    assert find_implementation("auto") == chosen
    assert all(find_implementation(name) == name for name in present)  # asked for by name, used


def test_missing_implementation_is_one_clear_error(monkeypatch):
    installed_only(monkeypatch)
    commands = ("pip install git+https://github.com/fra31/auto-attack", "pip install pyautoattack",
                "pip install --no-deps torchattacks")
    with pytest.raises(ConfigError) as auto:
        find_implementation("auto")
    assert str(auto.value).startswith("attacks include autoattack but no implementation is installed "
                                      "(autoattack.implementation=auto looked for autoattack, pyautoattack, "
                                      "torchattacks); install one: ")
    assert all(c in str(auto.value) for c in commands) and "\n" not in str(auto.value)
    with pytest.raises(ConfigError) as explicit:
        AutoAttack("linf", 0.3, num_classes=10, implementation="pyautoattack")
    assert str(explicit.value).startswith("autoattack.implementation=pyautoattack but the module pyautoattack "
                                          "is not installed; install it with pip install pyautoattack, ")
    assert all(c in str(explicit.value) for c in commands)
    with pytest.raises(ConfigError, match="unknown autoattack.implementation 'foolbox'; valid values: "
                                          "auto, autoattack, pyautoattack, torchattacks"):
        find_implementation("foolbox")


# ---------------------------------------------------------------- provenance


class FakeDistribution:
    def __init__(self, version, direct_url=None):
        self.version, self.direct_url = version, direct_url

    def read_text(self, name):
        return json.dumps(self.direct_url) if name == "direct_url.json" and self.direct_url else None


def test_provenance_names_the_code_that_ran(monkeypatch):
    aa = AutoAttack("linf", 0.3, num_classes=10, implementation="pyautoattack")
    version = importlib.metadata.version("pyautoattack")
    assert aa.implementation == "pyautoattack" and aa.provenance == f"pyautoattack {version}"
    assert f"provenance='pyautoattack {version}'" in repr(aa)
    # the evaluation cache keys adversarial images by the attack's settings: the code that made them counts
    assert attack_settings(aa)["provenance"] == f"pyautoattack {version}"
    assert AutoAttack("linf", 0.3, 10, implementation="torchattacks").provenance.startswith("torchattacks 3.")

    installed_only(monkeypatch, "pyautoattack")
    assert AutoAttack("l2", 0.5, 10, implementation="auto").provenance == f"pyautoattack {version}"

    git = {"url": "https://github.com/fra31/auto-attack", "vcs_info": {"vcs": "git", "commit_id": "1b76134e9fc1" + "0" * 28}}
    dists = {"autoattack": FakeDistribution("0.1", git)}

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert implementation_provenance("autoattack") == "autoattack 0.1 (git 1b76134e9fc1)"
    assert implementation_provenance("pyautoattack") == "pyautoattack unknown"
    dists["autoattack"] = FakeDistribution("0.1")
    assert implementation_provenance("autoattack") == "autoattack 0.1"


# ---------------------------------------------------------------- running


def test_pyautoattack_through_the_adapter(fitted, caplog, capsys):
    """The attack contract holds, the model is broken, and the authors' chatter stays out of the console."""
    g, _ = fitted
    x, y = digits(10)
    aa = AutoAttack("linf", 0.3, num_classes=10, seed=3, implementation="pyautoattack", batch_size=4)
    g.train()
    rng = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG):
        x_adv = aa(g, x, y)
    assert g.training and all(m.training for m in g.modules())  # modes restored
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert not [r for r in caplog.records if r.name == AUTHORS_LOGGER and r.levelno < logging.WARNING]
    assert capsys.readouterr() == ("", "")
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    g.eval()
    with torch.no_grad():
        clean, robust = (g(x).argmax(1) == y), (g(x_adv).argmax(1) == y)
    assert clean.float().mean() > 0.5 and robust.float().mean() < clean.float().mean()
    assert torch.equal(x_adv[~clean], x[~clean])  # examples misclassified clean are returned unchanged

    # a level the user chose for the authors' logger is honoured; same seed, same images
    logging.getLogger(AUTHORS_LOGGER).setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            again = aa(g, x, y)
    finally:
        logging.getLogger(AUTHORS_LOGGER).setLevel(logging.NOTSET)
    assert any(r.name == AUTHORS_LOGGER and r.levelno == logging.DEBUG for r in caplog.records)
    assert torch.equal(again, x_adv)


def test_autoattack_through_torchattacks_is_in_the_worst_case(fitted):
    g, h = fitted
    x, y = digits(6)
    attack = PGD("linf", eps=0.3, step_size=0.075, steps=3)
    aa = AutoAttack("linf", 0.3, num_classes=10, implementation="torchattacks", batch_size=6)
    res = run_sweep(g, h, x, y, alphas=[0.5], attack=attack, attacks=["mix", "autoattack"], autoattack=aa, batch_size=6)
    rows = {r["attack"]: r for r in res.rows() if r["model"] == "mix"}
    assert set(rows) == {"clean", "mix", "autoattack", "worst"} and rows["autoattack"]["steps"] is None
    assert rows["worst"]["accuracy"] <= min(rows["mix"]["accuracy"], rows["autoattack"]["accuracy"])
    # every row names the code that produced it, and the worst case names every attack it is taken over
    ours = f"mixrobust {importlib.metadata.version('mixrobust')}"
    torchattacks = f"torchattacks {importlib.metadata.version('torchattacks')}"
    assert aa.provenance == torchattacks
    assert [rows[a]["implementation"] for a in ("clean", "mix", "autoattack", "worst")] == [
        None, ours, torchattacks, " + ".join(sorted([ours, torchattacks]))]
    assert {r["implementation"] for r in res.rows() if r["model"] == "g" and r["attack"] in ("std", "rob")} == {ours}
    # the adapter keeps the threat: x_adv in the eps-ball and in [0,1]
    mixture = MixedClassifier(g, h, 0.5)
    x_adv = aa(mixture, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert rows["autoattack"]["accuracy"] == 0.0  # what the docstring relies on
