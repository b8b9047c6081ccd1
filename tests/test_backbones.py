"""Tests for wsdan.backbones: registry, shapes, gradients, parity with torchvision, loading."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from wsdan import backbones as bb
from wsdan import storage
from wsdan.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    LoadReport,
    WeightsError,
    build_backbone,
    list_backbones,
    load_backbone_weights,
)

# name -> (out_channels, test input size, expected h = w of the features at that size)
EXPECTED = {
    "inception_v3": (768, 96, 4),  # Inception needs >= 75 px
    "inception_v3_mixed7c": (2048, 96, 1),
    "resnet18": (512, 64, 2),
    "resnet18_layer3": (256, 64, 4),
    "resnet34": (512, 64, 2),
    "resnet50": (2048, 64, 2),
    "resnet101": (2048, 64, 2),
    "resnet152": (2048, 64, 2),
    "vgg16": (512, 64, 4),  # stride 16: the last max-pool is dropped
    "vgg19": (512, 64, 4),
    "vgg16_bn": (512, 64, 4),
    "vgg19_bn": (512, 64, 4),
    "mobilenet_v3_small": (576, 64, 2),
}

# Layers of the torchvision full model that each backbone does not use.
UNUSED_LAYERS = {
    "inception_v3": {"AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"},
    "inception_v3_mixed7c": {"AuxLogits", "fc"},
    "resnet18_layer3": {"layer4", "fc"},
    "mobilenet_v3_small": {"classifier"},
    **{n: {"fc"} for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{n: {"classifier"} for n in ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn")},
}


def _torchvision_model(arch: str, **kwargs) -> nn.Module:
    if arch == "inception_v3":
        kwargs = {"aux_logits": True, "init_weights": True, **kwargs}
    return getattr(tvm, arch)(weights=None, **kwargs)


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of one batch (reset, then one
    train-mode pass with momentum=None, a cumulative average), so that eval-mode activations
    have the unit scale of a trained network instead of growing to ~1e3 through a randomly
    initialised Inception."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def test_registry_lists_every_backbone():
    assert set(list_backbones()) == set(EXPECTED)
    assert list_backbones() == sorted(list_backbones())
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match="already registered"):
        bb.register_backbone("resnet18")(bb.resnet18)


# The deepest ResNets: the first forward/backward costs ~1-2 s alone, up to ~20 s on two busy
# shared cores (one-off oneDNN set-up per layer shape); marked slow so a quick local run can
# leave them out with -m "not slow". They still run by default and in CI.
_HEAVY = {"resnet101", "resnet152"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in sorted(EXPECTED)],
)
def test_forward_backward_shapes_and_gradients(name):
    channels, size, feat = EXPECTED[name]
    torch.manual_seed(0)
    backbone = build_backbone(name)
    assert backbone.name == name
    assert backbone.out_channels == channels
    x = torch.rand(2, 3, size, size)

    features = backbone(x)

    assert features.shape == (2, channels, feat, feat)
    assert torch.isfinite(features).all()
    features.square().mean().backward()
    grad = _first_conv(backbone).weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_normalisation_buffers():
    inception = bb.inception_v3()
    resnet = bb.resnet18_layer3()
    assert inception.mean.tolist() == [0.5, 0.5, 0.5]
    assert inception.std.tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(resnet.mean, torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(resnet.std, torch.tensor(IMAGENET_STD))
    # Not persistent: checkpoints carry torchvision keys only.
    assert "mean" not in resnet.state_dict() and "std" not in resnet.state_dict()
    layers = {k.split(".")[0] for k in resnet.state_dict()}
    assert layers == {"conv1", "bn1", "layer1", "layer2", "layer3"}

    # forward applies (x - mean) / std before the layers.
    probe = Backbone(
        [("identity", nn.Identity())],
        name="probe",
        out_channels=3,
        weights_arch="none",
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.25, 2.0),
    )
    x = torch.rand(2, 3, 4, 5)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(probe(x), expected)
    probe.set_normalization(IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(probe.mean, torch.tensor(IMAGENET_MEAN))
    with pytest.raises(ValueError, match="positive"):
        probe.set_normalization((0, 0, 0), (1, 0, 1))


def _imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _hooked_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = getattr(model, layer).register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("out", out)
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured["out"]


# The parity tests run in float64. A randomly initialised Inception amplifies input rounding
# ~2000x (a 1e-7 relative change of the input moves Mixed_6e by ~2e-4), so in float32 the two
# algebraically equal normalisations ((x - m) / s then torchvision's transform_input, versus
# (x - 0.5) / 0.5) differ by ~2e-4 from rounding alone. In float64 they agree to ~1e-12, and
# the 1e-4 tolerance tests the arithmetic, not the rounding.


def test_inception_matches_torchvision_with_transform_input():
    """Our Inception on raw [0, 1] input == torchvision's Inception3(transform_input=True) on
    ImageNet-normalised input, at Mixed_6e: the normalisation the weights expect is kept."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    reference = tvm.inception_v3(
        weights=None, aux_logits=False, transform_input=True, init_weights=True
    ).double()
    x = torch.rand(4, 3, 128, 128, generator=generator, dtype=torch.float64)
    _calibrate_bn(reference, _imagenet_normalise(x))
    ours = build_backbone("inception_v3")
    report = load_backbone_weights(ours, reference.state_dict())
    ours.double().eval()
    assert report.loaded == len(ours.state_dict())
    assert {k.split(".")[0] for k in report.ignored} == {"Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}

    x = torch.rand(2, 3, 128, 128, generator=generator, dtype=torch.float64)  # a new batch
    expected = _hooked_output(reference, "Mixed_6e", _imagenet_normalise(x))
    with torch.no_grad():
        actual = ours(x)

    assert actual.shape == (2, 768, 6, 6)
    assert 0.1 < expected.abs().max() < 100  # a real signal at a sane scale
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    # Negative control: ImageNet normalisation without transform_input (the reference PyTorch
    # WS-DAN's bug) gives different features, so the test above can fail.
    ours.set_normalization(IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        wrong = ours(x)
    assert (wrong - expected).abs().max() > 1.0


@pytest.mark.parametrize(("name", "layer"), [("resnet18", "layer4"), ("resnet18_layer3", "layer3")])
def test_resnet_matches_torchvision(name, layer):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    reference = tvm.resnet18(weights=None, num_classes=7).double()
    x = torch.rand(4, 3, 96, 96, generator=generator, dtype=torch.float64)
    _calibrate_bn(reference, _imagenet_normalise(x))
    ours = build_backbone(name)
    load_backbone_weights(ours, reference.state_dict())
    ours.double().eval()

    x = torch.rand(2, 3, 96, 96, generator=generator, dtype=torch.float64)  # a new batch
    expected = _hooked_output(reference, layer, _imagenet_normalise(x))
    with torch.no_grad():
        actual = ours(x)

    assert 0.1 < expected.abs().max() < 100
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_torchvision_full_state_dict_maps_by_name(name):
    """Every backbone takes its architecture's full torchvision state dict: the layers it uses
    are copied, the others (head, later stages, AuxLogits) are reported as ignored. The
    torchvision model is built on the meta device (no memory, no init); the unused tensors
    stay meta, which also proves they are never touched."""
    torch.manual_seed(0)
    ours = build_backbone(name)
    own = ours.state_dict()
    with torch.device("meta"):
        reference = _torchvision_model(ours.weights_arch)
    state = reference.state_dict()
    assert own.keys() <= state.keys()
    fresh = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in own.items()}
    state.update(fresh)

    report = load_backbone_weights(ours, state)

    assert report.loaded == len(own)
    assert {k.split(".")[0] for k in report.ignored} == UNUSED_LAYERS[name]
    assert len(report.ignored) == len(state) - len(own)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, fresh[key]), key


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(3)
    state = tvm.resnet18(weights=None, num_classes=5).state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    return path, state


def _assert_loaded(backbone: Backbone, state: dict) -> None:
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_round_trip_through_a_file(resnet18_file, caplog):
    path, state = resnet18_file
    backbone = build_backbone("resnet18")
    with caplog.at_level(logging.INFO, logger="wsdan.backbones"):
        report = load_backbone_weights(backbone, str(path))
    assert report == LoadReport(loaded=len(backbone.state_dict()), ignored=["fc.weight", "fc.bias"])
    _assert_loaded(backbone, state)
    # The ignored keys are logged, with the source.
    assert "ignored 2 keys" in caplog.text and "fc (2)" in caplog.text and str(path) in caplog.text

    _assert_loaded(build_backbone("resnet18", weights=str(path)), state)
    _assert_loaded(build_backbone("resnet18_layer3", weights=str(path)), state)


@pytest.mark.parametrize("wrap", ["module", "state_dict", "model", "model+module"])
def test_wrapped_and_prefixed_state_dicts(tmp_path, resnet18_file, wrap):
    _, state = resnet18_file
    obj: dict = state
    if "module" in wrap:
        obj = {f"module.{k}": v for k, v in obj.items()}
    if wrap.startswith("state_dict"):
        obj = {"state_dict": obj, "epoch": 3}
    if wrap.startswith("model"):
        obj = {"model": obj, "optimizer": {"lr": 0.1}}
    path = tmp_path / "wrapped.pt"
    torch.save(obj, path)
    backbone = build_backbone("resnet18")
    report = load_backbone_weights(backbone, path)
    assert report.ignored == ["fc.weight", "fc.bias"]
    _assert_loaded(backbone, state)


def test_missing_key_names_key_and_source(tmp_path, resnet18_file):
    _, state = resnet18_file
    del state["layer2.1.bn2.running_var"]
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="layer2.1.bn2.running_var") as info:
        build_backbone("resnet18", weights=str(path))
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_shape_names_key_and_both_shapes(resnet18_file):
    _, state = resnet18_file
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(bb.resnet18(), state)
    message = str(info.value)
    assert "conv1.weight" in message
    assert "(64, 3, 7, 7)" in message and "(64, 3, 5, 5)" in message


def test_other_architecture_is_refused():
    """ResNet-34 has all of ResNet-18's keys with the same shapes, plus extra blocks inside
    the same layers: a silent load would give a broken network."""
    state = tvm.resnet34(weights=None).state_dict()
    with pytest.raises(WeightsError, match=r"another architecture.*'resnet18'") as info:
        load_backbone_weights(bb.resnet18(), state)
    assert "layer1.2.conv1.weight" in str(info.value)


def test_old_checkpoints_without_num_batches_tracked(resnet18_file):
    _, state = resnet18_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    backbone = bb.resnet18()
    report = load_backbone_weights(backbone, old)
    n_counters = sum(k.endswith("num_batches_tracked") for k in backbone.state_dict())
    assert n_counters == 20
    assert report.loaded == len(backbone.state_dict()) - n_counters
    torch.testing.assert_close(backbone.bn1.running_var, state["bn1.running_var"])


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        build_backbone("resnet18", weights=str(path))


def test_files_that_are_not_state_dicts(tmp_path):
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WeightsError, match="expected a state dict"):
        load_backbone_weights(bb.resnet18_layer3(), listing)
    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)  # a pickled object: refused by weights_only
    with pytest.raises(WeightsError, match="weights_only"):
        load_backbone_weights(bb.resnet18_layer3(), pickled_module)


def test_s3_weights_go_through_storage(monkeypatch, resnet18_file):
    path, state = resnet18_file
    data = path.read_bytes()
    seen = []

    def fake_read_bytes(uri):
        seen.append(uri)
        return data

    monkeypatch.setattr(storage, "read_bytes", fake_read_bytes)
    backbone = build_backbone("resnet18", weights="s3://models/resnet18.pt")
    assert seen == ["s3://models/resnet18.pt"]
    _assert_loaded(backbone, state)


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_pretrained_never_downloads(tmp_path, monkeypatch, no_downloads):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-f37072fd.pth")
    assert bb.pretrained_cache_path("resnet18_layer3") == expected
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet18_layer3", pretrained=True)
    assert expected in str(info.value) and "weights=" in str(info.value)
    assert bb.pretrained_cache_path("inception_v3_mixed7c").endswith(
        "inception_v3_google-0cc3c7bd.pth"
    )


def test_pretrained_from_torch_hub_cache(tmp_path, monkeypatch, no_downloads, resnet18_file):
    _, state = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    _assert_loaded(build_backbone("resnet18", pretrained=True), state)
    with pytest.raises(ValueError, match="not both"):
        build_backbone("resnet18", pretrained=True, weights=str(cached))
