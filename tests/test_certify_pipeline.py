"""The certification pipeline end to end on two digits checkpoints trained by the train pipeline.

Numbers are checked against independent computations: the same seeded noise draws counted again
here and turned into radii with scipy's beta and normal quantiles, `SmoothedClassifier.certify`,
g's own predictions, and certified accuracies recounted from certify.csv.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from mixrobust import load_classifier
from mixrobust.certify import SmoothedClassifier
from mixrobust.certify.mixture import certify_mixture, sample_votes
from mixrobust.certify.report import read_rows, select_alpha
from mixrobust.data import DigitsDataModule
from mixrobust.errors import ConfigError
from mixrobust.pipelines import certify, train
from tests.conftest import compose_config

# AdamW for 4 epochs: h reaches ~88% clean / ~77% under sigma=0.25 noise on digits in a few seconds
TRAIN_FAST = ["trainer.max_epochs=4", "optimizer=adamw", "optimizer.lr=3e-3", "val_attack_steps=2",
              "test_attack_steps=2", "trainer.enable_progress_bar=false", "logger=none"]
SIGMA, N0, N, FP, NUM = 0.25, 20, 200, 0.01, 40
ALPHAS = [0.0, 0.3, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """g (standard) and h (gaussian_noise, sigma 0.25) trained for 4 epochs by train.run."""
    paths = {}
    for name, extra in (("g", []), ("h", ["objective=gaussian_noise", f"objective.sigma={SIGMA}"])):
        cfg = compose_config("train", [*TRAIN_FAST, *extra], tmp_path_factory.mktemp(name))
        paths[name] = train.run(cfg).metrics["best_checkpoint"]
    return paths


def cert_cfg(ckpts, out, *overrides, g=None, h=None, experiment="digits_certify"):
    alphas = "[" + ",".join(map(str, ALPHAS)) + "]"
    return compose_config("evaluate", [
        f"experiment={experiment}", f"g_ckpt={g or ckpts['g']}", f"h_ckpt={h or ckpts['h']}", "logger=none",
        f"n={NUM}", f"certify.n0={N0}", f"certify.n={N}", f"certify.failure_prob={FP}", f"certify.alphas={alphas}",
        "certify.batch_size=300", *overrides], out)


def run_quiet(cfg):
    """certify.run with its log warnings (alphas < 1/2, ...) kept out of the test output."""
    log = logging.getLogger("mixrobust")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return certify.run(cfg)
    finally:
        log.setLevel(level)


@pytest.fixture(scope="module")
def certified(ckpts, tmp_path_factory):
    """Sound certification of the first 40 test images, h's checkpoint also serving as the RS baseline."""
    out = tmp_path_factory.mktemp("certify")
    return run_quiet(cert_cfg(ckpts, out, f"certify.baseline_ckpt={ckpts['h']}")), out


def images():
    x, y = DigitsDataModule().eval_tensors("test")
    return x[:NUM], y[:NUM]


def redraw(ckpts, seed, n0=N0, n=N):
    """The pipeline's draws for h, repeated: same seed, batch size and order (selection first)."""
    smoothed = SmoothedClassifier(load_classifier(ckpts["h"]), SIGMA, votes="hard", batch_size=300, seed=seed)
    x, _ = images()
    sel = smoothed.sample_counts(x, n0).numpy() if n0 else None
    return sel, smoothed.sample_counts(x, n).numpy()


def by_alpha(rows):
    out = {}
    for r in rows:
        out.setdefault(r["alpha"], []).append(r)
    return out


def test_files_and_summary(certified):
    result, out = certified
    for name in ("certify.csv", "baseline_certify.csv", "certified_accuracy.csv", "certified_accuracy.png",
                 "certify_summary.json"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "certify.csv")
    alphas = sorted(by_alpha(rows))
    assert set(ALPHAS) <= set(alphas) and len(rows) == NUM * len(alphas)
    assert [r["index"] for r in rows[:: len(alphas)]] == list(range(NUM))
    _, y = images()
    assert [r["label"] for r in rows[:: len(alphas)]] == y.tolist()
    assert not result.skipped and result.output_dir == out
    files = {"certify.csv", "baseline_certify.csv", "certified_accuracy.csv", "certified_accuracy.png"}
    assert set(result.files) == files and all(result.files[name] == str(out / name) for name in files)
    summary = json.loads((out / "certify_summary.json").read_text())
    # the resume marker, written last, vouches for every results file by its sha256
    assert summary["checksums"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files}
    assert summary["n_examples"] == NUM and summary["data"] == "digits" and summary["sigma"] == SIGMA
    assert summary["settings"]["n0"] == N0 and summary["settings"]["n"] == N and summary["settings"]["mode"] == "sound"
    assert {r["mode"] for r in rows} == {"sound"} == {r["mode"] for r in read_rows(out / "certified_accuracy.csv")}
    assert math.isclose(summary["lipschitz_constant"], math.sqrt(2 / math.pi) / SIGMA)
    import matplotlib.image

    assert matplotlib.image.imread(out / "certified_accuracy.png").shape[0] > 100


def test_radii_zero_where_h_wrong_or_alpha_below_half(certified):
    _, out = certified
    rows = read_rows(out / "certify.csv")
    assert any(r["rs_radius"] > 0 for r in rows) and any(not r["correct"] for r in rows)
    for r in rows:
        assert r["correct"] == (r["h_pred"] == r["label"])
        if not r["correct"] or r["alpha"] < 0.5:
            assert r["lipschitz_radius"] == 0.0 and r["rs_radius"] == 0.0, r


def test_alpha_one_equals_plain_rs_and_lipschitz_radii(ckpts, certified):
    """At alpha = 1: Theorem 5 = Cohen's sigma Phi^-1(pA) and Theorem 4 = (2 pA - 1) / (2 L), pA the
    Clopper-Pearson lower bound on the selected class, recomputed from the same seeded draws."""
    result, out = certified
    sel, est = redraw(ckpts, seed=0)
    y_hat = sel.argmax(1)
    k = est[np.arange(NUM), y_hat]
    p_a = np.where(k > 0, stats.beta.ppf(FP, k, N - k + 1), 0.0)
    _, labels = images()
    ok = (p_a > 0.5) & (y_hat == labels.numpy())
    rows = [r for r in read_rows(out / "certify.csv") if r["alpha"] == 1.0]
    rs = np.array([r["rs_radius"] for r in rows])
    lip = np.array([r["lipschitz_radius"] for r in rows])
    np.testing.assert_allclose(rs, np.where(ok, SIGMA * stats.norm.ppf(np.where(ok, p_a, 0.75)), 0.0), atol=1e-9)
    lip_const = math.sqrt(2 / math.pi) / SIGMA
    np.testing.assert_allclose(lip, np.where(ok, (2 * p_a - 1) / (2 * lip_const), 0.0), atol=1e-12)
    np.testing.assert_allclose([r["p_y"] for r in rows], p_a, atol=1e-12)
    assert ok.sum() >= 10  # enough certified points for the comparison to mean something
    # and SmoothedClassifier.certify on the same draws gives the same radius
    smoothed = SmoothedClassifier(load_classifier(ckpts["h"]), SIGMA, batch_size=300, seed=0)
    pred, radius, _ = smoothed.certify(images()[0], N0, N, FP)
    np.testing.assert_allclose(rs, np.where(pred.numpy() == labels.numpy(), radius.numpy(), 0.0), atol=1e-9)


def test_mixture_prediction_and_clean_accuracy(ckpts, certified):
    result, out = certified
    x, labels = images()
    with torch.no_grad():
        g_pred = load_classifier(ckpts["g"])(x).argmax(1).numpy()
    rows = by_alpha(read_rows(out / "certify.csv"))
    assert [r["mix_pred"] for r in rows[0.0]] == g_pred.tolist()
    _, est = redraw(ckpts, seed=0)
    top = est.max(1, keepdims=True)
    at_one = [r["mix_pred"] for r in rows[1.0]]
    assert all(est[j, c] == top[j, 0] for j, c in enumerate(at_one))  # an argmax of h's votes
    summary = result.summary
    for alpha, alpha_rows in rows.items():
        acc = np.mean([r["mix_pred"] == r["label"] for r in alpha_rows])
        assert math.isclose(summary["clean_accuracy"]["mix"][repr(alpha)], acc)
    assert math.isclose(summary["clean_accuracy"]["g"], float((g_pred == labels.numpy()).mean()))


def test_certified_accuracy_recounted_from_csv(certified):
    _, out = certified
    rows = by_alpha(read_rows(out / "certify.csv"))
    curves = read_rows(out / "certified_accuracy.csv")
    checked = 0
    for c in curves:
        if c["model"] != "mix" or c["alpha"] not in (0.5, 0.75, 1.0):
            continue
        radii = np.array([r[f"{c['theorem']}_radius"] for r in rows[c["alpha"]]])
        correct = np.array([r["correct"] for r in rows[c["alpha"]]])
        expect = np.mean(correct & (radii > 0) & (radii >= c["radius"]))
        assert math.isclose(c["certified_accuracy"], expect), c
        checked += 1
    assert checked == 3 * 2 * 201
    base = read_rows(out / "baseline_certify.csv")
    for c in (c for c in curves if c["model"] == "baseline"):
        expect = np.mean([b["correct"] and b["radius"] > 0 and b["radius"] >= c["radius"] for b in base])
        assert math.isclose(c["certified_accuracy"], expect)


def test_baseline_is_cohens_certify(ckpts, certified):
    _, out = certified
    base = read_rows(out / "baseline_certify.csv")
    smoothed = SmoothedClassifier(load_classifier(ckpts["h"]), SIGMA, batch_size=300, seed=1)  # the pipeline's seed + 1
    pred, radius, p_lower = smoothed.certify(images()[0], N0, N, FP)
    assert [b["pred"] for b in base] == pred.tolist()
    np.testing.assert_allclose([b["p_lower"] for b in base], p_lower.numpy(), atol=1e-12)
    expect = np.where(pred.numpy() == np.array([b["label"] for b in base]), radius.numpy(), 0.0)
    np.testing.assert_allclose([b["radius"] for b in base], expect, atol=1e-9)


def test_alpha_selection_matches_baseline_accuracy(certified):
    summary = certified[0].summary
    sel = summary["alpha_selection"]
    grid = {float(a): v for a, v in sel["grid_accuracy"].items()}
    target = summary["clean_accuracy"]["baseline"]
    assert sel["target"] == target and sel["method"] == "at_least"
    reach = [a for a, v in grid.items() if v >= target]
    if reach:
        assert sel["alpha"] == max(reach) and sel["reason"] is None
        assert repr(sel["alpha"]) in summary["clean_accuracy"]["mix"]  # the selected alpha was certified too
    else:
        assert sel["alpha"] is None and "no alpha reaches" in sel["reason"]
    assert select_alpha([0.0, 0.5, 1.0], [0.9, 0.8, 0.7], target=0.95)["alpha"] is None  # unreachable: reported
    assert select_alpha([0.0, 0.5, 1.0], [0.9, 0.8, 0.7], target=0.8)["alpha"] == 0.5


def test_sound_radius_at_most_plugin_on_same_samples(ckpts):
    sel, est = redraw(ckpts, seed=3)
    x, labels = images()
    with torch.no_grad():
        g_lp = torch.log_softmax(load_classifier(ckpts["g"])(x).double(), 1).numpy()
    from mixrobust.certify.mixture import Votes

    votes = Votes(sel, est, N, "hard")
    alphas = [0.5, 0.6, 0.8, 1.0]
    for bound in ("complement", "bonferroni", "runner_up"):
        sound = certify_mixture(votes, g_lp, labels, alphas, SIGMA, "sound", FP, bound)
        with pytest.warns(UserWarning, match="plug-in Theorem 5 radius is infinite"):  # alpha 1, unanimous votes
            plug = certify_mixture(votes, g_lp, labels, alphas, SIGMA, "plugin")
        assert np.all(sound.rs_radius <= plug.rs_radius + 1e-12)
        assert np.all(sound.lipschitz_radius <= plug.lipschitz_radius + 1e-12)
        assert (sound.rs_radius > 0).sum() >= 5 and np.any(sound.rs_radius < plug.rs_radius)
        # radii grow with alpha
        assert np.all(np.diff(sound.rs_radius, axis=0) >= -1e-12)
    # the plug-in mode of the pipeline's own sampler draws n estimation samples only
    smoothed = SmoothedClassifier(load_classifier(ckpts["h"]), SIGMA, batch_size=300, seed=3)
    assert sample_votes(smoothed, x, N0, N, "plugin").select is None


def test_reproducible_with_seed(ckpts, certified, tmp_path):
    _, out = certified
    again = tmp_path / "again"
    run_quiet(cert_cfg(ckpts, again, f"certify.baseline_ckpt={ckpts['h']}"))
    assert (again / "certify.csv").read_bytes() == (out / "certify.csv").read_bytes()
    assert (again / "certified_accuracy.csv").read_bytes() == (out / "certified_accuracy.csv").read_bytes()
    other = tmp_path / "other"
    run_quiet(cert_cfg(ckpts, other, "seed=5"))
    assert (other / "certify.csv").read_bytes() != (out / "certify.csv").read_bytes()


def test_finished_job_is_skipped_and_a_damaged_file_recomputed(ckpts, certified, tmp_path, monkeypatch, caplog):
    """The same job in a folder holding its finished results is skipped without sampling; after certify.csv is
    edited the job is recomputed, with a warning, to the same bytes."""
    result, out = certified
    copy = tmp_path / "job"
    shutil.copytree(out, copy)
    cfg = cert_cfg(ckpts, copy, f"certify.baseline_ckpt={ckpts['h']}")
    with monkeypatch.context() as m:
        m.setattr(certify, "smoothed_votes", lambda *a, **k: pytest.fail("h was sampled"))
        again = run_quiet(cfg)
    assert again.skipped and again.output_dir == copy
    assert again.summary["clean_accuracy"] == result.summary["clean_accuracy"]
    expected = (out / "certify.csv").read_bytes()
    (copy / "certify.csv").write_bytes(expected.replace(b"0", b"1", 1))
    with caplog.at_level(logging.WARNING):
        redone = certify.run(cfg)
    assert "certify.csv does not match the checksum recorded in certify_summary.json" in caplog.text
    assert not redone.skipped and (copy / "certify.csv").read_bytes() == expected


def test_plugin_mode_runs_and_matches_paper_formula(ckpts, tmp_path):
    result = run_quiet(cert_cfg(ckpts, tmp_path, "certify.mode=plugin", "certify.alphas=[0.8]",
                                f"certify.baseline_ckpt={ckpts['h']}"))
    _, est = redraw(ckpts, seed=0, n0=0)
    p = est / N
    top2 = np.sort(p, 1)[:, ::-1]
    _, labels = images()
    ok = (p.argmax(1) == labels.numpy()) & (top2[:, 0] > top2[:, 1])
    a = 0.8
    with np.errstate(divide="ignore", invalid="ignore"):
        r5 = 0.5 * SIGMA * (stats.norm.ppf(a * top2[:, 0]) - stats.norm.ppf(a * top2[:, 1] + 1 - a))
    expect = np.where(ok & (r5 > 0), r5, 0.0)
    cert = result.certificate
    np.testing.assert_allclose(cert.rs_radius[list(cert.alphas).index(a)], expect, atol=1e-9)
    # its files say the radii are plug-in estimates, the baseline's CERTIFY rows that theirs are sound
    out = result.output_dir
    assert {r["mode"] for r in read_rows(out / "certify.csv")} == {"plugin"}
    curves = read_rows(out / "certified_accuracy.csv")
    assert {(r["model"], r["mode"]) for r in curves} == {("mix", "plugin"), ("baseline", "sound")}


def curve_value(curves, model, alpha, theorem, radius):
    """The certified accuracy certified_accuracy.csv holds at `radius` (one of its grid's radii)."""
    (hit,) = [c["certified_accuracy"] for c in curves if c["model"] == model and c["theorem"] == theorem
              and (alpha is None or c["alpha"] == alpha) and math.isclose(c["radius"], radius, abs_tol=1e-9)]
    return hit


def test_summary_text_is_the_certified_accuracy_table(ckpts, tmp_path):
    """What evaluate.py prints: per alpha and theorem the certified accuracy at the report radii, read back from
    certified_accuracy.csv (its radius grid chosen to hold the report radii), the clean accuracies recounted
    from certify.csv, the baseline's line, and the selected alpha."""
    radii = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]  # digits_certify's certify.report_radii
    result = run_quiet(cert_cfg(ckpts, tmp_path, f"certify.baseline_ckpt={ckpts['h']}", "certify.radius_max=0.5",
                                "certify.radius_points=11", "certify.alphas=[0.5,0.75,1.0]",
                                "certify.target_accuracy=0.5"))
    curves = read_rows(tmp_path / "certified_accuracy.csv")
    rows = by_alpha(read_rows(tmp_path / "certify.csv"))
    lines = result.text().splitlines()
    assert lines[0] == (f"certified accuracy at l_2 radius r, {NUM} images, h sigma={SIGMA:g} "
                        "(Thm 4: Lipschitz, Thm 5: randomized smoothing)")
    assert lines[1] == f"sound: each radius holds with probability >= 1 - {FP:g} (n0={N0}, n={N}, hard votes)"
    assert lines[2].split() == ["alpha", "clean", "bound"] + [f"r={r:g}" for r in radii]
    sel = result.summary["alpha_selection"]
    assert sel["alpha"] is not None and sel["target"] == 0.5
    table = lines[3:-2]
    assert len(table) == 2 * len(rows) + 1  # two theorems per alpha (the selected one added), then the baseline
    for line, (alpha, theorem) in zip(table, [(a, t) for a in sorted(rows) for t in ("lipschitz", "rs")]):
        cells = line.split()
        mark = "*" if math.isclose(alpha, sel["alpha"]) else ""
        assert cells[0] == f"{alpha:g}{mark}" and cells[2:4] == ["Thm", {"lipschitz": "4", "rs": "5"}[theorem]]
        clean = np.mean([r["mix_correct"] for r in rows[alpha]])
        assert cells[1] == f"{clean:.4f}"
        assert cells[4:] == [f"{curve_value(curves, 'mix', alpha, theorem, r):.4f}" for r in radii], line
    base = read_rows(tmp_path / "baseline_certify.csv")
    cells = table[-1].split()
    assert cells[:3] == ["baseline", f"{np.mean([b['clean_pred'] == b['label'] for b in base]):.4f}", "CERTIFY"]
    assert cells[3:3 + len(radii)] == [f"{curve_value(curves, 'baseline', None, 'cohen', r):.4f}" for r in radii]
    acc = result.summary["clean_accuracy"]
    assert lines[-2] == f"clean accuracy: g {acc['g']:.4f}, smoothed h {acc['h']:.4f}"
    assert lines[-1] == (f"selected alpha {sel['alpha']:g} (*): at_least target clean accuracy 0.5000 "
                         "(certify.target_accuracy)")


def test_summary_text_without_a_selection_and_in_plugin_mode(certified):
    """No alpha selected: the reason, as the selection recorded it; plug-in mode says its numbers are estimates."""
    import copy

    summary = copy.deepcopy(certified[0].summary)
    summary["alpha_selection"].update(alpha=None, reason="no target: set certify.baseline_ckpt or "
                                                         "certify.target_accuracy")
    summary["settings"]["mode"] = "plugin"
    text = certify.CertifyResult(summary, {}, certified[1], True).text().splitlines()
    assert text[-1] == "no alpha selected: no target: set certify.baseline_ckpt or certify.target_accuracy"
    assert text[1] == f"plug-in: Monte Carlo estimates, no guarantee (n={N}, hard votes)"
    assert not any("*" in line for line in text)


BAD = [
    ("certify.sigma=0", "sigma"),
    ("certify.sigma=-0.5", "sigma"),
    ("certify.n0=300", "n0"),
    ("certify.failure_prob=0", "failure_prob"),
    ("certify.failure_prob=1.5", "failure_prob"),
    ("certify.alphas=[0.5,1.2]", "alpha"),
    ("certify.alphas=[-0.1]", "alpha"),
    ("certify.mode=exact", "valid values: sound, plugin"),
    ("certify.bound=union", "valid values: complement, bonferroni, runner_up"),
    ("certify.target_accuracy=1.5", "target_accuracy"),
    ("certify.radius_points=1", "radius_points"),
    ("certify.radius_max=0", "radius_max"),
    ("certify.workers=0", "certify.workers must be a whole number"),
    ("certify.autocast_dtype=half", "valid values: bfloat16, float16, float32"),
    ("certify.compile=yes", "certify.compile must be true or false"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_fails_before_any_work(tmp_path, override, message):
    """Validated before the (nonexistent) checkpoints are even opened, and no file is written."""
    cfg = cert_cfg({"g": tmp_path / "no_g.ckpt", "h": tmp_path / "no_h.ckpt"}, tmp_path / "out", override)
    with pytest.raises(ConfigError, match=message):
        certify.run(cfg)
    assert not (tmp_path / "out").exists()


def test_low_alpha_warns_and_non_noise_h_warns(ckpts, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        c = certify.settings(cert_cfg(ckpts, tmp_path)).c
    assert c.alphas == tuple(ALPHAS) and c.n0 == N0 and c.n == N and c.failure_prob == FP
    assert "certify.alphas holds 0.0, 0.3 < 1/2" in caplog.text
    with pytest.raises(ConfigError, match="records no noise level"):
        certify.run(cert_cfg(ckpts, tmp_path / "a", h=ckpts["g"]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = certify.run(cert_cfg(ckpts, tmp_path / "b", "certify.sigma=0.25", "certify.alphas=[1.0]",
                                      h=ckpts["g"]))
    assert "h_ckpt was trained with objective 'standard', not gaussian_noise" in caplog.text
    assert result.summary["sigma"] == 0.25


def test_plain_override_and_paper_preset(ckpts, tmp_path):
    cfg = compose_config("evaluate", [f"g_ckpt={ckpts['g']}", f"h_ckpt={ckpts['h']}", "task=certify",
                                      "logger=csv", "n=10", "certify.n0=10", "certify.n=50", "certify.alphas=[1.0]",
                                      "certify.target_accuracy=0.0"], tmp_path)
    summary = run_quiet(cfg).summary
    assert summary["data"] == "digits" and summary["n_examples"] == 10  # data from the checkpoints
    assert summary["alpha_selection"]["alpha"] == 1.0  # every alpha reaches accuracy 0
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "cert/rs_acc@0.25" in logged and "cert/selected_alpha" in logged
    paper = compose_config("evaluate", ["experiment=paper_fig3", "g_ckpt=a.ckpt", "h_ckpt=b.ckpt"], tmp_path / "p")
    assert paper.task == "certify" and paper.certify.mode == "plugin" and paper.certify.n == 10000 and paper.n == 500
    with pytest.raises(ConfigError, match="certify.baseline_ckpt"):
        certify.run(paper)


def test_paper_fig3_pairs_each_rs_model_with_a_smaller_sigma_baseline():
    """The mixture can match the clean accuracy only of a baseline more accurate than h (a smaller sigma): each of
    the sweep's pairs, read from the checkpoint paths train_cifar10_rs writes, and every sigma they read is trained."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF_DIR

    def sigma(path: str) -> float:
        return float(path.split("/sigma", 1)[1].split("/", 1)[0])

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        sweep = compose("evaluate", ["experiment=paper_fig3", "g_ckpt=g.ckpt"], return_hydra_config=True)
        pairs = sweep.hydra.sweeper.params.rs_pair.split(",")
        jobs = [compose("evaluate", ["experiment=paper_fig3", "g_ckpt=g.ckpt", f"rs_pair={p}"]) for p in pairs]
        trained = compose("train", ["experiment=train_cifar10_rs"], return_hydra_config=True)
    got = [(sigma(job.h_ckpt), sigma(job.certify.baseline_ckpt)) for job in jobs]
    assert got == [(0.25, 0.12), (0.5, 0.25), (1.0, 0.5)]
    assert all(job.task == "certify" and job.certify.require_baseline for job in jobs)
    assert {s for pair in got for s in pair} == {float(s) for s in trained.hydra.sweeper.params["objective.sigma"]
                                                 .split(",")}
    assert {p.stem for p in (Path(CONF_DIR) / "rs_pair").glob("*.yaml")} == {*pairs, "own"}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # your own pair: the command line's
        own = compose("evaluate", ["experiment=paper_fig3", "g_ckpt=g.ckpt", "rs_pair=own", "h_ckpt=a.ckpt",
                                   "certify.baseline_ckpt=b.ckpt"])
    assert (own.h_ckpt, own.certify.baseline_ckpt) == ("a.ckpt", "b.ckpt")
