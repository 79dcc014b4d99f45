"""Zoo models as g and h (`mixrobust.zoo`): each source loads exactly the network its library builds, offline.

Every test runs with the network cut off (conftest's `no_network`; evaluate.py subprocesses by `GUARD`): a call to
urllib, requests or a socket to another host fails it.
Weights are random, saved in the zoo folder's layout the way each library's users save them; the
reference is the library's own network on the same images normalized the source's way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixrobust import zoo
from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models import create_model
from tests.conftest import NetworkAccess, compose_config, real_data_root

ROOT = Path(__file__).resolve().parents[1]
needs_robustbench = pytest.mark.skipif(importlib.util.find_spec("robustbench") is None or
                                       importlib.util.find_spec("timm") is None,
                                       reason="the zoo extra is not installed: pip install -e '.[zoo]'")
pytestmark = needs_robustbench

#: A sitecustomize that cuts the network off in subprocesses (evaluate.py): any connection raises.
GUARD = '''
import socket, urllib.request
def _refuse(*args, **kwargs):
    raise RuntimeError("network access attempted in an offline test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
urllib.request.urlopen = _refuse
'''


def test_the_network_guard_catches_urllib_requests_and_sockets():
    """conftest's `no_network` runs around every test of the suite; here it is seen to work."""
    with pytest.raises(NetworkAccess):
        urllib.request.urlopen("https://example.com")
    with pytest.raises(NetworkAccess):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # an address: no DNS lookup before the guard
    requests = pytest.importorskip("requests")
    with pytest.raises(NetworkAccess):
        requests.get("https://example.com", timeout=1)


def images(n: int, shape=(3, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def robustbench_net(name: str) -> torch.nn.Module:
    from mixrobust.models.zoo import robustbench_entry

    torch.manual_seed(0)
    return robustbench_entry(name)[0]["model"]().eval()


def save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def loaded(spec: str, zoo_dir: Path, data=None, **settings):
    """(record, classifier) of source `spec` from zoo folder `zoo_dir`."""
    record = zoo.describe(zoo.parse(spec), zoo.ZooSettings(dir=zoo_dir, **settings), data)
    return record, zoo.load(record)


# ---------------------------------------------------------------- each source equals its library's network


@pytest.mark.parametrize("name, wrap", [
    ("cifar10/Linf/Standard", None),  # WideResNet-28-10, no normalization inside
    ("cifar10/Linf/Wong2020Fast", None),  # PreAct ResNet-18, normalization inside (mu, sigma)
    ("cifar10/Linf/Rade2021Helper_R18_ddpm", "state_dict"),  # DeepMind's PreAct ResNet-18 (Swish), as RobustBench saves
    ("cifar10/L2/Sehwag2021Proxy_R18", "module"),  # ResNet-18, saved from DataParallel
])
def test_robustbench_entry_equals_its_zoo_constructor(tmp_path, name, wrap):
    net = robustbench_net(name)
    state = net.state_dict()
    if wrap == "module":
        state = {"module." + k: v for k, v in state.items()}
    save({"state_dict": state} if wrap == "state_dict" else state, tmp_path / f"{name}.pt")
    record, model = loaded(f"robustbench:{name}", tmp_path)
    x = images(4)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), rtol=1e-5, atol=1e-6)  # [0,1] images: the entry normalizes inside
    dataset, threat_model, _ = name.split("/")
    assert record["source"]["dataset"] == dataset and record["source"]["threat_model"] == threat_model
    assert record["model"]["input_shape"] == [3, 32, 32] and record["model"]["num_classes"] == 10
    assert record["source"]["sha256"] == __import__("hashlib").sha256((tmp_path / f"{name}.pt").read_bytes()).hexdigest()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    budget = {"Linf": ("linf", 8 / 255), "L2": ("l2", 0.5)}[threat_model]
    assert (record["threat"]["norm"], record["threat"]["eps"]) == budget if "Standard" not in name else \
        record["threat"] is None and record["objective"] == {"name": "standard"}


def test_load_model_from_python_takes_a_source_or_a_checkpoint(tmp_path):
    import mixrobust

    net = robustbench_net("cifar10/Linf/Wong2020Fast")
    save(net.state_dict(), tmp_path / "w.pt")
    model = mixrobust.load_model(f"robustbench:cifar10/Linf/Wong2020Fast@{tmp_path / 'w.pt'}")
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        mixrobust.load_model(tmp_path / "best.ckpt")


def test_timm_model_equals_timm_with_its_pretrained_cfg_normalization(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    save(net.state_dict(), tmp_path / "timm" / "resnet10t.safetensors")
    record, model = loaded("timm:resnet10t", tmp_path)
    cfg = net.pretrained_cfg
    assert record["model"]["num_classes"] == 10  # from the file's head, not timm's 1000
    assert tuple(record["model"]["input_shape"]) == tuple(cfg["input_size"])
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = images(2, tuple(cfg["input_size"]))
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_torchvision_model_equals_torchvision_with_its_weights_transforms(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    save(net.state_dict(), tmp_path / "torchvision" / "resnet18.pth")
    record, model = loaded("torchvision:resnet18", tmp_path)
    t = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert record["model"]["num_classes"] == 10 and record["model"]["input_shape"] == [3, 224, 224]
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    x = images(2, (3, 224, 224))
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), rtol=1e-5, atol=1e-5)


def digits_data():
    from mixrobust.data.datasets import DigitsDataModule

    return DigitsDataModule()


@pytest.mark.parametrize("whole", [False, True], ids=["bare network", "whole classifier"])
def test_arch_source_equals_the_registered_network(tmp_path, whole):
    """A plain state_dict of a registered architecture (the bare network: the data set's normalization; or a whole
    classifier, normalization included) loads as create_model builds it."""
    data = digits_data()
    torch.manual_seed(0)
    mean, std = ([0.3], [0.2]) if whole else (data.mean, data.std)
    built = create_model("small_cnn", 10, data.input_shape, mean, std).eval()
    save(built.state_dict() if whole else built.net.state_dict(), tmp_path / "arch" / "small_cnn.safetensors")
    record, model = loaded("arch:small_cnn", tmp_path, data)
    assert record["model"]["mean"] == pytest.approx(list(mean))
    x = images(5, tuple(data.input_shape))
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), built.net((x - m) / s), rtol=1e-5, atol=1e-6)


def test_resize_inside_the_model_is_the_interpolated_image(tmp_path):
    """zoo.resize=true: 32x32 images go through the model's own interpolation (bicubic for this timm model)."""
    import timm

    class CIFAR10:  # what zoo.fit reads of a data module
        name, num_classes, input_shape = "cifar10", 10, (3, 32, 32)

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    save(net.state_dict(), tmp_path / "w.safetensors")
    settings = zoo.ZooSettings(dir=tmp_path, resize=True)
    described = zoo.describe(zoo.parse(f"timm:resnet10t@{tmp_path / 'w.safetensors'}"), settings)
    data = CIFAR10()
    record = zoo.fit(described, data, settings, "h_ckpt")
    model = zoo.load(record)
    size, interp = net.pretrained_cfg["input_size"][-1], net.pretrained_cfg["interpolation"]
    assert record["model"]["input_shape"] == [3, 32, 32] and record["source"]["resized"] == [3, size, size]
    mean, std = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = images(2)
    expected = net((F.interpolate(x, size=(size, size), mode=interp, align_corners=False) - mean) / std)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-4)  # normalize and resize commute up to rounding
    with pytest.raises(ConfigError, match=rf"takes 3x{size}x{size} images but data=cifar10 has 3x32x32: set zoo.resize=true"):
        zoo.fit(described, data, zoo.ZooSettings(dir=tmp_path), "h_ckpt")


# ---------------------------------------------------------------- clear messages, before any work


def refused(exc_type, pattern: str, spec: str, zoo_dir: Path, data=None):
    with pytest.raises(exc_type, match=pattern) as info:
        zoo.describe(zoo.parse(spec), zoo.ZooSettings(dir=zoo_dir), data)
    assert "\n" not in str(info.value)  # one message
    return str(info.value)


def test_missing_file_names_the_exact_path(tmp_path):
    message = refused(ConfigError, "no weights file at", "robustbench:cifar10/Linf/Wong2020Fast", tmp_path)
    assert str(tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt") in message and "zoo.download=true" in message
    message = refused(ConfigError, "no weights file at", "timm:resnet10t", tmp_path)
    assert str(tmp_path / "timm" / "resnet10t.safetensors") in message
    refused(ConfigError, r"the weights file .*nope.pt does not exist", f"torchvision:resnet18@{tmp_path / 'nope.pt'}",
            tmp_path)


def test_corrupt_and_truncated_files_are_refused(tmp_path):
    net = robustbench_net("cifar10/Linf/Wong2020Fast")
    path = save(net.state_dict(), tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(CheckpointError, "truncated or corrupt", "robustbench:cifar10/Linf/Wong2020Fast", tmp_path)
    bad = tmp_path / "timm" / "resnet10t.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(CheckpointError, "not a readable safetensors file", "timm:resnet10t", tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(CheckpointError, "is empty", f"torchvision:resnet18@{tmp_path / 'empty.pt'}", tmp_path)


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    state = robustbench_net("cifar10/Linf/Wong2020Fast").state_dict()
    save({"state_dict": state, "extra": Payload(str(marker))}, tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt")
    refused(CheckpointError, "pickled Python objects that are not plain data.*never unpickles code",
            "robustbench:cifar10/Linf/Wong2020Fast", tmp_path)
    assert not marker.exists()


def test_weights_of_another_network_or_class_count_are_refused(tmp_path):
    wrn = robustbench_net("cifar10/Linf/Standard").state_dict()
    save(wrn, tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt")  # a WideResNet's weights under a PreAct entry
    refused(CheckpointError, r"do not fit its network: \d+ missing and \d+ unexpected weight names",
            "robustbench:cifar10/Linf/Wong2020Fast", tmp_path)
    preact = robustbench_net("cifar10/Linf/Wong2020Fast").state_dict()
    preact["linear.weight"], preact["linear.bias"] = torch.zeros(100, 512), torch.zeros(100)  # a CIFAR-100 head
    save(preact, tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt")
    refused(CheckpointError, r"weights of the wrong shape, e.g. linear.weight: \[100, 512\] in the file, \[10, 512\]",
            "robustbench:cifar10/Linf/Wong2020Fast", tmp_path)


def test_unknown_names_list_what_exists(tmp_path):
    refused(ConfigError, "no cifar10/Linf entry 'Wong2020Fats' .did you mean Wong2020Fast",
            "robustbench:cifar10/Linf/Wong2020Fats", tmp_path)
    refused(ConfigError, "no cifar10 threat model 'linf'; it has L2, Linf", "robustbench:cifar10/linf/Standard",
            tmp_path)
    refused(ConfigError, "no data set 'cifar11'", "robustbench:cifar11/Linf/Standard", tmp_path)
    refused(ConfigError, "write robustbench:<dataset>/<threat model>/<entry>", "robustbench:Standard", tmp_path)
    refused(ConfigError, "timm has no model 'resnet_nope'", "timm:resnet_nope", tmp_path)
    refused(ConfigError, "torchvision has no classification model 'resnet_nope'", "torchvision:resnet_nope", tmp_path)
    refused(ConfigError, "no registered architecture 'small_cnx'", f"arch:small_cnx@{tmp_path / 'x.pt'}", tmp_path)
    with pytest.raises(ConfigError, match="unknown model source kind 'robustbnch'.*one of robustbench, timm"):
        zoo.parse("robustbnch:cifar10/Linf/Standard")
    assert zoo.parse("outputs/train/run/checkpoints/best.ckpt") is None  # a checkpoint path


def test_arch_source_needs_the_data_set(tmp_path):
    save(create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.5]).net.state_dict(), tmp_path / "arch" / "small_cnn.pt")
    refused(ConfigError, "take their class count, image shape and normalization from the data set.*data=<name>",
            "arch:small_cnn", tmp_path)


def test_imagenet_models_need_imagenet_class_order(tmp_path):
    """A 1000-class source's output k is synset k: data folders in another order are refused."""
    from timm.data import ImageNetInfo

    class Folders:
        name, num_classes, input_shape = "imagefolder", 1000, (3, 224, 224)

        def __init__(self, names):
            self.class_names = names

    record = {"model": {"num_classes": 1000, "input_shape": [3, 224, 224], "kwargs": {}}, "data": "imagenet",
              "source": {"spec": "torchvision:resnet18", "kind": "torchvision"}}
    synsets = list(ImageNetInfo().label_names())
    assert zoo.fit(record, Folders(synsets), zoo.ZooSettings(dir=tmp_path), "g_ckpt")["model"]["input_shape"] == \
        [3, 224, 224]
    shuffled = synsets[1:] + synsets[:1]
    with pytest.raises(ConfigError, match="is an ImageNet model, whose output k is ImageNet synset k.*'n01443537' at "
                                          "position 0"):
        zoo.fit(record, Folders(shuffled), zoo.ZooSettings(dir=tmp_path), "g_ckpt")


def test_robustbench_files_overwritten_by_torchattacks_are_detected(tmp_path, monkeypatch):
    """torchattacks installed after robustbench overwrites robustbench's files with its old copy: the RECORD's hash
    no longer matches, and the message says how to repair it."""
    import importlib.metadata

    from mixrobust.models import zoo as zoo_models

    real = importlib.metadata.distribution("robustbench")
    assert zoo_models._intact(real, "robustbench/model_zoo/cifar10.py")  # this environment's install is intact
    info = tmp_path / "robustbench-1.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Name: robustbench\nVersion: 1.1.1\n")
    (tmp_path / "robustbench" / "model_zoo").mkdir(parents=True)
    (tmp_path / "robustbench" / "model_zoo" / "cifar10.py").write_text("# torchattacks' old copy\n")
    (info / "RECORD").write_text("robustbench/model_zoo/cifar10.py,sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,"
                                 "30\n")
    fake = importlib.metadata.PathDistribution(info)
    assert not zoo_models._intact(fake, "robustbench/model_zoo/cifar10.py")
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake)
    with pytest.raises(ConfigError, match="not the ones it installed .torchattacks.*pip install --force-reinstall"):
        zoo_models.robustbench_zoo()


# ---------------------------------------------------------------- through evaluate.py's settings and end to end


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    """A zoo folder with random-weight RobustBench CIFAR-10 entries: a ResNet-18 (g) and two PreAct ResNet-18s (h)."""
    root = tmp_path_factory.mktemp("zoo")
    for name in ("cifar10/Linf/Sehwag2021Proxy_R18", "cifar10/Linf/Wong2020Fast",
                 "cifar10/Linf/Andriushchenko2020Understanding"):
        save(robustbench_net(name).state_dict(), root / f"{name}.pt")
    return root


def mix_cfg(tmp_path: Path, zoo_dir: Path, *overrides: str):
    return compose_config("evaluate", [f"zoo.dir={zoo_dir}", f"data_root={real_data_root()}", *overrides],
                          tmp_path / "run")


def test_settings_check_class_counts_and_data_before_any_attack(tmp_path, zoo_dir):
    from mixrobust.pipelines import mix

    save(create_model("small_cnn", 10, (1, 8, 8), [0.5], [0.5]).net.state_dict(), zoo_dir / "arch" / "small_cnn.pt")
    g = "g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18"
    with pytest.raises(CheckpointError, match=r"h_ckpt: arch:small_cnn: the weights in .*small_cnn.pt do not fit "
                                              r"small_cnn with 10 classes and \[3, 32, 32\] images \(cifar10\)"):
        mix.settings(mix_cfg(tmp_path, zoo_dir, g, "h_ckpt=arch:small_cnn", "data=cifar10"))
    with pytest.raises(ConfigError, match="g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18 was trained on "
                                          "cifar10 but data=digits"):
        mix.settings(mix_cfg(tmp_path, zoo_dir, g, "h_ckpt=arch:small_cnn", "data=digits"))
    timm = pytest.importorskip("timm")
    save(timm.create_model("resnet10t", num_classes=100).state_dict(), zoo_dir / "timm" / "resnet10t.safetensors")
    with pytest.raises(ConfigError, match="g_ckpt has 10 classes but h_ckpt has 100"):
        mix.settings(mix_cfg(tmp_path, zoo_dir, g, "h_ckpt=timm:resnet10t"))
    with pytest.raises(ConfigError, match="h_ckpt: robustbench:cifar10/Linf/Carmon2019Unlabeled: no weights file"):
        mix.settings(mix_cfg(tmp_path, zoo_dir, g, "h_ckpt=robustbench:cifar10/Linf/Carmon2019Unlabeled"))


def test_presets_take_zoo_sources(tmp_path, zoo_dir):
    """experiment=zoo_cifar10_mix names RobustBench models (a missing one: the path to put it at); the paper presets
    take zoo sources for g and h."""
    from mixrobust.pipelines import mix

    with pytest.raises(ConfigError, match=r"g_ckpt: robustbench:cifar10/Linf/Standard: no weights file at "
                                          + str(zoo_dir / "cifar10" / "Linf" / "Standard.pt")):
        mix.settings(mix_cfg(tmp_path, zoo_dir, "experiment=zoo_cifar10_mix"))
    ours = ["g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18", "h_ckpt=robustbench:cifar10/Linf/Wong2020Fast"]
    for preset in ("zoo_cifar10_mix", "paper_fig2", "paper_fig1", "paper_table1"):
        s = mix.settings(mix_cfg(tmp_path, zoo_dir, f"experiment={preset}", *ours))
        assert s.data.name == "cifar10" and s.g.source["name"] == "cifar10/Linf/Sehwag2021Proxy_R18"


def test_threat_model_mismatch_warns(tmp_path, zoo_dir, caplog):
    from mixrobust.pipelines import mix

    s = mix.settings(mix_cfg(tmp_path, zoo_dir, "g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18",
                             "h_ckpt=robustbench:cifar10/Linf/Wong2020Fast", "threat=l2"))
    assert "h_ckpt was trained against linf eps=0.0313725 but is evaluated at l2 eps=0.5" in caplog.text
    assert s.h.identity["kind"] == "robustbench" and "file" not in s.h.identity  # fingerprints do not see the folder


def evaluate(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.real_data
def test_robustbench_g_and_h_sweep_then_a_multirun_over_h_reuses_g_and_resumes(tmp_path, zoo_dir):
    """evaluate.py with RobustBench g and h (random weights, 24 CIFAR-10 test images, PGD-5), offline: results
    rows name both models; a 2-job multirun over h reads g's clean outputs and STD images from the cache, and its
    rerun skips both jobs."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    env = {**os.environ, "PYTHONPATH": f"{guard}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MIXROBUST_ZOO_DIR": str(zoo_dir), "MIXROBUST_CACHE_DIR": str(tmp_path / "cache"),
           "MIXROBUST_DATA_ROOT": str(real_data_root()), "OMP_NUM_THREADS": "2"}
    common = ["g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18", "n=24", "attack.steps=5", "adaptive.steps=3",
              "mix.alphas=[0,0.5,1]", "progress.mode=none"]
    run = tmp_path / "single"
    evaluate(tmp_path, env, *common, "h_ckpt=robustbench:cifar10/Linf/Wong2020Fast", f"hydra.run.dir={run}")
    rows = json.loads((run / "results.json").read_text())
    assert {r["h_model"].split(" ")[0] for r in rows} == {"robustbench:cifar10/Linf/Wong2020Fast"}
    assert {r["g_model"].split(" ")[0] for r in rows} == {"robustbench:cifar10/Linf/Sehwag2021Proxy_R18"}
    marker = json.loads((run / "run.json").read_text())
    assert marker["h_record"]["source"]["kind"] == "robustbench" and marker["cache"]["misses"] == 6

    sweep = tmp_path / "sweep"
    hs = "h_ckpt=robustbench:cifar10/Linf/Wong2020Fast,robustbench:cifar10/Linf/Andriushchenko2020Understanding"
    evaluate(tmp_path, env, "-m", *common, hs, f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.name[0].isdigit())
    caches = [json.loads((job / "run.json").read_text())["cache"] for job in jobs]
    assert caches[0] == {"dir": str(tmp_path / "cache"), "hits": 6, "misses": 0}  # the single run's job again
    assert caches[1]["hits"] == 3 and caches[1]["misses"] == 3  # g: clean outputs, STD and APGD images; h: new
    again = evaluate(tmp_path, env, "-m", *common, hs, f"hydra.sweep.dir={sweep}")
    assert (again.stdout + again.stderr).count("already holds this run's results: skipped") == 2


# ---------------------------------------------------------------- fine-tuning from a zoo model (train.py init_from)


def test_init_from_starts_training_from_the_file(tmp_path):
    """init_from=arch:small_cnn: the trained model starts as the file's network, trainable; a class count other than
    the data's is refused before training."""
    from mixrobust.checkpoint import load_classifier
    from mixrobust.pipelines import train

    data = digits_data()
    torch.manual_seed(1)
    built = create_model("small_cnn", 10, data.input_shape, data.mean, data.std)
    save(built.net.state_dict(), tmp_path / "zoo" / "arch" / "small_cnn.safetensors")
    fast = [f"zoo.dir={tmp_path / 'zoo'}", "init_from=arch:small_cnn", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "logger=none"]
    s = train.settings(compose_config("train", fast, tmp_path / "run"))
    assert s.model.training and all(p.requires_grad for p in s.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(s.model.net.state_dict().values(), built.net.state_dict().values()))
    result = train.run(compose_config("train", fast, tmp_path / "run"))
    record = load_classifier(result.best_checkpoint).record
    assert record["model"]["arch"] == "small_cnn"
    assert record["split"] is None  # the starting weights may have trained on any image: a map fit cannot trust it

    save(create_model("small_cnn", 7, data.input_shape, data.mean, data.std).net.state_dict(),
         tmp_path / "seven.safetensors")
    with pytest.raises(CheckpointError, match="do not fit small_cnn with 10 classes"):
        train.settings(compose_config("train", [*fast, f"init_from=arch:small_cnn@{tmp_path / 'seven.safetensors'}"],
                                      tmp_path / "run7"))


@pytest.mark.real_data
def test_fine_tuned_robustbench_model_checkpoint_rebuilds_without_its_file(tmp_path, zoo_dir):
    """Fine-tuning robustbench:cifar10/Linf/Wong2020Fast writes a checkpoint whose record (arch zoo, the source's
    architecture) rebuilds the network without the zoo file: load_classifier, as for any mixrobust checkpoint."""
    from mixrobust.checkpoint import load_classifier
    from mixrobust.pipelines import train

    cfg = compose_config("train", [
        "data=cifar10", f"data_root={real_data_root()}", f"zoo.dir={zoo_dir}", "init_from=robustbench:cifar10/Linf/Wong2020Fast",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "data.batch_size=8", "data.eval_batch_size=8", "trainer.enable_progress_bar=false",
        "logger=none"], tmp_path / "run")
    result = train.run(cfg)
    model = load_classifier(result.best_checkpoint)
    spec = model.record["model"]
    assert spec["arch"] == "zoo" and spec["kwargs"]["source"] == "robustbench:cifar10/Linf/Wong2020Fast"
    x = images(3)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all() and model(x).shape == (3, 10)


@pytest.mark.real_data
def test_certify_takes_zoo_sources_and_asks_for_their_noise_level(tmp_path, zoo_dir):
    """certify.baseline_ckpt and h take zoo sources; a zoo model records no sigma, so certify.sigma is asked for."""
    from mixrobust.pipelines import certify

    models = ["task=certify", "g_ckpt=robustbench:cifar10/Linf/Sehwag2021Proxy_R18",
              "h_ckpt=robustbench:cifar10/Linf/Wong2020Fast",
              "certify.baseline_ckpt=robustbench:cifar10/Linf/Andriushchenko2020Understanding"]
    with pytest.raises(ConfigError, match="h_ckpt's checkpoint records no noise level sigma; set certify.sigma="):
        certify.settings(mix_cfg(tmp_path, zoo_dir, *models))
    s = certify.settings(mix_cfg(tmp_path, zoo_dir, *models, "certify.sigma=0.25", "certify.baseline_sigma=0.25"))
    assert s.baseline.source["name"] == "cifar10/Linf/Andriushchenko2020Understanding" and s.data.name == "cifar10"
