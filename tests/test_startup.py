"""Fast start: what importing the package, the tasks and the Hydra sweeper plugin loads.

Each check runs in a fresh interpreter (`sys.executable -c ...`), since this test session has long
since imported everything. Nothing here measures time; it checks which modules get imported.

What cannot be avoided: `lightning.pytorch` itself imports torchmetrics, which imports torchvision
(and with it torchvision.models, torchvision.ops, torch._dynamo), matplotlib.pyplot and scipy, and
its callbacks import rich. So the tasks that need lightning (train; mix and certify through the data
modules) are only checked to add nothing heavy beyond what lightning brings; everything below
lightning, `mixrobust.pipelines` itself, the report task and the sweeper plugin are checked outright.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Heavy third-party packages that mixrobust imports only where it uses them.
HEAVY = ("torchvision", "torch._dynamo", "lightning", "torchmetrics", "matplotlib", "scipy", "wandb",
         "statsmodels", "sklearn", "rich")
#: Never imported by importing any task (wandb: when logging to W&B; sklearn: digits data at load time).
NEVER = ("wandb", "statsmodels", "sklearn")

#: `available_models()` before the registry went lazy (the list the code registered then).
MODEL_NAMES = ["convnext_tiny", "preact_resnet18", "resnet110", "resnet18", "resnet18_imagenet", "resnet20",
               "resnet50", "small_cnn", "wrn_28_10", "wrn_34_10", "zoo"]

PRELUDE = """
import json, sys
def loaded(*names):
    return sorted({n for n in names for m in list(sys.modules) if m == n or m.startswith(n + ".")})
"""


def run_fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter from the repository root; it prints one JSON object last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_mixrobust_loads_no_torch_and_its_names_still_work():
    out = run_fresh("""
        import mixrobust
        from omegaconf import OmegaConf
        before = loaded("torch", *HEAVY)
        resolvers = [OmegaConf.has_resolver(f"mr.{r}") for r in ("mul_int", "pgd_step", "gpu_count")]
        version = mixrobust.__version__
        listed = dir(mixrobust)
        from mixrobust import load_classifier
        from mixrobust.checkpoint.files import load_classifier as defined
        names = mixrobust.available_models()
        print(json.dumps({"before": before, "resolvers": resolvers, "version": version, "listed": listed,
                          "same": load_classifier is defined and mixrobust.load_classifier is defined,
                          "mixed": mixrobust.MixedClassifier.__module__, "create": callable(mixrobust.create_model),
                          "names": names, "after": loaded("torchvision.models", "torch._dynamo", "lightning")}))
    """.replace("HEAVY", repr(HEAVY)))
    assert out["before"] == []
    assert out["resolvers"] == [True, True, True]  # the configs' ${mr.*} resolvers, registered on import
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert out["version"] == version("mixrobust")
    except PackageNotFoundError:
        assert out["version"] == "0+unknown"
    assert {"MixedClassifier", "__version__", "available_models", "create_model", "load_classifier"} <= set(
        out["listed"])
    assert out["same"] and out["create"]
    assert out["mixed"] == "mixrobust.mixing.classifier"
    assert out["names"] == MODEL_NAMES
    assert out["after"] == []  # the public names need torch, not torchvision's model zoo or lightning


def test_unknown_attribute_is_an_attribute_error():
    out = run_fresh("""
        import mixrobust
        try:
            mixrobust.no_such_name
            error = None
        except AttributeError as exc:
            error = str(exc)
        print(json.dumps({"error": error, "has": hasattr(mixrobust, "no_such_name")}))
    """)
    assert out["error"] and "no_such_name" in out["error"]
    assert out["has"] is False


def test_entry_point_layer_and_sweeper_plugin_load_no_torch():
    """train.py and evaluate.py import `mixrobust.pipelines`; Hydra imports the plugin on every run."""
    out = run_fresh("""
        import mixrobust.pipelines
        import hydra_plugins.mixrobust_sweeper.checked_sweeper
        print(json.dumps({"loaded": loaded("torch", *HEAVY)}))
    """.replace("HEAVY", repr(HEAVY)))
    assert out["loaded"] == []


def test_library_below_lightning_and_the_report_task_load_nothing_heavy():
    modules = ["mixrobust.checkpoint", "mixrobust.mixing", "mixrobust.models", "mixrobust.attacks",
               "mixrobust.evaluation", "mixrobust.certify", "mixrobust.certify.report", "mixrobust.evaluation.plots",
               "mixrobust.pipelines.report", *(f"mixrobust.runtime.{p.stem}" for p in
                                               sorted((ROOT / "mixrobust" / "runtime").glob("*.py")))]
    out = run_fresh(f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        print(json.dumps({{"loaded": loaded(*{HEAVY!r})}}))
    """)
    assert out["loaded"] == []


def test_tasks_add_nothing_heavy_to_what_lightning_imports():
    out = run_fresh(f"""
        import lightning.pytorch
        from_lightning = set(loaded(*{HEAVY!r}))
        import mixrobust.pipelines.train, mixrobust.pipelines.mix, mixrobust.pipelines.certify
        import mixrobust.pipelines.report, hydra_plugins.mixrobust_sweeper.checked_sweeper
        import mixrobust.data
        added = sorted(set(loaded(*{HEAVY!r})) - from_lightning)
        print(json.dumps({{"added": added, "never": loaded(*{NEVER!r})}}))
    """)
    assert out["added"] == []
    assert out["never"] == []


def test_model_registry_lists_the_same_names_and_builds_small_models_without_torchvision():
    """ImageNet-scale builders import torchvision's model zoo when called (tests/test_models.py builds them)."""
    out = run_fresh("""
        import torch
        from mixrobust.models import available_models, create_model
        names = available_models()
        model = create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.25], width=4, hidden=16).eval()
        with torch.no_grad():
            shape = list(model(torch.rand(2, 1, 8, 8)).shape)
        print(json.dumps({"names": names, "shape": shape, "spec": model.spec["arch"], "loaded": loaded("torchvision")}))
    """)
    assert out["names"] == MODEL_NAMES
    assert out["shape"] == [2, 10] and out["spec"] == "small_cnn"
    assert out["loaded"] == []


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_needs_no_torch(script):
    """``--help`` prints the config groups without importing torch (``-X importtime`` lists every import)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-X", "importtime", str(root / script), "--help"], capture_output=True,
                         text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== Config groups ==" in out.stdout or "Powered by Hydra" in out.stdout
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and "torch" not in imported and "lightning" not in imported
