"""Typed settings: the field parser's conversions and messages, and the checks and warnings the tasks add."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf

from mixrobust.errors import ConfigError
from mixrobust.pipelines import fields, inputs
from mixrobust.threat import Norm


class Color(str, Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Keys:
    count: int = fields.bounded(1, ge=1)
    rate: float = fields.bounded(0.5, gt=0, le=1)
    flag: bool = False
    name: Literal["a", "b"] = "a"
    color: Color = Color.RED
    values: tuple[float, ...] = fields.bounded((0.0,), ge=0, min_len=1)
    path: Path | None = None
    limit: float | None = fields.bounded(None, ge=0, allow_inf=True)
    precision: str | int = "32"


def parse(**node):
    return fields.parse(Keys, OmegaConf.create(node), "k")


def test_values_are_converted_by_their_type_hints():
    keys = parse(count=3.0, rate=1, flag=True, name="b", color="BLUE", values=0.25, path="~/x", limit=float("inf"),
                 precision=16)
    assert keys == Keys(3, 1.0, True, "b", Color.BLUE, (0.25,), Path("~/x").expanduser(), float("inf"), 16)
    assert parse(precision="bf16-mixed").precision == "bf16-mixed"  # a union takes the member that fits
    assert isinstance(keys.count, int) and isinstance(keys.rate, float)
    assert parse() == Keys()


@pytest.mark.parametrize(
    "node, message",
    [
        ({"count": 0}, r"^k\.count must be a whole number >= 1, got 0$"),
        ({"count": 2.5}, r"^k\.count must be a whole number, got 2\.5$"),
        ({"count": "abc"}, r"^k\.count must be a whole number >= 1, got 'abc'$"),
        ({"count": True}, r"^k\.count must be a whole number >= 1, got True$"),
        ({"rate": 0}, r"^k\.rate must be a number > 0 and <= 1, got 0\.0$"),
        ({"rate": float("nan")}, r"^k\.rate must be a finite number, got nan$"),
        ({"rate": float("inf")}, r"^k\.rate must be a finite number, got inf$"),
        ({"flag": "yes"}, r"^k\.flag must be true or false, got 'yes'$"),
        ({"name": "c"}, r"^unknown k\.name 'c'; valid values: a, b$"),
        ({"color": "green"}, r"^unknown k\.color 'green'; valid values: red, blue$"),
        ({"values": []}, r"^k\.values must hold at least 1 value\(s\), got \[\]$"),
        ({"values": [0.5, -1.0]}, r"^k\.values\[1\] must be a number >= 0, got -1\.0$"),
        ({"count": None}, r"^k\.count must be set, got null$"),
        ({"cuont": 2}, r"^unknown setting k\.cuont; valid settings of k: color, count, flag"),
    ],
)
def test_every_bad_value_names_its_key(node, message):
    with pytest.raises(ConfigError, match=message):
        parse(**node)


def test_missing_and_unresolvable_values_name_their_key():
    with pytest.raises(ConfigError, match=r"missing config value k\.count; set it on the command line"):
        fields.parse(Keys, OmegaConf.create({"count": "???"}), "k")
    with pytest.raises(ConfigError, match=r"^k\.rate cannot be resolved"):
        fields.parse(Keys, OmegaConf.create({"rate": "${nowhere}"}), "k")
    with pytest.raises(ConfigError, match=r"missing config values g_ckpt, h_ckpt; .* g_ckpt=\.\.\. h_ckpt=\.\.\."):
        fields.require(OmegaConf.create({"g_ckpt": "???", "h_ckpt": None}), "g_ckpt", "h_ckpt")


def test_build_names_the_node_for_any_failure():
    with pytest.raises(ConfigError, match=r"^attack\.stpes is not a setting of mixrobust\.attacks\.PGD$"):
        fields.build({"_target_": "mixrobust.attacks.PGD", "eps": 0.1, "step_size": 0.1, "stpes": 3}, "attack")
    with pytest.raises(ConfigError, match=r"^attack\._target_='mixrobust\.attacks\.Nope' cannot be loaded"):
        fields.build({"_target_": "mixrobust.attacks.Nope"}, "attack")
    with pytest.raises(ConfigError, match=r"^data must be a config group with a _target_"):
        fields.build({"root": "x"}, "data")
    with pytest.raises(ConfigError, match=r"^unknown attack\.loss .hinge."):  # our own error, unchanged
        fields.build({"_target_": "mixrobust.attacks.PGD", "eps": 0.1, "step_size": 0.1, "loss": "hinge"}, "attack")


def _model(key: str, objective: str, threat=None, shape=(1, 8, 8)) -> inputs.ModelFile:
    record = {"model": {"num_classes": 10, "input_shape": list(shape)}, "objective": {"name": objective},
              "threat": threat, "data": "digits"}
    return inputs.ModelFile(key, Path(f"/{key}.ckpt"), record)


def test_swapped_models_and_threat_mismatch_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="mixrobust"):
        inputs.warn_if_swapped(_model("g_ckpt", "pgd_at"), _model("h_ckpt", "standard"))
        inputs.warn_if_swapped(_model("g_ckpt", "standard"), _model("h_ckpt", "pgd_at"))
        threat = inputs.threat(OmegaConf.create({"threat": {"norm": "l2", "eps": 0.5, "step_size": 0.1}}), (1, 8, 8))
        inputs.warn_threat_mismatch(_model("h_ckpt", "pgd_at", {"norm": "linf", "eps": 0.2}), threat)
        # a Gaussian-noise h records the config's threat, which it did not train against: no warning
        inputs.warn_threat_mismatch(_model("h_ckpt", "gaussian_noise", {"norm": "linf", "eps": 0.2}), threat)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "g_ckpt was trained with pgd_at and h_ckpt with standard training" in messages[0]
    assert "h_ckpt was trained against linf eps=0.2 but is evaluated at l2 eps=0.5" in messages[1]


def test_pair_checks_and_threat_range():
    with pytest.raises(ConfigError, match=r"g_ckpt takes inputs of shape \(1, 8, 8\) but h_ckpt takes \(1, 28, 28\)"):
        inputs.check_pair(_model("g_ckpt", "standard"), _model("h_ckpt", "standard", shape=(1, 28, 28)))
    threat = lambda norm, eps: inputs.threat(  # noqa: E731
        OmegaConf.create({"threat": {"norm": norm, "eps": eps, "step_size": 0.1}}), (1, 8, 8))
    assert threat("l2", 8.0).eps == 8.0  # the diameter of [0,1]^64
    with pytest.raises(ConfigError, match=r"threat\.eps=8\.01 exceeds the input range: an l_2 ball of radius 8"):
        threat("l2", 8.01)
    with pytest.raises(ConfigError, match=r"threat\.eps=1\.5 exceeds the input range: an l_inf ball of radius 1"):
        threat("linf", 1.5)
    assert threat("linf", 1.0).norm is Norm.LINF


def test_unreachable_steps_warn_unless_random_start(caplog):
    with caplog.at_level(logging.WARNING, logger="mixrobust"):
        inputs.warn_unreachable(10, 0.0027, 8 / 255, False, "attack")  # the paper's Figure 1 PGD-10
        inputs.warn_unreachable(20, 0.0027, 8 / 255, False, "attack")  # its PGD-20 reaches eps
        inputs.warn_unreachable(10, 0.0027, 8 / 255, True, "attack")
    assert len(caplog.records) == 1
    assert "10 steps of 0.0027 reach at most 0.027" in caplog.records[0].getMessage()


# --------------------------------------------------------------------- the tasks' settings, from configs


def hand_checkpoint(path: Path, objective, num_classes: int = 10, sigma_objective: bool = False) -> str:
    """A valid mixrobust checkpoint of an untrained digits model (settings read records, not weights)."""
    import torch

    from mixrobust.checkpoint import make_record
    from mixrobust.models import create_model

    model = create_model("small_cnn", num_classes, (1, 8, 8), (0.3,), (0.4,))
    torch.save({"mixrobust": make_record(model, objective, None, "digits"),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.fixture
def hand_ckpts(tmp_path):
    from mixrobust.training.objectives import PGDAT, GaussianNoise, Standard

    return {"g": hand_checkpoint(tmp_path / "g.ckpt", Standard()),
            "h": hand_checkpoint(tmp_path / "h.ckpt", PGDAT(eps=0.2, step_size=0.05)),
            "rs": hand_checkpoint(tmp_path / "rs.ckpt", GaussianNoise(0.25)),
            "five": hand_checkpoint(tmp_path / "five.ckpt", Standard(), num_classes=5)}


def test_fingerprints_follow_every_number_and_only_those(hand_ckpts, tmp_path):
    from mixrobust.pipelines import certify, mix
    from tests.conftest import compose_config

    def mix_fp(*overrides):
        cfg = compose_config("evaluate", [f"g_ckpt={hand_ckpts['g']}", f"h_ckpt={hand_ckpts['h']}", "logger=none",
                                          "data=digits", *overrides], tmp_path)
        return mix.settings(cfg).fingerprint

    def cert_fp(*overrides):
        cfg = compose_config("evaluate", [f"g_ckpt={hand_ckpts['g']}", f"h_ckpt={hand_ckpts['rs']}", "task=certify",
                                          "logger=none", *overrides], tmp_path)
        return certify.settings(cfg).fingerprint

    base = mix_fp()
    for change in ("mix.alphas=[0.5]", "attack.steps=7", "threat.eps=0.1", "n=10", "seed=1", "batch_size=64",
                   "attacks=[std,rob,mix,autoattack]"):
        assert mix_fp(change) != base, change
    for same in ("plots=false", "device=cpu", "resume=false", "preflight=false", "skip_misclassified=false",
                 "certify.n=5", "autoattack.implementation=torchattacks", "data.eval_batch_size=7", "logger=csv",
                 "distributed.devices=2"):
        assert mix_fp(same) == base, same
    # with a random start each process draws its own starts: another draw, not the same numbers
    for random_start in ("attack.random_start=true", "adaptive.random_start=true", "attacks=[std,rob,mix,autoattack]"):
        assert mix_fp(random_start, "distributed.devices=2") != mix_fp(random_start), random_start
    base = cert_fp()
    for change in ("certify.n=500", "certify.n0=50", "certify.mode=plugin", "certify.failure_prob=0.01",
                   "certify.votes=soft", "certify.alphas=[0.6]", "certify.sigma=0.5", "certify.autocast_dtype=bfloat16",
                   "certify.report_radii=[0.1]", "certify.target_accuracy=0.5", "n=10"):
        assert cert_fp(change) != base, change
    for same in ("certify.batch_size=16", "certify.workers=1", "certify.compile=true", "mix.alphas=[0.5]",
                 "attack.steps=7", "batch_size=64", "plots=false"):
        assert cert_fp(same) == base, same


def test_data_whose_classes_differ_from_the_models_is_refused(hand_ckpts, tmp_path):
    from mixrobust.pipelines import mix
    from tests.conftest import compose_config

    cfg = compose_config("evaluate", [f"g_ckpt={hand_ckpts['five']}", f"h_ckpt={hand_ckpts['five']}", "data=digits",
                                      "logger=none"], tmp_path)
    with pytest.raises(ConfigError, match=r"data=digits has 10 classes .* but g_ckpt takes 5 classes"):
        mix.settings(cfg)


def test_a_lipschitz_constant_below_the_smoothed_models_is_refused_when_sound(hand_ckpts, tmp_path, caplog):
    from mixrobust.pipelines import certify
    from tests.conftest import compose_config

    def settings(*overrides):
        return certify.settings(compose_config("evaluate", [f"g_ckpt={hand_ckpts['g']}", f"h_ckpt={hand_ckpts['rs']}",
                                                            "task=certify", "logger=none", *overrides], tmp_path))

    floor = (2 / 3.141592653589793) ** 0.5 / 0.25  # sqrt(2/pi)/sigma = 3.19
    assert settings(f"certify.lipschitz={floor + 0.01}").c.lipschitz > floor
    with pytest.raises(ConfigError, match=r"certify\.lipschitz=3 is below .* sqrt\(2/pi\)/sigma = 3\.19154"):
        settings("certify.lipschitz=3")
    with caplog.at_level(logging.WARNING, logger="mixrobust"):
        assert settings("certify.lipschitz=3", "certify.mode=plugin").c.lipschitz == 3
    assert any("no guarantee" in r.getMessage() for r in caplog.records)


def test_more_processes_than_gpus_is_refused_before_anything_loads(hand_ckpts, tmp_path, monkeypatch):
    from mixrobust.pipelines import inputs, mix
    from tests.conftest import compose_config

    monkeypatch.setattr(inputs, "visible_gpus", lambda: 2)
    cfg = compose_config("evaluate", [f"g_ckpt={hand_ckpts['g']}", f"h_ckpt={hand_ckpts['h']}", "logger=none",
                                      "data=digits", "distributed.devices=4"], tmp_path)
    with pytest.raises(ConfigError, match=r"distributed\.devices=4 but 2 GPU\(s\) are visible; lower "
                                          r"distributed\.devices or pass device=cpu"):
        mix.settings(cfg)
    cfg.device = "cpu"  # CPU processes: as many as asked
    assert mix.settings(cfg).processes == 4
