"""The study task: a data set from nothing to report.md, resumable, checked before any work."""

from __future__ import annotations

import json
import logging
import re

import pytest
from omegaconf import OmegaConf, open_dict

from mixrobust import pipelines
from mixrobust.errors import ConfigError
from mixrobust.study.claims import CLAIMS
from tests.conftest import compose_config, real_data_root
from tests.test_loggers import wandb_env  # noqa: F401  (a fixture)

VERDICTS = {"holds", "does not hold", "inconclusive"}

#: study_digits with tiny settings: every stage runs, on few images and short schedules
TINY_DIGITS = {
    "train": {"common": ["data=digits", "trainer.max_epochs=2", "val_attack_steps=2", "test_attack_steps=2"],
              "g": ["objective=standard"], "h": ["objective=pgd_at", "objective.steps=2"],
              "rs": ["objective=gaussian_noise"]},
    "evaluate": ["data=digits", "split=test", "n=48", "attack.steps=3", "adaptive.steps=3"],
    "fig2": ["mix.alphas=[0.0,0.4,0.6,1.0]"],
    "autoattack": ["n=16"],
    "fig1": ["mix.alphas=null", "mix.gammas=[0.5,2.0]", "mix.r_options=[one,grad_g_i]", "mix.mix_spaces=[prob,logit]",
             "attack.steps=2"],
    "fig3": ["n=24", "certify.n=100", "certify.n0=20", "certify.batch_size=2000", "certify.report_radii=[0.0,0.1,0.2]",
             "certify.alphas=[0.5,0.8,1.0]"],
}


def study_config(tmp_path, preset: str = "study_digits", study: dict | None = None, overrides=()):
    cfg = compose_config("evaluate", [f"experiment={preset}", "progress.mode=none", *overrides], tmp_path / "logs")
    with open_dict(cfg):
        cfg.study.dir = str(tmp_path / "study")
        for key, value in (study or {}).items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    cfg.study[key][sub] = v
            else:
                cfg.study[key] = value
    return cfg


def stage_times(folder) -> dict:
    return json.loads((folder / "stages.json").read_text())


def test_study_digits_end_to_end_then_a_second_run_skips_every_stage(tmp_path, one_thread, monkeypatch):
    cfg = study_config(tmp_path, study=TINY_DIGITS)
    first = pipelines.run(cfg)
    folder = tmp_path / "study"
    names = ["train/g", "train/h", "train/rs_sigma0.5", "train/rs_sigma0.25", "fig2", "autoattack", "fig1",
             "fig3_plugin", "fig3_sound"]
    assert list(first.stages) == names
    assert all(s["status"] == "ran" and s["seconds"] > 0 for s in first.stages.values())

    report = (folder / "report.md").read_text()
    for section in ("## Claims", "## Stages", "## Base models", "## Figure 2", "## AutoAttack on the mixture",
                    "## Table 1", "## Figure 1", "## Figure 3: certified accuracy (plug-in radii)",
                    "## Figure 3: certified accuracy (sound radii)", "## Settings"):
        assert section in report
    for figure in ("fig2/accuracy_vs_alpha.png", "fig1/tradeoff.png", "fig3_plugin/certified_accuracy.png"):
        assert f"]({figure})" in report and (folder / figure).is_file()
    page = (folder / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "<table>" in page

    claims = json.loads((folder / "claims.json").read_text())
    keys = [c["key"] for c in claims]
    assert keys == ["clean_moves", "mix_jump", "r_one_prob_best", "margin_asymmetry", "certified_small_radii_plugin",
                    "certified_small_radii_sound", "attack_strength"]
    assert set(c["key"].removesuffix("_plugin").removesuffix("_sound") for c in claims) == set(CLAIMS)
    for claim in claims:  # every row rests on numbers (no stage is missing) and has a verdict and its reason
        assert claim["verdict"] in VERDICTS and claim["reason"]
        assert re.search(r"\d\.\d", claim["numbers"]), claim
        assert "did not run" not in claim["reason"]
    # the claims table the report prints, one row per claim
    table = report.split("## Claims", 1)[1].split("##", 1)[0]
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(claims) + 1
    # Figure 2's endpoints are the base models themselves
    clean = dict(re.findall(r"(g|h|alpha=0|alpha=1) (\d+\.\d)%", claims[0]["numbers"]))
    assert clean["alpha=0"] == clean["g"] and clean["alpha=1"] == clean["h"]
    times = stage_times(folder)

    second = pipelines.run(study_config(tmp_path, study=TINY_DIGITS))
    assert second.skipped and all(s["status"] == "skipped" for s in second.stages.values())
    assert stage_times(folder) == times  # what each stage took when it ran, kept
    assert "finished before" in (folder / "report.md").read_text()
    assert json.loads((folder / "claims.json").read_text()) == claims

    # a damaged or removed result is redone, and only it
    (folder / "fig2" / "run.json").unlink()
    third = pipelines.run(study_config(tmp_path, study=TINY_DIGITS))
    assert [n for n, s in third.stages.items() if s["status"] == "ran"] == ["fig2"]

    # a stage stopped part way (Ctrl-C): the report it leaves reads nothing of that stage or the later ones,
    # whose files (older models, older settings) are still on disk to resume from
    (folder / "fig2" / "run.json").unlink()
    monkeypatch.setattr(pipelines.module("mix"), "run", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pipelines.run(study_config(tmp_path, study=TINY_DIGITS))
    assert (folder / "fig2" / "results.csv").is_file() and (folder / "fig1" / "results.csv").is_file()
    stopped = {c["key"]: c for c in json.loads((folder / "claims.json").read_text())}
    for key, stage in (("clean_moves", "Figure 2 sweep"), ("mix_jump", "Figure 2 sweep"),
                       ("r_one_prob_best", "Figure 1 sweep"), ("attack_strength", "AutoAttack stage")):
        assert stopped[key]["verdict"] == "inconclusive" and f"the {stage} did not run" in stopped[key]["reason"]
    assert "The fig2 stage has not finished." in (folder / "report.md").read_text()


def test_a_killed_training_stage_resumes_from_its_last_checkpoint(tmp_path, one_thread, monkeypatch, caplog):
    from mixrobust.pipelines import study

    tiny = {**TINY_DIGITS, "stages": ["train"]}
    plan = study.settings(study_config(tmp_path, study=tiny))
    g = plan.stages[0]
    skipped, best = study.run_training(g)
    assert not skipped and best.is_file()
    assert study.run_training(g) == (True, best)
    # killed after an epoch: the marker says unfinished and last.ckpt is there: the rerun resumes from it
    marker = json.loads((g.output_dir / study.STAGE_MARKER).read_text())
    unfinished = {"fingerprint": marker["fingerprint"], "finished": False}
    (g.output_dir / study.STAGE_MARKER).write_text(json.dumps(unfinished))
    seen = {}
    real = pipelines.module("train").run

    def spy(cfg):
        seen["ckpt_path"] = cfg.get("ckpt_path")
        return real(cfg)

    monkeypatch.setattr(pipelines.module("train"), "run", spy)
    assert study.run_training(g)[0] is False
    assert seen["ckpt_path"] == str(g.output_dir / "checkpoints" / "last.ckpt")
    assert json.loads((g.output_dir / study.STAGE_MARKER).read_text())["finished"]
    # another configuration in the same folder: trained from scratch, the old run moved aside (never deleted)
    other = study.settings(study_config(tmp_path, study={**tiny, "train": {**tiny["train"], "g": [
        "objective=standard", "seed=3"]}}))
    assert study.run_training(other.stages[0])[0] is False and seen["ckpt_path"] is None
    (aside,) = g.output_dir.parent.glob("g.replaced-*")
    assert (aside / "checkpoints" / "best.ckpt").is_file()
    # a best checkpoint edited after training: not trusted, trained anew
    best.write_bytes(best.read_bytes()[:-1] + b"x")
    assert study.run_training(other.stages[0])[0] is False
    # settings that do not change the model (where the data lies, how batches are loaded) keep it
    moved = study.settings(study_config(tmp_path, study={**tiny, "train": {**tiny["train"], "g": [
        "objective=standard", "seed=3", "data.eval_batch_size=7"]}}, overrides=["data_root=elsewhere"]))
    assert study.run_training(moved.stages[0])[0] is True
    # a study without its train stage reads the models in train/ as they are: one trained by a study under other
    # settings is warned, one trained elsewhere (no stage.json) is not
    h_best = g.output_dir.parent / "h" / "checkpoints" / "best.ckpt"
    h_best.parent.mkdir(parents=True)
    h_best.touch()
    evaluation_only = study.settings(study_config(tmp_path, study={**tiny, "stages": ["fig2"]}))
    assert [s.name for s in evaluation_only.stages] == ["fig2"]
    with caplog.at_level(logging.WARNING, logger="mixrobust.pipelines.study"):
        study.check_reused(evaluation_only)
    assert "study stage train/g was trained with other settings than study.train gives now" in caplog.text
    assert "train/h" not in caplog.text


@pytest.mark.parametrize("study, message", [
    ({"fig2": ["mix.alphas=[0.0,2.0]"]}, r"study stage fig2: mix\.alphas"),
    ({"fig1": ["mix.no_such_key=1"]}, r"study stage fig1: the overrides .* do not compose"),
    ({"train": {"h": ["objective=no_such_objective"]}}, r"study stage train/h: the overrides .* do not compose"),
    ({"stages": ["fig2"]}, r"study stage fig2 reads .*train/g/checkpoints/best\.ckpt.*add train to study\.stages"),
    ({"rs_sigma": 0.25}, r"study\.rs_sigma and study\.baseline_sigma are both 0\.25"),
    ({"train": {**TINY_DIGITS["train"], "common": ["data=digits", "trainer.devices=2", "trainer.strategy=ddp"]}},
     r"study stage train/g: trainer devices=2, strategy=ddp: a study trains each model in its own process"),
    ({"paper_alpha": 0.4}, r"study\.paper_alpha must be"),
])
def test_bad_study_settings_stop_before_any_work(tmp_path, study, message):
    cfg = study_config(tmp_path, study={**TINY_DIGITS, **study})
    with pytest.raises(ConfigError, match=message):
        pipelines.run(cfg)
    assert not (tmp_path / "study" / "train").exists()


def test_a_missing_autoattack_implementation_stops_the_study_before_training(tmp_path, monkeypatch):
    from mixrobust.attacks import autoattack

    monkeypatch.setattr(autoattack, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"^study stage autoattack: attacks include autoattack but no "
                                          r"implementation is installed.*leave the stage out: "
                                          r"'study\.stages=\[train,fig2,fig1,fig3\]'"):
        pipelines.run(study_config(tmp_path, study=TINY_DIGITS))
    assert not (tmp_path / "study" / "train").exists()


def test_study_task_without_a_preset_names_one(tmp_path):
    cfg = compose_config("evaluate", ["task=study"], tmp_path)
    with pytest.raises(ConfigError, match="experiment=study_digits"):
        pipelines.check(cfg)


@pytest.mark.parametrize("preset", ["study_mnist", "study_cifar10_cpu", "study_cifar10"])
def test_real_data_presets_compose_every_stage(tmp_path, preset, monkeypatch):
    from mixrobust.pipelines import study

    monkeypatch.setenv("MIXROBUST_DATA_ROOT", str(real_data_root()))
    overrides = ["device=cpu"] if preset == "study_cifar10" else []
    cfg = study_config(tmp_path, preset, overrides=overrides)
    with open_dict(cfg):  # the GPU preset's training checks need a GPU; composing them does not
        cfg.study.train.common = [o for o in cfg.study.train.common if not o.startswith("trainer")]
    plan = study.settings(cfg)
    assert [s.name for s in plan.stages] == ["train/g", "train/h", f"train/rs_sigma{cfg.study.rs_sigma:g}",
                                             f"train/rs_sigma{cfg.study.baseline_sigma:g}", "fig2", "autoattack",
                                             "fig1", "fig3_plugin", "fig3_sound"]
    fig2 = plan.stages[4].cfg
    assert fig2.threat.norm == "linf" and fig2.attack.steps == 20 and fig2.attack.loss == "ce"
    assert not fig2.attack.random_start
    autoattack = plan.stages[5].cfg
    assert list(autoattack.mix.alphas) == [0.6, 1.0] and "autoattack" in autoattack.attacks
    assert plan.stages[7].cfg.certify.mode == "plugin" and plan.stages[8].cfg.certify.mode == "sound"


@pytest.mark.slow
def test_gpu_preset_runs_its_first_steps_on_the_cpu(tmp_path, one_thread, monkeypatch):
    """study_cifar10 (ResNet-18s, bf16, channels_last) with the GPU swapped for the CPU and tiny settings."""
    monkeypatch.setenv("MIXROBUST_DATA_ROOT", str(real_data_root()))
    cfg = study_config(tmp_path, "study_cifar10", overrides=["device=cpu"])
    with open_dict(cfg):
        cfg.study.stages = ["train", "fig2"]
        cfg.study.train.common = [("trainer=cpu" if o == "trainer=gpu" else o) for o in cfg.study.train.common] + [
            "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1", "data.batch_size=8", "data.eval_batch_size=8", "val_attack_steps=1",
            "test_attack_steps=1", "trainer.log_every_n_steps=1"]
        cfg.study.train.h = [*cfg.study.train.h, "objective.steps=1"]
        cfg.study.evaluate = [*cfg.study.evaluate, "n=4", "batch_size=4"]  # the paper's PGD-20 (paper_setting)
        cfg.study.fig2 = ["mix.alphas=[0.0,0.6,1.0]"]
    result = pipelines.run(cfg)
    assert list(result.stages) == ["train/g", "train/h", "fig2"]
    fig2 = json.loads((tmp_path / "study" / "fig2" / "run.json").read_text())
    assert fig2["n"] == 4 and fig2["g_record"]["model"]["arch"] == "resnet18"
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## Beside the paper" in report and "95.3%" in report


def test_with_a_wandb_logger_the_report_goes_to_one_offline_run(tmp_path, wandb_env):  # noqa: F811
    from types import SimpleNamespace

    from mixrobust.evaluation.plots import plot_accuracy_vs_alpha
    from mixrobust.study import report
    from mixrobust.study.claims import check_claims

    root = tmp_path / "study"
    rows = [{"model": "mix", "alpha": a, "r_option": "one", "mix_space": "prob", "norm": "linf", "eps": 0.3,
             "attack": k, "implementation": "", "steps": 20, "accuracy": v, "n": 100}
            for a in (0.0, 1.0) for k, v in (("clean", 0.9), ("mix", 0.1 + 0.4 * a), ("worst", 0.1 + 0.3 * a))]
    plot_accuracy_vs_alpha(rows, root / "fig2" / "accuracy_vs_alpha.png")
    logger = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "mixrobust", "tags": [], "offline": True}
    plan = SimpleNamespace(root=root, keys=SimpleNamespace(title="tiny study"),
                           cfg=OmegaConf.create({"logger": logger}))
    claims = check_claims(fig2_rows=rows)
    plot_accuracy_vs_alpha(rows, root / "fig1" / "tradeoff.png")  # a stage this run did not finish: left out
    report._to_wandb(plan, claims, "<p>the report</p>", {"fig2"})
    (run,) = (root / "wandb").glob("offline-run-*")
    media = {p.relative_to(run / "files" / "media").parts[0]
             for p in (run / "files" / "media").rglob("*") if p.is_file()}
    assert media == {"table", "html", "images"}
    images = [p.name for p in (run / "files" / "media" / "images").rglob("*.png")]
    assert len(images) == 1, images  # fig2's figure; not fig1's
    (table,) = (run / "files" / "media" / "table").rglob("*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:2] == ["key", "figure"] and [r[0] for r in logged["data"]] == [c.key for c in claims]


@pytest.mark.parametrize("override, ok", [("n=100", False), ("mix.alphas=[0.5]", False), ("+attack.steps=5", False),
                                          ("study.dir=x", True), ("seed=3", True), ("logger=wandb", True),
                                          ("progress.mode=log", True), ("hydra.run.dir=x", True),
                                          ("experiment=study_mnist", True)])
def test_command_line_values_that_no_stage_would_see_are_refused(override, ok):
    from mixrobust.pipelines.study import _check_overrides

    if ok:
        _check_overrides([override])
    else:
        with pytest.raises(ConfigError, match=r"does not reach a study's stages.*'study\.evaluate=\[\"data=mnist\",\""):
            _check_overrides([override])


def test_paper_numbers_only_beside_the_papers_setting(tmp_path):
    cfg = study_config(tmp_path, study={**TINY_DIGITS, "paper_setting": True})
    with pytest.raises(ConfigError, match=r"study\.paper_setting=true .*train/g is not on CIFAR-10.*"
                                          r"train/g trains small_cnn, not a ResNet-18.*study\.paper_setting=false"):
        pipelines.run(cfg)


def test_paper_numbers_not_beside_cifar100(tmp_path):
    """CIFAR-100 is not the paper's data set, although its module's name contains CIFAR10 (refused while the stages
    are composed, before any data folder is looked at)."""
    from mixrobust.pipelines import study

    cfg = study_config(tmp_path, "study_cifar10", overrides=["device=cpu"])
    with open_dict(cfg):
        cfg.study.train.common = [o.replace("data=cifar10", "data=cifar100") for o in cfg.study.train.common
                                  if not o.startswith("trainer")]
        cfg.study.evaluate = [o.replace("data=cifar10", "data=cifar100") for o in cfg.study.evaluate]
    with pytest.raises(ConfigError, match=r"study\.paper_setting=true .*train/g is not on CIFAR-10.*fig2 is not on "
                                          r"CIFAR-10"):
        study.settings(cfg)
