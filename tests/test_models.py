"""Architectures: every registered model is checked for the classifier contract; the well-known
ones also for their exact parameter counts (published values and a by-hand layer count)."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mixrobust.errors import CheckpointError, ConfigError
from mixrobust.models import ImageClassifier, Normalize, available_models, create_model
from mixrobust.models.imagenet import TORCHVISION_MODELS, ResizedBackbone
from mixrobust.models.resnet import cifar_resnet
from mixrobust.models.wrn import wide_resnet

ARCHS = available_models()
K = 7  # not 10, so a hard-wired class count shows up
CIFAR_SHAPE = (3, 32, 32)
# Keep torchvision models cheap: a 64x64 resize of 32x32 inputs (still exercises the resize layer).
TEST_KWARGS = {name: {"resize": 64} for name in TORCHVISION_MODELS}
# The zoo architecture (other libraries' networks, mixrobust.models.zoo): torchvision's ResNet-18 resized to 64x64.
TEST_KWARGS["zoo"] = {"source": "torchvision:resnet18", "native_size": 64}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Many small convolutions: one intra-op thread is faster here, and robust to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(arch: str, num_classes: int = K, shape=CIFAR_SHAPE, mean: float = 0.5, std: float = 0.25, **kwargs):
    kwargs = {**TEST_KWARGS.get(arch, {}), **kwargs}
    c = shape[0]
    return create_model(arch, num_classes, shape, [mean] * c, [std] * c, **kwargs)


def _dyadic_images(n: int, shape=CIFAR_SHAPE, seed: int = 0) -> torch.Tensor:
    """Images in [0,1] on the grid k/256, so shifts by 1/4 are exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (n, *shape), generator=gen).float() / 256


def _rebuild(spec: dict) -> ImageClassifier:
    spec = json.loads(json.dumps(spec))  # a checkpoint stores plain data
    return create_model(
        spec["arch"], spec["num_classes"], spec["input_shape"], spec["mean"], spec["std"], **spec["kwargs"]
    )


# ---------------------------------------------------------------- the contract, for every model


@pytest.fixture(scope="module", params=ARCHS)
def model(request) -> ImageClassifier:
    """Each registered model once per module (mean 0.5, std 0.25, K classes), in eval mode; read-only."""
    torch.manual_seed(0)
    return _build(request.param, mean=0.5, std=0.25).eval()


def test_output_shape_and_dtype(model):
    with torch.no_grad():
        out = model(_dyadic_images(2))
    assert out.shape == (2, K)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert model.num_classes == K and model.input_shape == CIFAR_SHAPE


def test_normalization_is_the_first_layer(model):
    assert isinstance(next(iter(model.children())), Normalize)
    x = _dyadic_images(2)
    with torch.no_grad():
        out = model(x)
        # nothing precedes the normalization: the bare net on (x - mean) / std gives the same logits
        assert torch.equal(out, model.net((x - 0.5) / 0.25))
        # raising the mean by d is exactly feeding x - d (all numbers are dyadic, so no rounding)
        shifted = ImageClassifier(Normalize([0.75] * 3, [0.25] * 3), model.net, model.spec).eval()
        assert torch.equal(shifted(x), model(x - 0.25))
        assert not torch.equal(shifted(x), out)


def test_eval_mode_is_deterministic_and_per_sample(model):
    x = _dyadic_images(2)
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(first, second)
    # eval-mode BatchNorm uses running statistics: a sample's logits ignore the rest of the batch
    torch.testing.assert_close(alone, first[:1], rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_input(model):
    x = _dyadic_images(2).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_through_spec(arch):
    torch.manual_seed(0)
    model = _build(arch)
    with torch.no_grad():
        model.train()(_dyadic_images(4, seed=1))  # move BatchNorm statistics off their initial values
    model.eval()
    torch.manual_seed(1)  # the copy starts from different random weights
    copy = _rebuild(model.spec)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    x = _dyadic_images(2)
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
    assert copy.spec == model.spec


# ---------------------------------------------------------------- parameter counts


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k


def _bn(c: int) -> int:
    return 2 * c


def _fc(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def _count_post_act_resnet(c: int, widths, depths, k: int) -> int:
    """By hand: stem conv+BN; per block 2x(3x3 conv + BN), plus 1x1 conv + BN where the shape changes."""
    total, ch = _conv(c, widths[0], 3) + _bn(widths[0]), widths[0]
    for stage, (w, d) in enumerate(zip(widths, depths)):
        for j in range(d):
            total += 2 * _bn(w) + _conv(ch, w, 3) + _conv(w, w, 3)
            if ch != w or (stage > 0 and j == 0):
                total += _conv(ch, w, 1) + _bn(w)
            ch = w
    return total + _fc(ch, k)


def _count_preact(c: int, widths, depths, k: int, stem: int) -> int:
    """By hand: stem conv; per block BN(in) + 3x3 conv + BN(out) + 3x3 conv [+ 1x1 conv]; final BN."""
    total, ch = _conv(c, stem, 3), stem
    for stage, (w, d) in enumerate(zip(widths, depths)):
        for j in range(d):
            total += _bn(ch) + _conv(ch, w, 3) + _bn(w) + _conv(w, w, 3)
            if ch != w or (stage > 0 and j == 0):
                total += _conv(ch, w, 1)
            ch = w
    return total + _bn(ch) + _fc(ch, k)


def _num_params(arch: str, num_classes: int, channels: int = 3, **kwargs) -> int:
    with torch.device("meta"):  # no memory, no initialization cost
        model = _build(arch, num_classes, (channels, 32, 32), **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "published", "by_hand"),
    [
        # kuangliu/pytorch-cifar ResNet-18, the AT literature's "ResNet-18": 11,173,962
        ("resnet18", 11_173_962, _count_post_act_resnet(3, (64, 128, 256, 512), (2, 2, 2, 2), 10)),
        ("preact_resnet18", None, _count_preact(3, (64, 128, 256, 512), (2, 2, 2, 2), 10, stem=64)),
        # Zagoruyko & Komodakis report 36.5M for WRN-28-10; TRADES' WRN-34-10 has 46.2M (without its unused block)
        ("wrn_28_10", 36_479_194, _count_preact(3, (160, 320, 640), (4, 4, 4), 10, stem=16)),
        ("wrn_34_10", 46_160_474, _count_preact(3, (160, 320, 640), (5, 5, 5), 10, stem=16)),
        # Cohen et al.'s ResNet-110 (projection shortcuts): 1.7M
        ("resnet110", 1_730_714, _count_post_act_resnet(3, (16, 32, 64), (18, 18, 18), 10)),
        ("resnet20", None, _count_post_act_resnet(3, (16, 32, 64), (3, 3, 3), 10)),
    ],
)
def test_parameter_counts_cifar(arch, published, by_hand):
    assert _num_params(arch, 10) == by_hand
    if published is not None:
        assert by_hand == published


def test_parameter_counts_follow_channels_and_classes():
    # one input channel removes 2/3 of the stem's weights; each extra class adds a head row
    assert _num_params("resnet18", 10, channels=1) == 11_173_962 - _conv(2, 64, 3)
    assert _num_params("resnet18", 100) == 11_173_962 + 90 * (512 + 1)
    assert _num_params("wrn_34_10", 100) == 46_160_474 + 90 * (640 + 1)


@pytest.mark.parametrize("arch", sorted(TORCHVISION_MODELS))
def test_parameter_counts_torchvision(arch):
    tv_name = TORCHVISION_MODELS[arch].tv_name
    imagenet_count = torchvision.models.get_model_weights(tv_name).DEFAULT.meta["num_params"]  # 1000 classes
    head_in = {"convnext_tiny": 768, "resnet50": 2048, "resnet18_imagenet": 512}[arch]
    assert _num_params(arch, 10) == imagenet_count - (1000 - 10) * (head_in + 1)


# ---------------------------------------------------------------- CIFAR architectures: shapes and options


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "resnet20", "wrn_28_10"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 40, 24)])
def test_cifar_models_take_any_size_and_channel_count(arch, shape):
    model = _build(arch, shape=shape).eval()
    with torch.no_grad():
        assert model(torch.rand(1, *shape)).shape == (1, K)


def test_resnet18_has_no_max_pool():
    model = _build("resnet18").eval()
    seen = {}
    model.net.stages.register_forward_hook(lambda mod, inp, out: seen.update(shape=out.shape))
    with torch.no_grad():
        model(torch.rand(1, *CIFAR_SHAPE))
    assert seen["shape"] == (1, 512, 4, 4)  # 32 / 2^3: only the three stride-2 stages downsample
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_wrn_dropout_acts_in_train_mode_only():
    x = torch.rand(2, *CIFAR_SHAPE)
    torch.manual_seed(0)
    net = wide_resnet(K, CIFAR_SHAPE, depth=10, widen_factor=1, dropout=0.3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.modules()) == 3
    with torch.no_grad():
        assert not torch.equal(net.train()(x), net(x))
        assert torch.equal(net.eval()(x), net(x))
    plain = wide_resnet(K, CIFAR_SHAPE, depth=10, widen_factor=1)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain.train()(x), plain(x))
    assert _build("wrn_28_10", dropout=0.3).spec["kwargs"] == {"dropout": 0.3}


@pytest.mark.parametrize(
    "make",
    [
        lambda: wide_resnet(K, CIFAR_SHAPE, depth=27),
        lambda: wide_resnet(K, CIFAR_SHAPE, depth=28, widen_factor=0),
        lambda: wide_resnet(K, CIFAR_SHAPE, depth=10, dropout=1.0),
        lambda: cifar_resnet(K, CIFAR_SHAPE, depth=18),
        lambda: _build("resnet50", resize=16),
        lambda: _build("convnext_tiny", shape=(2, 32, 32)),
    ],
)
def test_bad_options_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


# ---------------------------------------------------------------- torchvision models: resize and channels


def test_torchvision_input_is_resized_bilinearly_then_fed_to_the_backbone():
    torch.manual_seed(0)
    model = _build("resnet18_imagenet", resize=48).eval()
    assert isinstance(model.net, ResizedBackbone)
    x = torch.rand(2, *CIFAR_SHAPE)
    with torch.no_grad():
        big = F.interpolate((x - 0.5) / 0.25, size=(48, 48), mode="bilinear", align_corners=False, antialias=False)
        assert torch.equal(model(x), model.net.backbone(big))


def test_torchvision_repeats_gray_images_to_rgb():
    torch.manual_seed(0)
    gray = _build("resnet18_imagenet", shape=(1, 28, 28), resize=32).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        rgb = x.repeat(1, 3, 1, 1)  # repeat first, then resize: the same per-channel result
        big = F.interpolate((rgb - 0.5) / 0.25, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        assert torch.equal(gray(x), gray.net.backbone(big))


# ---------------------------------------------------------------- pretrained weights (offline)


def _imagenet_state(tv_name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.get_model(tv_name, weights=None).state_dict()  # 1000-class head


def _assert_backbone_loaded(model: ImageClassifier, state: dict, head: str) -> None:
    loaded = model.net.backbone.state_dict()
    for name, tensor in state.items():
        if name.startswith(head + "."):
            assert loaded[name].shape[0] == K  # the fresh head, not ImageNet's 1000 classes
        else:
            assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("arch", sorted(TORCHVISION_MODELS))
def test_pretrained_local_state_dict(arch, tmp_path):
    spec = TORCHVISION_MODELS[arch]
    state = _imagenet_state(spec.tv_name)
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    model = _build(arch, pretrained=str(path))
    _assert_backbone_loaded(model, state, spec.head)
    assert model.spec["kwargs"]["pretrained"] == str(path)


def test_pretrained_local_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = _imagenet_state("resnet18")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_backbone_loaded(_build("resnet18_imagenet", pretrained=str(path)), state, "fc")


def test_pretrained_files_that_do_not_fit_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _build("resnet18_imagenet", pretrained=str(tmp_path / "missing.pth"))
    wrong_arch = tmp_path / "resnet18.pth"
    torch.save(_imagenet_state("resnet18"), wrong_arch)
    with pytest.raises(CheckpointError, match="missing"):
        _build("resnet50", pretrained=str(wrong_arch))
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        _build("resnet18_imagenet", pretrained=str(not_a_state_dict))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        _build("resnet18_imagenet", pretrained=str(garbage))


def test_pretrained_default_weights_offline_asks_for_a_local_file(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="local weights file path"):
        _build("resnet18_imagenet", pretrained=True)
