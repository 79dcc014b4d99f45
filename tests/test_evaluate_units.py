"""Evaluation building blocks against hand-computed numbers: counting rule, margins, outcomes file,
pre-flight warnings, the cached mixture, the engine vs the from-scratch reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from mixrobust.attacks import PGD
from mixrobust.errors import ConfigError
from mixrobust.evaluation import (
    MixOption,
    Outcomes,
    aggregate,
    load_outcomes,
    margin_summary,
    mix_cached,
    mix_options,
    parse_attacks,
    preflight_warnings,
    probability_gap,
    read_results_csv,
    reference_sweep,
    rows_to_csv,
    run_preflight,
    run_sweep,
    save_outcomes,
)
from mixrobust.mixing import MixedClassifier
from mixrobust.models import create_model
from tests.small_models import cnn, digits, fit_cnns


@pytest.fixture(scope="module")
def fitted():
    return fit_cnns()


# ---------------------------------------------------------------- counting rule and files


def hand_outcomes() -> Outcomes:
    """N = 4 examples, one option, alphas (0, 1); numbers chosen so every rule matters."""
    clean = np.array([[[1, 1, 1, 0], [1, 0, 1, 1]]], bool)  # (M=1, A=2, N=4)
    std = np.array([[[1, 0, 1, 1], [1, 1, 0, 1]]], bool)  # example 3 at alpha 0: right under STD, wrong clean
    mix = np.array([[[0, 1, 1, 1], [1, 0, 1, 1]]], bool)
    base = {"g": {"clean": np.array([1, 1, 1, 0], bool), "std": np.array([0, 0, 1, 1], bool),
                  "rob": np.array([1, 1, 1, 1], bool)},
            "h": {"clean": np.array([1, 0, 1, 1], bool), "std": np.array([1, 1, 1, 1], bool),
                  "rob": np.array([1, 0, 0, 1], bool)}}
    return Outcomes(alphas=np.array([0.0, 1.0]), options=(MixOption(),), attacks=("std", "mix"),
                    mix={"clean": clean, "std": std, "mix": mix}, base=base, index=np.arange(10, 14),
                    labels=np.array([0, 1, 2, 3]), norm="linf", eps=0.2, steps=20)


def test_aggregate_counting_rule_by_hand():
    rows = aggregate(hand_outcomes())
    got = {(r["model"], None if math.isnan(r["alpha"]) else r["alpha"], r["attack"]): r["accuracy"] for r in rows}
    # g: clean 3/4; std: clean & std = [0,0,1,0] -> 1/4; rob: [1,1,1,0] -> 3/4; worst: [0,0,1,0]
    assert got[("g", None, "clean")] == 0.75 and got[("g", None, "std")] == 0.25
    assert got[("g", None, "rob")] == 0.75 and got[("g", None, "worst")] == 0.25
    # h: clean [1,0,1,1]; std -> 3/4; rob [1,0,0,1] -> 2/4; worst 2/4
    assert got[("h", None, "std")] == 0.75 and got[("h", None, "rob")] == 0.5 and got[("h", None, "worst")] == 0.5
    # mixture alpha 0: clean 3/4, std [1,0,1,0] 2/4 (example 3 does not count: wrong clean), mix [0,1,1,0] 2/4,
    # worst [0,0,1,0] 1/4
    assert got[("mix", 0.0, "clean")] == 0.75 and got[("mix", 0.0, "std")] == 0.5
    assert got[("mix", 0.0, "mix")] == 0.5 and got[("mix", 0.0, "worst")] == 0.25
    # alpha 1: clean [1,0,1,1]; std [1,0,0,1]; mix [1,0,1,1]; worst [1,0,0,1]
    assert got[("mix", 1.0, "std")] == 0.5 and got[("mix", 1.0, "mix")] == 0.75 and got[("mix", 1.0, "worst")] == 0.5
    assert {r["n"] for r in rows} == {4} and {r["steps"] for r in rows if r["attack"] == "clean"} == {0}
    assert [r["attack"] for r in rows if r["model"] == "mix"][:4] == ["clean", "std", "mix", "worst"]


def test_outcomes_file_roundtrip_and_csv(tmp_path):
    outcomes = hand_outcomes()
    save_outcomes(tmp_path / "o.npz", outcomes)
    back = load_outcomes(tmp_path / "o.npz")
    assert back.options == outcomes.options and back.attacks == outcomes.attacks
    np.testing.assert_array_equal(back.index, [10, 11, 12, 13])
    for key in outcomes.mix:
        np.testing.assert_array_equal(back.mix[key], outcomes.mix[key])
    rows = aggregate(outcomes)
    assert rows_to_csv(aggregate(back)) == rows_to_csv(rows)
    (tmp_path / "r.csv").write_text(rows_to_csv(rows))
    parsed = read_results_csv(tmp_path / "r.csv")
    assert len(parsed) == len(rows)
    for a, b in zip(parsed, rows):
        assert a.keys() == b.keys()
        for k in a:
            assert (math.isnan(a[k]) and math.isnan(b[k])) if k == "alpha" and b["model"] != "mix" else a[k] == b[k]


def test_probability_gap_and_margin_summary_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1]]))
    torch.testing.assert_close(probability_gap(logits), torch.tensor([0.5, 0.1]))
    s = margin_summary(np.array([0.5, 0.1, 0.3, 0.9]), np.array([True, False, True, True]))
    assert s["correct"] == {"mean": pytest.approx(1.7 / 3), "median": pytest.approx(0.5), "n": 3}
    assert s["incorrect"] == {"mean": pytest.approx(0.1), "median": pytest.approx(0.1), "n": 1}
    assert margin_summary(np.array([0.2]), np.array([True]))["incorrect"] == {"mean": None, "median": None, "n": 0}


# ---------------------------------------------------------------- vocabularies


def test_the_worst_case_legend_names_what_each_kind_of_row_took_it_over():
    from mixrobust.evaluation.plots import attack_legend

    def rows(model, attacks):
        return [{"model": model, "attack": a} for a in ("clean", *attacks, "worst")]

    base = rows("g", ("std", "rob", "apgd")) + rows("h", ("std", "rob", "apgd"))
    assert attack_legend(base + rows("mix", ("std", "rob", "apgd", "mix")), "worst") == \
        "worst case (of STD, ROB, APGD, MIX)"
    # attacks=[mix,apgd]: the mixture's worst case leaves out STD and ROB, which g's and h's still include
    assert attack_legend(base + rows("mix", ("mix", "apgd")), "worst") == \
        "worst case (of MIX, APGD; g's and h's also of STD, ROB)"
    assert attack_legend(base, "worst") == "worst case (of STD, ROB, APGD)"


def test_vocabularies():
    assert [a.value for a in parse_attacks(["std", "MIX", "std"])] == ["std", "mix"]
    with pytest.raises(ConfigError, match="unknown attack 'cw'; valid values: std, rob, mix, apgd, autoattack"):
        parse_attacks(["std", "cw"])
    assert [o.label for o in mix_options(["one", "grad_g_i"], ["prob", "logit"])] == [
        "one/prob", "one/logit", "grad_g_i/prob", "grad_g_i/logit"]
    with pytest.raises(ConfigError, match="unknown r_option 'grad'; valid values: one, grad_g_i"):
        mix_options(["grad"], ["prob"])
    with pytest.raises(ConfigError, match="unknown mix_space 'probs'; valid values: prob, logit"):
        mix_options(["one"], ["probs"])


# ---------------------------------------------------------------- pre-flight


class Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + torch.randn(x.shape[0], 10)


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        return self.bias + 0 * x.flatten(1)[:, :1]  # depends on x with a zero gradient


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: cnn(0).train(), "g is in train mode"),
        (lambda: nn.Sequential(cnn(0), nn.Softmax(dim=1)), "look like probabilities"),
        (Constant, "zero input gradient on 16 of 16 examples"),
        (lambda: Noisy(cnn(0)), "forward pass is randomized"),
    ],
)
def test_preflight_warnings(make, pattern, caplog):
    x, y = digits(16)
    model = make()
    modes = [m.training for m in model.modules()]
    with caplog.at_level(logging.WARNING):
        warnings = run_preflight({"g": model}, x, y)
    assert any(pattern in w for w in warnings), warnings
    assert any(pattern in r.getMessage() for r in caplog.records)
    assert [m.training for m in model.modules()] == modes  # modes restored


def test_preflight_quiet_on_a_plain_classifier():
    x, y = digits(16)
    assert preflight_warnings(cnn(0), x, y, "g") == []


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_mix_cached_equals_mixed_classifier(space):
    g, h = cnn(0), cnn(1)
    x, _ = digits(8)
    alphas = [0.0, 0.25, 0.5, 1.0]
    want = MixedClassifier(g, h, alphas, mix_space=space)(x)
    assert torch.equal(mix_cached(g(x), h(x), alphas, space), want)


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts / lists -> {"a/b/0/c": leaf}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for key, value in items:
        out |= flatten(value, f"{prefix}/{key}")
    return out


def _and_clean(outcomes: dict, m: int | None = None) -> dict:
    clean = outcomes["clean"] if m is None else outcomes["clean"][m]
    return {k: (v if m is None else v[m]) & clean for k, v in outcomes.items()}


@pytest.mark.parametrize("option", [("one", "prob"), ("one", "logit"), ("grad_max_g", "prob")])
def test_engine_matches_from_scratch_reference(fitted, option):
    """Cached clean logits and shared STD/ROB images give every outcome of the plain computation."""
    g, h = fitted
    x, y = digits(40)
    attack = PGD("linf", eps=0.1, step_size=0.025, steps=4)
    alphas = [0.0, 0.4, 0.6, 1.0]
    res = run_sweep(g, h, x, y, alphas=alphas, attack=attack, options=[option], batch_size=16, reuse=False)
    ref = _and_clean(reference_sweep(g, h, x, y, alphas=alphas, attack=attack, option=MixOption(*option),
                                     batch_size=16))
    got = _and_clean(res.outcomes.mix, 0)
    for name in ("clean", "std", "rob", "mix"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # base rows come from the same images: g's clean outcome is the mixture's at alpha 0
    np.testing.assert_array_equal(res.outcomes.base["g"]["clean"], ref["clean"][0])
    np.testing.assert_array_equal(res.outcomes.base["h"]["clean"], ref["clean"][-1])


def test_endpoint_reuse_equals_own_pgd(fitted):
    """MIX at alpha 0 / 1 is STD's / ROB's run; attacking the mixture there agrees up to rounding."""
    g, h = fitted
    x, y = digits(48)
    attack = PGD("linf", eps=0.1, step_size=0.025, steps=4)
    kw = dict(alphas=[0.0, 1.0], attack=attack, batch_size=16)
    reused, scratch = run_sweep(g, h, x, y, **kw), run_sweep(g, h, x, y, reuse=False, **kw)
    rows = {(r["model"], r["alpha"], r["attack"]): r["accuracy"] for r in reused.rows() if r["model"] != "h"}
    h_rob = next(r["accuracy"] for r in reused.rows() if r["model"] == "h" and r["attack"] == "rob")
    assert rows[("mix", 0.0, "mix")] == rows[("mix", 0.0, "std")] and rows[("mix", 1.0, "mix")] == h_rob
    for a in (0, 1):
        diff = reused.outcomes.mix["mix"][0, a] != scratch.outcomes.mix["mix"][0, a]
        assert diff.sum() <= 2  # float rounding of log_softmax(log_softmax(z)) vs log_softmax(z)


def test_skipping_misclassified_examples_changes_nothing(fitted):
    g, h = fitted
    x, y = digits(48)
    attack = PGD("linf", eps=0.15, step_size=0.04, steps=4)
    kw = dict(alphas=[0.0, 0.3, 0.5, 1.0], attack=attack, options=[("one", "prob"), ("one", "logit")],
              batch_size=16)
    full, skip = run_sweep(g, h, x, y, skip_misclassified=False, **kw), run_sweep(g, h, x, y, **kw)
    assert skip.rows() == full.rows()
    # margins agree up to float rounding: the skipped run batches the forward passes differently
    flat_skip, flat_full = flatten(skip.margins), flatten(full.margins)
    assert flat_skip.keys() == flat_full.keys()
    for key, value in flat_full.items():
        assert flat_skip[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert any(r["accuracy"] < 1 for r in full.rows() if r["attack"] == "clean")  # something was skipped


def test_random_start_disables_skipping(fitted, caplog):
    g, h = fitted
    x, y = digits(8)
    attack = PGD("linf", eps=0.1, step_size=0.025, steps=1, random_start=True)
    with caplog.at_level(logging.WARNING):
        res = run_sweep(g, h, x, y, alphas=[0.5], attack=attack, batch_size=8)
    assert res.outcomes.meta["skip_misclassified"] is False
    assert "skip_misclassified is ignored with random_start" in caplog.text


def test_settings_that_weaken_the_attacks_are_warned_about_and_labelled(fitted, caplog):
    g, h = fitted
    x, y = digits(8)
    attack = PGD("linf", eps=0.1, step_size=0.025, steps=1, autocast_dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        res = run_sweep(g, h, x, y, alphas=[0.5], options=[("grad_g_i", "prob")], attack=attack, batch_size=8,
                        detach_r=True, preflight=False)
    (detached,) = [w for w in res.warnings if w.startswith("mix.detach_r=true")]
    (half,) = [w for w in res.warnings if w.startswith("attack.autocast_dtype=bfloat16")]
    assert detached in caplog.text and half in caplog.text
    labels = res.outcomes.meta["labels"]
    assert labels["mix"] == "PGD-1 (ce, bfloat16 search) on the mixture (R_i detached: not a sound attack)"
    assert labels["std"] == "PGD-1 (ce, bfloat16 search) on g"
    # R_i = 1 does not depend on the image: detaching it changes nothing, and float32 PGD is the paper's
    plain = run_sweep(g, h, x, y, alphas=[0.5], attack=PGD("linf", eps=0.1, step_size=0.025, steps=1),
                      batch_size=8, detach_r=True, preflight=False)
    assert plain.warnings == [] and plain.outcomes.meta["labels"]["mix"] == "PGD-1 (ce) on the mixture (the paper's)"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(alphas=[0.0, 1.2]), r"alpha must be in \[0, 1\]"),
        (dict(options=[("ones", "prob")]), "unknown r_option 'ones'"),
        (dict(options=[("one", "probability")]), "unknown mix_space 'probability'"),
        (dict(attacks=["std", "fgsm"]), "unknown attack 'fgsm'"),
        (dict(attacks=["autoattack"]), "attacks include autoattack: pass autoattack="),
    ],
)
def test_engine_validates_before_attacking(kwargs, pattern, monkeypatch):
    monkeypatch.setattr(PGD, "__call__", lambda *a, **k: pytest.fail("an attack ran"))
    x, y = digits(4)
    args = dict(alphas=[0.5], attack=PGD("linf", eps=0.1, step_size=0.05), preflight=False) | kwargs
    with pytest.raises(ConfigError, match=pattern):
        run_sweep(cnn(0), cnn(1), x, y, **args)


def test_engine_rejects_mismatched_models(monkeypatch):
    monkeypatch.setattr(PGD, "__call__", lambda *a, **k: pytest.fail("an attack ran"))
    x, y = digits(4)
    torch.manual_seed(0)
    five = create_model("small_cnn", 5, (1, 8, 8), [0.5], [0.25], width=4, hidden=8)
    big = create_model("small_cnn", 10, (1, 16, 16), [0.5], [0.25], width=4, hidden=8)
    attack = PGD("linf", eps=0.1, step_size=0.05)
    with pytest.raises(ConfigError, match="g has 10 classes but h has 5"):
        run_sweep(cnn(0), five, x, y, alphas=[0.5], attack=attack)
    with pytest.raises(ConfigError, match=r"g takes inputs of shape \(1, 8, 8\) but h takes \(1, 16, 16\)"):
        run_sweep(cnn(0), big, x, y, alphas=[0.5], attack=attack)


@pytest.mark.parametrize("skip, reuse, mix_total", [(False, True, 48), (False, False, 3 * 48), (True, True, None)])
def test_progress_counts_exactly_what_is_attacked(fitted, caplog, skip, reuse, mix_total):
    """Each attack stage's "started, N" is the number of images it then attacks ("done, N"): all 48 per
    attacked alpha without skipping (alpha 0 and 1 reuse STD / ROB unless reuse=False), the clean-correct
    ones with skipping."""
    g, h = fitted
    x, y = digits(48)
    caplog.set_level(logging.INFO, logger="mixrobust.progress")
    res = run_sweep(g, h, x, y, alphas=[0.0, 0.5, 1.0], attack=PGD("linf", eps=0.15, step_size=0.04, steps=2),
                    batch_size=16, skip_misclassified=skip, reuse=reuse)
    lines = [r.getMessage() for r in caplog.records if r.name == "mixrobust.progress"]
    started = dict(line.split(": started, ") for line in lines if ": started, " in line)
    done = {line.split(": done, ")[0]: line.split(": done, ")[1].split(" in ")[0] for line in lines if ": done, " in line}
    assert started == done and len(started) == 3, lines
    mix = next(v for k, v in started.items() if k.startswith("MIX attacks (PGD-2 on the mixture"))
    if mix_total is None:  # the clean-correct examples at alpha 0.5
        mix_total = int(res.outcomes.mix["clean"][0, 1].sum())
    assert mix == f"{mix_total} images"
