"""Feature extractors for WS-DAN (paper §3.1, "backbone features" F = backbone(x)).

A :class:`Backbone` takes images in [0, 1] (B×3×H×W, *not* normalised), normalises them the way
its weights expect and returns the feature map B×C×h×w of one named layer. Builders are
registered by name (timm style) and made with :func:`build_backbone`.

Registered backbones (C = ``out_channels``; h×w at 448 px input, as in the paper):

=======================  =========================================  =====  ===========
name                     cut                                        C      h×w @ 448
=======================  =========================================  =====  ===========
inception_v3             after ``Mixed_6e`` (paper setting, default)  768   26×26
inception_v3_mixed7c     after ``Mixed_7c`` (paper: Stanford Dogs)   2048   12×12
resnet18 / resnet34      after ``layer4``                            512   14×14
resnet18_layer3          after ``layer3`` (small CPU images)         256   28×28
resnet50/101/152         after ``layer4``                           2048   14×14
vgg16 / vgg19 (+ _bn)    last conv block, *before* the final pool    512   28×28
mobilenet_v3_small       ``features`` (last 1×1 conv + hardswish)    576   14×14
=======================  =========================================  =====  ===========

VGG: we drop the last max-pool (``features[:-1]``), as the public WS-DAN codes do. The
pool would halve the attention maps' resolution (14×14 instead of 28×28 at 448 px) and add
nothing to bilinear attention pooling, which averages over space anyway; stride 16 also
matches Inception's ``Mixed_6e`` (26×26), the resolution the paper's crop thresholds were
chosen for.

Weights. The extractor keeps torchvision's sub-module names, so a torchvision *full-model*
state dict maps onto it key for key; loading is strict and lives in :mod:`wsdan.weights`
(:func:`load_backbone_weights`, re-exported here with :class:`WeightsError` and
:class:`LoadReport`).

Normalisation. ResNet, VGG and MobileNet weights from torchvision expect ImageNet
mean/std. torchvision's Inception-v3 weights (converted from Google's TensorFlow model) are
used with ``transform_input=True``, which maps ImageNet-normalised input to (x − 0.5) / 0.5;
so our Inception backbone normalises [0, 1] input with mean = std = 0.5 directly. That is
right for torchvision's Inception weights and for any weights converted from TF-slim
Inception (all expect [−1, 1] input). It is wrong for Inception weights trained with ImageNet
normalisation and ``transform_input=False`` (e.g. timm's ``inception_v3.gluon_in1k``): call
:meth:`Backbone.set_normalization` with ImageNet mean/std for those. (The reference PyTorch
WS-DAN builds Inception's features without ``transform_input`` and feeds ImageNet-normalised
input: wrongly scaled by ~2×, docs/algorithm.md §1.1.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from wsdan.weights import LoadReport, WeightsError, hub_cache_path, load_backbone_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "Backbone",
    "LoadReport",
    "WeightsError",
    "build_backbone",
    "list_backbones",
    "load_backbone_weights",
    "pretrained_cache_path",
    "register_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision/TF Inception-v3 weights expect input in [-1, 1] (transform_input=True).
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class Backbone(nn.Module):
    """Normalise [0, 1] images, run torchvision layers up to a cut, return the feature map.

    Children are torchvision's own modules under torchvision's names (``conv1``, ``layer1``,
    ``Mixed_6e``, ``features``...), run in order; ``state_dict()`` keys are therefore the
    torchvision keys of the layers used. ``mean`` / ``std`` are non-persistent buffers: they
    follow ``.to(device)`` but are not part of checkpoints (they belong to the architecture,
    not to training).
    """

    name: str
    out_channels: int
    weights_arch: str  # torchvision architecture whose weights fit, e.g. "resnet18"
    layer_names: tuple[str, ...]
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        *,
        name: str,
        out_channels: int,
        weights_arch: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.name = name
        self.out_channels = out_channels
        self.weights_arch = weights_arch
        self.layer_names = tuple(layer_name for layer_name, _ in layers)
        for layer_name, module in layers:
            self.add_module(layer_name, module)
        self.register_buffer("mean", torch.zeros(3), persistent=False)
        self.register_buffer("std", torch.ones(3), persistent=False)
        self.set_normalization(mean, std)

    @torch.no_grad()
    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the per-channel mean/std applied to [0, 1] input (3 values each)."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(3)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(3)
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.mean.copy_(mean_t)
        self.std.copy_(std_t)

    def forward(self, x: Tensor) -> Tensor:
        """x: B×3×H×W in [0, 1] -> features B×C×h×w (C = ``out_channels``)."""
        mean = self.mean.to(x.dtype).view(1, 3, 1, 1)
        std = self.std.to(x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std  # B×3×H×W, normalised as the weights expect
        for layer_name in self.layer_names:
            x = self._modules[layer_name](x)
        return x  # B×C×h×w

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}"


# --------------------------------------------------------------------------- registry

BackboneBuilder = Callable[[], Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: register a builder ``fn() -> Backbone`` (random weights) under ``name``."""

    def decorator(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, *, pretrained: bool = False, weights: str | None = None) -> Backbone:
    """Build a registered backbone.

    pretrained: load torchvision's default ImageNet weights for the architecture, from the
        local torch hub cache only (``pretrained_cache_path(name)``); never downloads.
    weights: a local path or ``s3://`` URI of a state dict (see :func:`load_backbone_weights`).
    Neither: random initialisation (torchvision's scheme; seed with ``torch.manual_seed``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    if pretrained and weights is not None:
        raise ValueError("give either pretrained=True or weights=PATH_OR_URI, not both")
    backbone = _REGISTRY[name]()
    if pretrained:
        path = pretrained_cache_path(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained weights for backbone {name!r} not found at {path} (torch hub cache, "
                f"set by TORCH_HOME); this project never downloads weights: copy the file there, "
                f"or pass weights=PATH (a local path or s3:// URI of a state dict)"
            )
        load_backbone_weights(backbone, path)
    elif weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone


def pretrained_cache_path(name: str) -> str:
    """Where torch hub would cache torchvision's default weights for backbone ``name``:
    ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    arch = _WEIGHTS_ARCH.get(name)
    if arch is None:  # registered elsewhere with register_backbone: build it to ask
        arch = _REGISTRY[name]().weights_arch
    return hub_cache_path(arch)


# --------------------------------------------------------------------------- builders

# Backbone name -> torchvision architecture whose weights it takes (for pretrained_cache_path
# without building the network).
_WEIGHTS_ARCH: dict[str, str] = {}


def _register(name: str, weights_arch: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    _WEIGHTS_ARCH[name] = weights_arch
    return register_backbone(name)


# Shape comments: unpadded stride-2 convs and pools make the sizes slightly smaller than
# H/2, H/4...: 448 px -> 26×26 after Mixed_6e, 299 px -> 17×17, 128 px -> 6×6.
_INCEPTION_STEM = (
    "Conv2d_1a_3x3",  # B×32×(H/2)
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",  # B×64×(H/4)
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",  # B×192×(H/8)
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",  # B×288×(H/8)
    "Mixed_6a",  # B×768×(H/16)
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",  # B×768×(H/16)
)
_INCEPTION_7 = ("Mixed_7a", "Mixed_7b", "Mixed_7c")  # B×2048×(H/32)


def _inception(name: str, layer_names: Sequence[str], out_channels: int) -> Backbone:
    # aux_logits=False: the auxiliary head is never used here. init_weights=True is
    # torchvision's truncated-normal scheme (and silences its FutureWarning).
    net = tvm.inception_v3(weights=None, aux_logits=False, init_weights=True)
    return Backbone(
        [(n, getattr(net, n)) for n in layer_names],
        name=name,
        out_channels=out_channels,
        weights_arch="inception_v3",
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
    )


@_register("inception_v3", "inception_v3")
def inception_v3() -> Backbone:
    """Inception-v3 cut after Mixed_6e: C=768, stride ~16 (26×26 at 448 px). Paper setting."""
    return _inception("inception_v3", _INCEPTION_STEM, 768)


@_register("inception_v3_mixed7c", "inception_v3")
def inception_v3_mixed7c() -> Backbone:
    """Inception-v3 cut after Mixed_7c: C=2048, stride ~32 (12×12 at 448 px)."""
    return _inception("inception_v3_mixed7c", _INCEPTION_STEM + _INCEPTION_7, 2048)


_RESNET_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet(name: str, arch: str, last: str, out_channels: int) -> Backbone:
    net = getattr(tvm, arch)(weights=None)
    layer_names = _RESNET_LAYERS[: _RESNET_LAYERS.index(last) + 1]
    return Backbone(
        [(n, getattr(net, n)) for n in layer_names],
        name=name,
        out_channels=out_channels,
        weights_arch=arch,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


@_register("resnet18", "resnet18")
def resnet18() -> Backbone:
    """ResNet-18 after layer4: C=512, stride 32."""
    return _resnet("resnet18", "resnet18", "layer4", 512)


@_register("resnet18_layer3", "resnet18")
def resnet18_layer3() -> Backbone:
    """ResNet-18 after layer3: C=256, stride 16 (8×8 maps at 128 px, for CPU tests)."""
    return _resnet("resnet18_layer3", "resnet18", "layer3", 256)


@_register("resnet34", "resnet34")
def resnet34() -> Backbone:
    """ResNet-34 after layer4: C=512, stride 32."""
    return _resnet("resnet34", "resnet34", "layer4", 512)


@_register("resnet50", "resnet50")
def resnet50() -> Backbone:
    """ResNet-50 after layer4: C=2048, stride 32."""
    return _resnet("resnet50", "resnet50", "layer4", 2048)


@_register("resnet101", "resnet101")
def resnet101() -> Backbone:
    """ResNet-101 after layer4: C=2048, stride 32."""
    return _resnet("resnet101", "resnet101", "layer4", 2048)


@_register("resnet152", "resnet152")
def resnet152() -> Backbone:
    """ResNet-152 after layer4: C=2048, stride 32."""
    return _resnet("resnet152", "resnet152", "layer4", 2048)


def _vgg(name: str, cfg: str, batch_norm: bool) -> Backbone:
    # Only the conv part is built: the full VGG's classifier (~120M parameters) would be
    # allocated and initialised just to be thrown away. Init copied from torchvision's VGG.
    features = tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # Drop the final max-pool (see module docstring); slicing keeps the indices as names, so
    # torchvision's "features.N.*" keys still fit.
    assert isinstance(features[-1], nn.MaxPool2d)
    return Backbone(
        [("features", features[:-1])],
        name=name,
        out_channels=512,
        weights_arch=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


@_register("vgg16", "vgg16")
def vgg16() -> Backbone:
    """VGG-16 conv5_3 + ReLU, before the last pool: C=512, stride 16."""
    return _vgg("vgg16", "D", batch_norm=False)


@_register("vgg19", "vgg19")
def vgg19() -> Backbone:
    """VGG-19 conv5_4 + ReLU, before the last pool: C=512, stride 16."""
    return _vgg("vgg19", "E", batch_norm=False)


@_register("vgg16_bn", "vgg16_bn")
def vgg16_bn() -> Backbone:
    """VGG-16-BN conv5_3 + BN + ReLU, before the last pool: C=512, stride 16."""
    return _vgg("vgg16_bn", "D", batch_norm=True)


@_register("vgg19_bn", "vgg19_bn")
def vgg19_bn() -> Backbone:
    """VGG-19-BN conv5_4 + BN + ReLU, before the last pool: C=512, stride 16."""
    return _vgg("vgg19_bn", "E", batch_norm=True)


@_register("mobilenet_v3_small", "mobilenet_v3_small")
def mobilenet_v3_small() -> Backbone:
    """MobileNet-V3-small ``features`` (ends in a 1×1 conv to 576 + hardswish): stride 32."""
    net = tvm.mobilenet_v3_small(weights=None)
    return Backbone(
        [("features", net.features)],
        name="mobilenet_v3_small",
        out_channels=576,
        weights_arch="mobilenet_v3_small",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
