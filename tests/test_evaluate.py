"""evaluate.py's mix task end to end on two digits checkpoints trained by the train pipeline.

Numbers are checked against independent computations: the loaded classifiers' own predictions,
PGD run directly on h, and the metrics.json that train.py wrote for the same test split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mixrobust
from mixrobust import load_classifier
from mixrobust.attacks import PGD, AdaptiveMixAttack, attack_in_batches
from mixrobust.data import DigitsDataModule
from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.evaluation import aggregate, load_outcomes, predict_correct, read_results_csv, rows_to_csv
from mixrobust.evaluation.report import FILES
from mixrobust.models import create_model
from mixrobust.pipelines import inputs, mix, train
from tests.conftest import compose_config

TRAIN_FAST = ["trainer.enable_progress_bar=false", "logger=none"]
# h is adversarially trained in l_inf 0.1 (a few epochs are enough there; 0.2 needs the full
# recipe), and every PGD here (train.py's test attack included) has 5 steps, to keep this file fast
THREAT = ["threat.eps=0.1", "threat.step_size=0.05"]
STEPS = 5
ADAPTIVE_STEPS = 20  # the adaptive attack's (apgd) steps per search
ALPHAS = "mix.alphas=[0.0,0.5,1.0]"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """g (standard, ~90% clean) and h (pgd_at in l_inf 0.1: ~90% clean, ~55% under PGD-5), trained
    by train.run; with the metrics.json of each."""
    runs = {}
    fast = ["trainer.max_epochs=4", "val_attack_steps=2", f"test_attack_steps={STEPS}"]
    for name, overrides in (("g", ["objective=standard", "optimizer=adamw", "optimizer.lr=3e-3", *fast]),
                            ("h", ["objective=pgd_at", "objective.steps=2", *fast, *THREAT])):
        out = tmp_path_factory.mktemp(name)
        metrics = train.run(compose_config("train", [*overrides, *TRAIN_FAST], out)).metrics
        runs[name] = (metrics["best_checkpoint"], metrics)
    return runs


def eval_cfg(ckpts, out: Path, *overrides: str):
    return compose_config("evaluate", [f"g_ckpt={ckpts['g'][0]}", f"h_ckpt={ckpts['h'][0]}", "logger=none",
                                       f"attack.steps={STEPS}", f"adaptive.steps={ADAPTIVE_STEPS}", *overrides], out)


@pytest.fixture(scope="module")
def evaluated(ckpts, tmp_path_factory):
    """The default sweep (data set from the checkpoints) in h's threat on the full test split."""
    out = tmp_path_factory.mktemp("evaluate")
    return mix.run(eval_cfg(ckpts, out, ALPHAS, *THREAT)), out


def table(rows) -> dict:
    return {(r["model"], None if math.isnan(r["alpha"]) else r["alpha"], r["attack"]): r["accuracy"] for r in rows}


def test_outputs_exist_and_parse(evaluated):
    result, out = evaluated
    for name in (*FILES, "run.json"):
        assert (out / name).is_file(), name
    assert not result.skipped and result.output_dir == out
    assert result.files == {name: str(out / name) for name in FILES}
    rows = result.rows
    csv_rows, json_rows = read_results_csv(out / "results.csv"), json.loads((out / "results.json").read_text())
    assert len(csv_rows) == len(json_rows) == len(rows) == 2 * 5 + 3 * 6  # g, h, and 3 alphas: clean, std, rob, (mix,) apgd, worst
    for c, j, r in zip(csv_rows, json_rows, rows):
        assert c["accuracy"] == j["accuracy"] == r["accuracy"] and c["attack"] == j["attack"] == r["attack"]
        assert (j["alpha"] is None) == (r["model"] != "mix")
    run = json.loads((out / "run.json").read_text())
    assert run["data"] == "digits" and run["split"] == "test" and run["n"] == 360
    assert run["threat"] == {"norm": "linf", "eps": 0.1, "step_size": 0.05}
    ours = f"mixrobust {mixrobust.__version__}"
    assert run["implementations"] == {"std": ours, "rob": ours, "mix": ours, "apgd": ours}  # which code ran each attack
    assert {r["implementation"] for r in csv_rows if r["attack"] != "clean"} == {ours}
    # the resume marker vouches for every results file by its sha256
    assert run["checksums"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}
    margins = json.loads((out / "margins.json").read_text())
    assert margins["g"]["attack"] == "std" and len(margins["mix"]) == 3
    assert margins["g"]["clean"]["correct"]["n"] + margins["g"]["clean"]["incorrect"]["n"] == 360
    import matplotlib.image

    for name in ("accuracy_vs_alpha.png", "tradeoff.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 200


def test_clean_endpoints_equal_base_models(evaluated, ckpts):
    result, _ = evaluated
    got = table(result.rows)
    x, y = DigitsDataModule().eval_tensors("test")
    for name, alpha in (("g", 0.0), ("h", 1.0)):
        own = predict_correct(load_classifier(ckpts[name][0]), x, y, 500).mean()
        assert got[("mix", alpha, "clean")] == got[(name, None, "clean")] == pytest.approx(own, abs=1e-12)
        assert own == pytest.approx(ckpts[name][1]["test/acc"], abs=1e-6)  # the split train.py tested on


def test_mix_at_alpha_one_is_h_pgd_accuracy(evaluated, ckpts):
    result, _ = evaluated
    got = table(result.rows)
    h = load_classifier(ckpts["h"][0])
    x, y = DigitsDataModule().eval_tensors("test")
    attack = PGD("linf", eps=0.1, step_size=0.05, steps=STEPS, seed=0)
    direct = predict_correct(h, attack_in_batches(attack, h, x, y, 500), y, 500).mean()
    assert got[("mix", 1.0, "mix")] == got[("h", None, "rob")] == pytest.approx(direct, abs=1e-12)
    assert direct == pytest.approx(ckpts["h"][1]["test/robust_acc"], abs=1e-6)
    assert got[("mix", 0.0, "mix")] == got[("g", None, "std")]


def test_adaptive_attack_on_h_alone_is_h_row_and_alpha_one(evaluated, ckpts):
    """The apgd column of h's row is the default adaptive attack run directly on h, and the mixture's at alpha 1."""
    got = table(evaluated[0].rows)
    h = load_classifier(ckpts["h"][0])
    x, y = DigitsDataModule().eval_tensors("test")
    direct = predict_correct(h, attack_in_batches(AdaptiveMixAttack("linf", eps=0.1, steps=ADAPTIVE_STEPS), h, x, y, 500), y, 500).mean()
    assert got[("mix", 1.0, "apgd")] == got[("h", None, "apgd")] == pytest.approx(direct, abs=1e-12)
    assert got[("h", None, "worst")] <= min(got[("h", None, "apgd")], got[("h", None, "rob")])


def test_worst_case_is_below_every_attack(evaluated):
    groups = {}
    for r in evaluated[0].rows:
        groups.setdefault((r["model"], r["alpha"] if r["model"] == "mix" else None, r["r_option"]), {})[r["attack"]] = r
    assert len(groups) == 5
    for rows in groups.values():
        worst = rows["worst"]["accuracy"]
        assert all(worst <= r["accuracy"] for r in rows.values())
        assert all(r["accuracy"] <= rows["clean"]["accuracy"] for r in rows.values())


def test_outcomes_file_reaggregates_to_results_csv(evaluated):
    _, out = evaluated
    outcomes = load_outcomes(out / "outcomes.npz")
    assert rows_to_csv(aggregate(outcomes)) == (out / "results.csv").read_text()
    np.testing.assert_array_equal(outcomes.index, np.arange(360))
    # one cell by hand: MIX at alpha 0.5 counts examples right on the clean and on the MIX images
    by_hand = (outcomes.mix["clean"][0, 1] & outcomes.mix["mix"][0, 1]).mean()
    assert table(aggregate(outcomes))[("mix", 0.5, "mix")] == by_hand


def test_bf16_autocast_attack_is_close_to_float32(ckpts, tmp_path):
    common = [*THREAT, "mix.alphas=[0.5]", "n=120"]
    f32 = table(mix.run(eval_cfg(ckpts, tmp_path / "f32", *common)).rows)
    bf16 = table(mix.run(eval_cfg(ckpts, tmp_path / "bf16", *common, "attack.autocast_dtype=bfloat16")).rows)
    assert "bfloat16" in json.loads((tmp_path / "bf16" / "run.json").read_text())["attack"]
    assert f32[("mix", 0.5, "clean")] == bf16[("mix", 0.5, "clean")]  # evaluation itself stays float32
    for key in (("mix", 0.5, "mix"), ("h", None, "rob"), ("g", None, "std"), ("mix", 0.5, "std")):
        assert abs(bf16[key] - f32[key]) <= 2 / 120, key


def test_finished_job_is_skipped_and_a_damaged_file_recomputed(evaluated, ckpts, tmp_path, monkeypatch, caplog):
    """run.json (written last) vouches for the results files by checksum: the same job in the same folder is
    skipped without an attack; after a results file is edited it is recomputed, with a warning, to the same numbers."""
    import shutil

    result, out = evaluated
    copy = tmp_path / "job"
    shutil.copytree(out, copy)
    with monkeypatch.context() as m:
        m.setattr(PGD, "__call__", lambda *a, **k: pytest.fail("an attack ran"))
        again = mix.run(eval_cfg(ckpts, copy, ALPHAS, *THREAT))
    assert again.skipped and again.rows == result.rows and again.output_dir == copy
    assert json.loads((copy / "run.json").read_text())["fingerprint"] == json.loads((out / "run.json").read_text())[
        "fingerprint"]
    csv_text = (copy / "results.csv").read_text()
    (copy / "results.csv").write_text(csv_text.replace("0.", "0.9", 1))
    with caplog.at_level(logging.WARNING):
        redone = mix.run(eval_cfg(ckpts, copy, ALPHAS, *THREAT))
    assert "results.csv does not match the checksum recorded in run.json" in caplog.text
    assert not redone.skipped and redone.rows == result.rows
    assert (copy / "results.csv").read_text() == csv_text
    # the same config on other images (the data folder's files replaced): not skipped (stopped where it recomputes)
    select = inputs.Examples.select

    class Recomputes(Exception):
        pass

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(inputs.Examples, "select", lambda self, data: (lambda x, y, i: (x.flip(-1), y, i))(*select(self, data)))
        m.setattr(mix, "clear_marker", lambda *a: (_ for _ in ()).throw(Recomputes))
        with pytest.raises(Recomputes):
            mix.run(eval_cfg(ckpts, copy, ALPHAS, *THREAT))
    assert "holds a run of a different configuration" in caplog.text


# ---------------------------------------------------------------- bad input, before any attack


def variant(src: str, path: Path, num_classes=None, input_shape=None, data=None) -> str:
    """A copy of checkpoint `src` with another class count, input shape or data set in its record."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    spec = ckpt["mixrobust"]["model"]
    if num_classes or input_shape:
        torch.manual_seed(0)
        model = create_model(spec["arch"], num_classes or spec["num_classes"], input_shape or spec["input_shape"],
                             spec["mean"], spec["std"], **spec["kwargs"])
        ckpt["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
        ckpt["mixrobust"]["model"] = model.spec
    if data:
        ckpt["mixrobust"]["data"] = data
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture
def no_attacks(monkeypatch):
    monkeypatch.setattr(PGD, "__call__", lambda *a, **k: pytest.fail("an attack ran"))


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (["mix.alphas=[0.0,1.5]"], ConfigError, r"mix.alphas\[1\] must be a number >= 0 and <= 1, got 1.5"),
        (["mix.r_options=[one,grad_gi]"], ConfigError,
         r"unknown mix.r_options\[1\] 'grad_gi'; valid values: one, grad_g_i"),
        (["mix.mix_spaces=[probs]"], ConfigError, r"unknown mix.mix_spaces\[0\] 'probs'; valid values: prob, logit"),
        (["attacks=[std,cw]"], ConfigError, r"unknown attacks\[1\] 'cw'; valid values: std, rob, mix, apgd, autoattack"),
        (["mix.gammas=[1.0]"], ConfigError, "set exactly one of mix.alphas"),
        (["g_ckpt=/no/such/g.ckpt"], CheckpointError, "g_ckpt: checkpoint not found: /no/such/g.ckpt"),
        (["threat.eps=-1"], ConfigError, "threat.eps must be a number >= 0, got -1"),
        (["threat.eps=1.5"], ConfigError, r"threat.eps=1.5 exceeds the input range: an l_inf ball of radius 1"),
        (["threat=l2", "threat.eps=8.5"], ConfigError,
         r"threat.eps=8.5 exceeds the input range: an l_2 ball of radius 8"),
        (["attack.steps=0"], ConfigError, "attack.steps must be >= 1"),
        (["adaptive.targets=10"], ConfigError, r"adaptive.targets=10: these models have 10 classes.*targets<=9"),
        (["adaptive.losses=[ce,dlr_t]"], ConfigError, r"adaptive.losses\[1\] 'dlr_t'"),
        (["split=valid"], ConfigError, "unknown split 'valid'"),
        (["n=100000"], ConfigError, "n=100000 examples requested, but the split has 360"),
        (["n=0"], ConfigError, "n must be a whole number >= 1, got 0"),
        (["n=2.5"], ConfigError, "n must be a whole number, got 2.5"),
        (["n_per_class=0"], ConfigError, "n_per_class must be a whole number >= 1, got 0"),
    ],
)
def test_bad_config_fails_before_any_attack(ckpts, tmp_path, no_attacks, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        mix.run(eval_cfg(ckpts, tmp_path, *overrides))


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(num_classes=5), "g_ckpt has 10 classes but h_ckpt has 5"),
        (dict(input_shape=(1, 16, 16)), r"g_ckpt takes inputs of shape \(1, 8, 8\) but h_ckpt takes \(1, 16, 16\)"),
        (dict(data="mnist"), r"trained on different or unknown data sets \(g_ckpt on 'digits', h_ckpt on 'mnist'\): "
                             "choose the evaluation data with data=<name>"),
    ],
)
def test_mismatched_checkpoints_fail_before_any_attack(ckpts, tmp_path, no_attacks, change, pattern):
    h = variant(ckpts["h"][0], tmp_path / "h.ckpt", **change)
    with pytest.raises(ConfigError, match=pattern):
        mix.run(eval_cfg(ckpts, tmp_path, f"h_ckpt={h}"))


def test_missing_checkpoint_keys(ckpts, tmp_path):
    """Both checkpoint keys are required; every missing one is named in the one message."""
    with pytest.raises(ConfigError, match=r"missing config values g_ckpt, h_ckpt; .* g_ckpt=\.\.\. h_ckpt=\.\.\."):
        mix.run(compose_config("evaluate", ["logger=none"], tmp_path))
    with pytest.raises(ConfigError, match="missing config value h_ckpt"):
        mix.run(compose_config("evaluate", ["logger=none", f"g_ckpt={ckpts['g'][0]}"], tmp_path))


def test_autoattack_not_installed_fails_before_any_attack(ckpts, tmp_path, no_attacks, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install pyautoattack.*torchattacks"):
        mix.run(eval_cfg(ckpts, tmp_path, "attacks=[mix,autoattack]"))


def test_explicit_data_set_and_budget_differing_from_training_warn(ckpts, tmp_path, monkeypatch, caplog):
    """Choosing data= explicitly is allowed when a checkpoint says otherwise (a warning), as is
    evaluating at another eps than h was trained for."""
    h = variant(ckpts["h"][0], tmp_path / "h.ckpt", data="mnist")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(mix, "run_sweep", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        mix.run(eval_cfg(ckpts, tmp_path, f"h_ckpt={h}", "data=digits"))
    assert "h_ckpt was trained on 'mnist' but is evaluated on 'digits'" in caplog.text
    assert "h_ckpt was trained against linf eps=0.1 but is evaluated at linf eps=0.25" in caplog.text


def test_data_set_and_budget_default_to_the_checkpoints(ckpts, tmp_path, monkeypatch):
    """Without data= or threat.*: the checkpoints' data set, its test split and its l_inf budget."""
    seen = {}

    def capture(g, h, x, y, index=None, **kwargs):
        seen.update(x=x, y=y, index=index, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mix, "run_sweep", capture)
    with pytest.raises(KeyboardInterrupt):
        mix.run(compose_config("evaluate", [f"g_ckpt={ckpts['g'][0]}", f"h_ckpt={ckpts['h'][0]}"], tmp_path))
    attack = seen["attack"]
    assert (attack.norm.value, attack.eps, attack.step_size, attack.steps) == ("linf", 0.25, 0.0625, 20)
    x, y = DigitsDataModule().eval_tensors("test")
    assert torch.equal(seen["x"], x) and torch.equal(seen["y"], y)
    assert torch.equal(seen["index"], torch.arange(360))
    assert list(seen["alphas"]) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


# ---------------------------------------------------------------- entry point and W&B


def test_evaluate_script_with_wandb_offline(ckpts, tmp_path):
    """python evaluate.py: Hydra run dir, W&B (offline) table and plots, the output dir printed last."""
    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(root / "evaluate.py"), f"g_ckpt={ckpts['g'][0]}", f"h_ckpt={ckpts['h'][0]}",
         f"hydra.run.dir={run_dir}", "logger=wandb", "n=24", "mix.alphas=[0.5]", "attack.steps=2", "adaptive.steps=2",
         *THREAT],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)
    assert read_results_csv(run_dir / "results.csv")[0]["n"] == 24
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    media = runs[0] / "files" / "media"
    for stem in ("accuracy_vs_alpha", "tradeoff"):
        assert len(list((media / "images" / "eval").glob(f"{stem}_*.png"))) == 1, stem
    (logged,) = (media / "table" / "eval").glob("results_*.table.json")
    assert len(json.loads(logged.read_text())["data"]) == len(read_results_csv(run_dir / "results.csv"))


# --- nonlinear mixing: task=fit_map, then the fitted map by name beside linear mixing --------------------------


FIT_GRID = ("fit.scales=[1,8]", "fit.powers=[1,2]", "fit.biases=[-0.5,0.5]", "fit.steps=5", "fit.n=100")


def test_fit_map_then_evaluate_it_by_name(ckpts, tmp_path, caplog):
    from mixrobust.evaluation.matched import matched_rows
    from mixrobust.pipelines import fit_map

    fits = tmp_path / "fits"
    fit = fit_map.run(eval_cfg(ckpts, tmp_path / "fit", "task=fit_map", f"fits_dir={fits}", "fit.name=tiny",
                               *FIT_GRID, *THREAT))
    again = fit_map.run(eval_cfg(ckpts, tmp_path / "again", "task=fit_map", "fits_dir=null", *FIT_GRID, *THREAT))
    assert fit.fit.summary()["h_map"] == {**again.fit.summary()["h_map"], "name": "tiny"}  # deterministic
    assert fit.fit.alpha == again.fit.alpha and fit.fit.grid == again.fit.grid and again.saved is None
    assert set(fit.files) == set(fit_map.FILES) and (fits / "tiny.json").is_file()
    record = json.loads((fits / "tiny.json").read_text())
    assert record["split"] == "val" and record["n"] == 100 and record["robust"] >= 0.985 * record["h_robust"] - 1e-12
    with open(tmp_path / "fit" / "fit_grid.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 8  # 2 x 2 x 2
    # the name is taken: the same fit again may replace it; another fit (settings, models) under it may not
    def fit_settings(*more):
        return fit_map.settings(eval_cfg(ckpts, tmp_path / "next", "task=fit_map", f"fits_dir={fits}", "fit.name=tiny",
                                         *FIT_GRID, *THREAT, *more))

    fit_settings()
    with pytest.raises(ConfigError, match=r"tiny\.json holds another fit named 'tiny' \(it differs from this run's in: "
                                          r"fit\): .*fit\.name=<name>, or .* fit\.overwrite=true"):
        fit_settings("fit.target=0.9")
    fit_settings("fit.target=0.9", "fit.overwrite=true")

    with caplog.at_level(logging.INFO, logger="mixrobust.pipelines.mix"):
        result = mix.run(eval_cfg(ckpts, tmp_path / "mix", ALPHAS, *THREAT, f"fits_dir={fits}",
                                  "mix.h_map=[identity,tiny]"))
    assert f"h_map tiny was fitted at alpha {fit.fit.alpha!r}, which the evaluated alphas leave out" in caplog.text
    assert "fitted on other base models" not in caplog.text
    label = fit.fit.h_map.label
    assert {r["h_map"] for r in result.rows if r["model"] == "mix"} == {"identity", label}
    assert (tmp_path / "mix" / "matched.csv").is_file() and matched_rows(result.rows)
    assert "matched clean accuracy" in result.text()
    linear = {(r["alpha"], r["attack"]): r["accuracy"] for r in result.rows if r.get("h_map") == "identity"}
    mapped = {(r["alpha"], r["attack"]): r["accuracy"] for r in result.rows if r.get("h_map") == label}
    assert mapped[0.0, "clean"] == linear[0.0, "clean"] and mapped[0.0, "worst"] == linear[0.0, "worst"]  # g alone


def test_a_map_fitted_on_other_models_is_warned(tmp_path, caplog):
    from types import SimpleNamespace

    from mixrobust.mixing import load_fit
    from mixrobust.pipelines.mix import check_fits

    fit = {"h_map": {"kind": "nonlinear", "scale": 2.0, "power": 1.0, "bias": 0.0}, "alpha": 0.9,
           "models": {"g": {"sha256": "a"}, "h": {"sha256": "b"}}}
    (tmp_path / "other.json").write_text(json.dumps(fit))
    g, h = (SimpleNamespace(key=f"{k}_ckpt", identity={"sha256": k}) for k in "gh")
    with caplog.at_level(logging.INFO, logger="mixrobust.pipelines.mix"):
        check_fits({"other": load_fit("other", tmp_path)}, g, h, [0.5, 0.9])
    assert "h_map other" in caplog.text and "was fitted on other base models than g_ckpt and h_ckpt" in caplog.text
    assert "leaves out" not in caplog.text  # 0.9 is evaluated


def test_held_out_check_warns_where_no_setting_fixes_it(caplog):
    from types import SimpleNamespace

    from mixrobust.pipelines.fit_map import check_held_out

    data = SimpleNamespace(val_split={"seed": 0, "val_size": 0.1})
    model = lambda key, split: SimpleNamespace(key=key, record={"split": split})  # noqa: E731
    ours, other, wider = {"seed": 0, "val_size": 0.1}, {"seed": 1, "val_size": 0.1}, {"seed": 0, "val_size": 0.2}
    with caplog.at_level(logging.WARNING):
        check_held_out("val", data, [model("g_ckpt", ours), model("h_ckpt", ours)])  # held out of both: silent
        check_held_out("val", data, [model("g_ckpt", wider), model("h_ckpt", ours)])  # a subset of g's: silent too
        assert not caplog.records
        check_held_out("val", data, [model("g_ckpt", ours), model("h_ckpt", other)])
        check_held_out("val", data, [model("g_ckpt", None), model("h_ckpt", ours)])
        check_held_out("train", data, [model("g_ckpt", ours), model("h_ckpt", ours)])
    first, second, third = (r.getMessage() for r in caplog.records)
    assert "in part training images of h_ckpt trained with seed=1 data.val_size=0.1" in first
    assert second.startswith("g_ckpt: the record does not say which training images were held out")
    assert third.startswith("fit.split=train: the fit's images are the models' training images")
    with pytest.raises(ConfigError, match="pass seed=1 data.val_size=0.1"):
        check_held_out("val", data, [model("g_ckpt", other), model("h_ckpt", other)])
    counts = SimpleNamespace(val_split={"seed": 0, "val_size": 5000})  # MNIST's default; h held out 2,000 of them
    with pytest.raises(ConfigError, match="pass seed=0 data.val_size=2000"):
        check_held_out("val", counts, [model("g_ckpt", {"seed": 0, "val_size": 5000}),
                                       model("h_ckpt", {"seed": 0, "val_size": 2000})])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_held_out("val", counts, [model("g_ckpt", {"seed": 0, "val_size": 0}), model("h_ckpt", None)])
        check_held_out("val", counts, [model("g_ckpt", ours), model("h_ckpt", ours)])
    nothing, unknown, incomparable, again = (r.getMessage() for r in caplog.records)
    assert "in part training images of g_ckpt trained with seed=0 data.val_size=0; no setting" in nothing
    assert unknown.startswith("h_ckpt: the record does not say")
    assert "data.val_size=5000 here and 0.1 in g_ckpt's training: a count and a fraction" in incomparable
    assert "pass data.val_size=0.1" in incomparable and "h_ckpt's training" in again


@pytest.mark.parametrize("overrides, pattern", [
    (["mix.h_map=[identity,no_such_fit]"], r"no fitted map at .*no_such_fit.json"),
    (["mix.h_map=[nonlinear]", "mix.h_map_params.scale=0"], r"mix.h_map_params.scale must be a number > 0"),
    (["mix.h_map=[nonlinear]", "mix.h_map_params.top_k=11"], r"top_k=11 exceeds the models' 10 classes"),
    (["task=fit_map", "fit.split=test"], r"fit.split.*'test'.*valid values: val, train"),
    (["task=fit_map", "fit.target=1.5"], r"fit.target must be a number > 0 and <= 1"),
    (["task=fit_map", "seed=1"], r"the fit's validation images \(seed=1, data.val_size=0.1\) are in part training "
                                 r"images \(g_ckpt trained with seed=0 .*\); pass seed=0 data.val_size=0.1"),
    (["task=fit_map", "data=digits", "data.val_size=0.2"], r"pass seed=0 data.val_size=0.1, which holds them out of every model"),
])
def test_bad_map_settings_fail_before_any_attack(ckpts, tmp_path, no_attacks, overrides, pattern):
    from mixrobust.pipelines import fit_map

    task = fit_map if "task=fit_map" in overrides else mix
    with pytest.raises(ConfigError, match=pattern):
        task.run(eval_cfg(ckpts, tmp_path, f"fits_dir={tmp_path}", *overrides))
