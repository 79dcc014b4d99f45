"""The training pipeline end to end on digits, self-describing checkpoints, and bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixrobust import load_classifier
from mixrobust.checkpoint import read_checkpoint
from mixrobust.errors import CheckpointError, ConfigError, DataNotFoundError
from mixrobust.pipelines import train

FAST = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per objective on digits; returns {objective: (TrainResult, output_dir)}."""
    from tests.conftest import compose_config

    runs = {}
    for objective in ("standard", "pgd_at", "trades", "gaussian_noise"):
        out = tmp_path_factory.mktemp(objective)
        extra = ["objective.steps=3"] if objective in ("pgd_at", "trades") else []
        cfg = compose_config("train", [f"objective={objective}", *FAST, *extra], out)
        runs[objective] = (train.run(cfg), out)
    return runs


@pytest.mark.parametrize(
    "objective, keys",
    [
        ("standard", {"test/acc"}),
        ("pgd_at", {"test/acc", "test/robust_acc"}),
        ("trades", {"test/acc", "test/robust_acc"}),
        ("gaussian_noise", {"test/acc", "test/noise_acc"}),
    ],
)
def test_metrics_json_and_checkpoint(trained, objective, keys):
    result, out = trained[objective]
    metrics = result.metrics
    on_disk = json.loads((out / "metrics.json").read_text())
    assert keys <= set(on_disk) and on_disk == metrics
    assert Path(metrics["best_checkpoint"]) == result.best_checkpoint == out / "checkpoints" / "best.ckpt"
    assert result.output_dir == out
    assert (out / "checkpoints" / "last.ckpt").is_file()  # written at the end of every epoch, to resume from
    for key in keys:
        assert 0.0 <= on_disk[key] <= 1.0
    record = load_classifier(metrics["best_checkpoint"]).record
    assert record["objective"]["name"] == objective and record["data"] == "digits"
    assert record["model"]["arch"] == "small_cnn" and record["model"]["input_shape"] == [1, 8, 8]
    assert record["threat"] == {"norm": "linf", "eps": 0.25, "step_size": 0.0625}
    assert record["sigma"] == (0.25 if objective == "gaussian_noise" else None)
    assert record["split"] == {"seed": 0, "val_size": 0.1}  # the validation images it held out (a map fit checks)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (best,) = [v["best_model_score"] for k, v in state.items() if k.startswith("ModelCheckpoint")]
    assert on_disk["val/selection"] == float(best)  # train.py's default optimized_metric: a validation score
    assert train.TrainKeys.optimized_metric == "val/selection" in metrics


def test_evaluation_runs_in_float32_under_a_bf16_trainer():
    """val/ and test/ metrics (model selection, reported robust accuracy) never come from a bf16 search."""
    from mixrobust.models import create_model
    from mixrobust.training.module import ClassifierModule
    from mixrobust.training.objectives import PGDAT

    seen = []
    model = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25], width=4, hidden=8)
    model.register_forward_hook(lambda m, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    module = ClassifierModule(model, PGDAT("linf", eps=0.25, step_size=0.1, steps=2), optimizer=None)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="self.log"):
        module.validation_step((x, y), 0)
    assert len(seen) == 1 + 10 + 1 + 1 and set(seen) == {(False, torch.float32)}  # clean, PGD-10 + final, judged


def test_robust_accuracy_is_below_clean(trained):
    metrics = trained["pgd_at"][0].metrics
    assert metrics["test/robust_acc"] <= metrics["test/acc"]


def test_load_classifier_reproduces_logits_in_fresh_process(trained, tmp_path):
    """The rebuilt network gives the trained module's logits exactly, in a new interpreter."""
    from mixrobust.data import DigitsDataModule

    ckpt = trained["pgd_at"][0].metrics["best_checkpoint"]
    dm = DigitsDataModule()
    x, _ = dm.eval_tensors("test")
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    from mixrobust.models import create_model

    spec = raw["mixrobust"]["model"]
    net = create_model(spec["arch"], spec["num_classes"], spec["input_shape"], spec["mean"], spec["std"])
    net.load_state_dict({k[len("model."):]: v for k, v in raw["state_dict"].items()})
    expected = net.eval()(x[:64])
    torch.save({"x": x[:64]}, tmp_path / "x.pt")
    script = (
        "import sys, torch; from mixrobust import load_classifier;"
        "m = load_classifier(sys.argv[1]); x = torch.load(sys.argv[2])['x'];"
        "assert not m.training and not any(p.requires_grad for p in m.parameters());"
        "torch.save(m(x), sys.argv[3])"
    )
    subprocess.run([sys.executable, "-c", script, ckpt, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_checkpoint_loads_without_pickled_code(trained):
    """torch.load(weights_only=True) accepts our checkpoints: nothing but tensors and plain data inside."""
    ckpt = read_checkpoint(trained["standard"][0].best_checkpoint)
    assert set(ckpt["mixrobust"]) >= {"format", "model", "objective", "threat", "sigma", "data"}


def test_truncated_checkpoint_is_one_clear_error(trained, tmp_path):
    data = trained["standard"][0].best_checkpoint.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_classifier(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.ckpt")


def test_truncated_resume_checkpoint_fails_before_training(trained, make_cfg, tmp_path, monkeypatch):
    data = trained["standard"][0].best_checkpoint.read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(data[:1000])
    monkeypatch.setattr(train.L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(CheckpointError):
        train.run(make_cfg([*FAST, f"ckpt_path={bad}"]))


def test_resume_checkpoint_of_another_run_is_refused_before_training(trained, make_cfg, monkeypatch):
    """ckpt_path is checked against this run's data, objective, model and optimizer before the Trainer starts."""
    last = trained["standard"][1] / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(train.L.Trainer, "__init__", lambda *a, **k: pytest.fail("trainer built"))
    with pytest.raises(CheckpointError, match="cannot resume this run: it was trained with objective 'standard' "
                                              r"\(this run: 'pgd_at'\)"):
        train.run(make_cfg([*FAST, "objective=pgd_at", f"ckpt_path={last}"]))


def test_resume_continues_its_own_folder_with_its_own_schedule(trained, make_cfg, tmp_path):
    """A resumed run writes into the folder of the run it continues (elsewhere Lightning would keep the old
    folder's best checkpoint but not its score), with the same schedule length; resuming a finished run
    there reports a checkpoint of that folder."""
    run_dir = trained["standard"][1]
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=f"belongs to the run folder {run_dir}.*hydra.run.dir={run_dir}"):
        train.run(make_cfg([*FAST, f"ckpt_path={last}"], output_dir=tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match=r"trainer.max_epochs 2 \(this run: 3\)"):
        train.run(make_cfg([*FAST, "trainer.max_epochs=3", f"ckpt_path={last}"], output_dir=run_dir))
    result = train.run(make_cfg([*FAST, f"ckpt_path={last}"], output_dir=run_dir))
    assert result.best_checkpoint.parent == run_dir / "checkpoints"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["model.arch=no_such_net"], ConfigError, "unknown model 'no_such_net'; registered models: .*small_cnn"),
        (["threat.eps=-0.1"], ConfigError, r"threat.eps must be a number >= 0, got -0.1"),
        (["objective=pgd_at", "threat.eps=-0.1"], ConfigError, r"threat.eps must be a number >= 0, got -0.1"),
        (["objective=pgd_at", "objective.eps=-0.1"], ConfigError, r"objective.eps must be a finite number >= 0"),
        (["objective=trades", "objective.eps=0.1"], ConfigError,
         r"the objective trains in the linf ball of eps 0.1 but threat is linf eps 0.25.*set threat.norm / threat.eps"),
        (["objective=gaussian_noise", "objective.sigma=0"], ConfigError, "sigma must be > 0"),
        (["threat.norm=l3"], ConfigError, "unknown threat.norm 'l3'; valid values: linf, l2"),
        (["trainer.max_epochs=0"], ConfigError, "trainer.max_epochs must be a whole number >= 1, got 0"),
        (["data=mnist", "data_root=/nonexistent/folder"], DataNotFoundError, "/nonexistent/folder.*data.root"),
    ],
)
def test_bad_input_fails_before_training(make_cfg, monkeypatch, overrides, error, match):
    monkeypatch.setattr(train.L.Trainer, "__init__", lambda *a, **k: pytest.fail("trainer built"))
    with pytest.raises(error, match=match):
        train.run(make_cfg([*FAST, *overrides]))


def test_pretrained_imagenet_weights_get_imagenet_normalization(make_cfg, tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    imagenet = [*FAST, "model=resnet50", "model.arch=resnet18_imagenet", "model.resize=32"]
    pretrained = train.settings(make_cfg([*imagenet, f"model.pretrained={weights}"])).model
    assert pretrained.spec["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])  # digits: 1 channel
    assert pretrained.spec["std"] == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    fresh = train.settings(make_cfg(imagenet)).model
    assert fresh.spec["mean"] == pytest.approx([0.3054], abs=1e-4)  # the data set's own


def test_half_precision_weights_of_a_robust_run_are_warned(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="mixrobust"):
        train.settings(make_cfg([*FAST, "objective=pgd_at", "trainer.precision=bf16-mixed"]))
        assert not [r for r in caplog.records if "precision" in r.getMessage()]
        train.settings(make_cfg([*FAST, "objective=pgd_at", "trainer.precision=bf16-true"]))
    assert "trainer.precision=bf16-true casts the weights themselves to half precision" in caplog.text
    assert "trainer.precision=bf16-mixed trains in bf16 and validates and tests in float32" in caplog.text


def test_empty_data_folder(make_cfg, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(train.L.Trainer, "__init__", lambda *a, **k: pytest.fail("trainer built"))
    for data in ("mnist", "cifar10"):
        with pytest.raises(DataNotFoundError, match=str(empty)):
            train.run(make_cfg([*FAST, f"data={data}", f"data_root={empty}"]))


@pytest.mark.parametrize("name", ["no_such_data", "no_such_objective"])
def test_unknown_config_group_option_lists_choices(make_cfg, name):
    from hydra.errors import MissingConfigException

    group = "data" if "data" in name else "objective"
    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/{name}'"):
        make_cfg([f"{group}={name}"])


def _start_train_script(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python train.py`` in a process of its own (one torch thread), its output in ``<run_dir>.out`` / ``.err``."""
    root = Path(__file__).resolve().parents[1]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.out", "w") as out, open(f"{run_dir}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(root / "train.py"), f"hydra.run.dir={run_dir}", *FAST[1:],
                                 *overrides], stdout=out, stderr=err, cwd=run_dir.parent,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish_train_script(proc: subprocess.Popen, run_dir: Path) -> dict:
    assert proc.wait(timeout=600) == 0, Path(f"{run_dir}.err").read_text()[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert Path(f"{run_dir}.out").read_text().strip().splitlines()[-1] == metrics["best_checkpoint"]  # printed last
    return metrics


@pytest.mark.slow
def test_ddp_two_cpu_processes_matches_one_process(tmp_path):
    """Lightning DDP with two gloo processes on the CPU: same accuracy as one process within noise.

    Each DDP rank takes half the batch so the effective batch (64) and the schedule match.
    """
    epochs = "trainer.max_epochs=12"
    runs = {"single": _start_train_script(tmp_path / "single", epochs),  # both at once, one thread per process
            "ddp": _start_train_script(tmp_path / "ddp", epochs, "trainer.devices=2", "trainer.strategy=ddp",
                                       "data.batch_size=32")}
    single, ddp = (_finish_train_script(proc, tmp_path / name) for name, proc in runs.items())
    assert single["test/acc"] >= 0.9 and ddp["test/acc"] >= 0.9
    assert abs(single["test/acc"] - ddp["test/acc"]) <= 0.03  # 360 test images: 3 points = 11 images
    assert load_classifier(ddp["best_checkpoint"]).record["data"] == "digits"


@pytest.mark.slow
@pytest.mark.real_data
def test_cifar10_real_data_end_to_end(data_root, make_cfg):
    """Real CIFAR-10 (.npz layout) through the whole pipeline on the CPU: one short PGD-AT epoch."""
    cfg = make_cfg([
        *FAST, "trainer.max_epochs=1", "data=cifar10", f"data_root={data_root}", "model=resnet20",
        "objective=pgd_at", "objective.steps=2", "data.batch_size=32", "data.eval_batch_size=100",
        "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
        "test_attack_steps=2", "val_attack_steps=2",
    ])
    metrics = train.run(cfg).metrics
    assert {"test/acc", "test/robust_acc"} <= set(metrics)
    model = load_classifier(metrics["best_checkpoint"])
    assert model.record["data"] == "cifar10" and model.input_shape == (3, 32, 32)
    assert model.record["threat"]["eps"] == pytest.approx(8 / 255)
