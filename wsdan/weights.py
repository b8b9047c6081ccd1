"""Strict loading of backbone weights (state dicts from files, ``s3://`` URIs or memory).

A :class:`~wsdan.backbones.Backbone` keeps torchvision's sub-module names, so a torchvision
*full-model* state dict (``torchvision.models.resnet50().state_dict()``, ``fc.*`` included)
maps onto it key for key: the prefix rule is the identity, and keys of layers the extractor
does not use (classifier, later stages, ``AuxLogits``) are ignored and reported. Loading is
strict otherwise (see :func:`load_backbone_weights`): the public codes' silent
``load_state_dict`` that drops mismatched weights is a known defect (docs/algorithm.md §7).

Pretrained weights are never downloaded: :func:`hub_cache_path` says where torch hub would
have cached torchvision's default weights for an architecture, and the caller copies the file
there (``wsdan.backbones.pretrained_cache_path`` does it by backbone name).
"""

from __future__ import annotations

import io
import logging
import os
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torchvision.models as tvm
from torch import Tensor

from wsdan import storage

__all__ = [
    "LoadReport",
    "LoadableBackbone",
    "WeightsError",
    "hub_cache_path",
    "load_backbone_weights",
]

# The loader's messages keep the logger name they had while it lived in wsdan.backbones:
# logging configurations (and tests) select them by that name.
logger = logging.getLogger("wsdan.backbones")


class WeightsError(ValueError):
    """Weights that do not fit a backbone (missing key, wrong shape, foreign layer, bad file)."""


class LoadableBackbone(Protocol):
    """What :func:`load_backbone_weights` uses of a backbone. `wsdan.backbones`'s
    ``Backbone`` is one; naming the members here keeps this module free of that one (which
    imports this one)."""

    name: str
    weights_arch: str  # torchvision architecture whose weights fit, e.g. "resnet18"
    layer_names: tuple[str, ...]  # top-level sub-modules used, under torchvision's names

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = ...) -> Any: ...


class LoadReport(NamedTuple):
    """What :func:`load_backbone_weights` did."""

    loaded: int  # tensors copied into the backbone
    ignored: list[str]  # source keys of layers the backbone does not use (e.g. fc.weight)


def hub_cache_path(arch: str) -> str:
    """Where torch hub would cache torchvision's default weights for architecture ``arch``
    (e.g. "resnet18"): ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``."""
    url = tvm.get_model_weights(arch).DEFAULT.url
    file_name = os.path.basename(urllib.parse.urlsplit(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def _read_state_dict(uri: str) -> object:
    if storage.is_remote(uri):
        data = storage.read_bytes(uri)  # FileNotFoundError names the URI
        handle: str | io.BytesIO = io.BytesIO(data)
    else:
        path = os.path.abspath(os.path.expanduser(uri))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        handle = path
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (foreign objects), RuntimeError (corrupt file)...
        raise WeightsError(f"cannot load {uri} with torch.load(weights_only=True): {e}") from e


def _normalise_state_dict(obj: object, source: str) -> dict[str, object]:
    """Unwrap {"state_dict": sd} / {"model": sd} and strip a DataParallel "module." prefix."""
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{source}: expected a state dict (names -> tensors), got {type(obj).__name__}"
        )
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state: dict[str, object] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(f"{source}: state dict key {key!r} is not a string")
        short = key.removeprefix("module.")
        if short in state:
            raise WeightsError(f"{source}: key {short!r} appears with and without 'module.'")
        state[short] = value
    return state


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _summarise_by_layer(keys: Sequence[str]) -> str:
    counts = Counter(key.split(".", 1)[0] for key in keys)
    return ", ".join(f"{layer} ({n})" for layer, n in counts.items())


def load_backbone_weights(
    backbone: LoadableBackbone, source: str | os.PathLike[str] | Mapping[str, object]
) -> LoadReport:
    """Copy weights into ``backbone`` in place, strictly.

    source: a local path or ``s3://`` URI of a file saved with ``torch.save`` (read with
        ``torch.load(weights_only=True)``), or a state dict. A torchvision full-model state
        dict fits as is; it may be wrapped as {"state_dict": ...} or {"model": ...} and its
        keys may carry a "module." prefix.

    Rules (a violation raises :class:`WeightsError`, naming the key and the source):
    every parameter and buffer of the backbone must be in the source with the same shape
    (except BatchNorm ``num_batches_tracked`` counters, absent from old checkpoints, which
    keep their value, as ``nn.BatchNorm2d`` itself does); a source key inside a layer the
    backbone uses but unknown to it (e.g. ``layer1.2.*`` of ResNet-34 offered to ResNet-18)
    means another architecture. Keys of layers the backbone does not use are ignored,
    logged and returned in the report. A missing file raises FileNotFoundError.
    """
    if isinstance(source, Mapping):
        source_name = "<state dict>"
        raw: object = source
    else:
        source_name = os.fspath(source)
        raw = _read_state_dict(source_name)
    state = _normalise_state_dict(raw, source_name)

    own = backbone.state_dict()
    used_layers = set(backbone.layer_names)
    new_state: dict[str, Tensor] = {}
    ignored: list[str] = []
    foreign: list[str] = []
    for key, value in state.items():
        if key in own:
            if not isinstance(value, Tensor):
                raise WeightsError(
                    f"{key}: expected a tensor, got {type(value).__name__} (source: {source_name})"
                )
            if value.shape != own[key].shape:
                raise WeightsError(
                    f"shape mismatch for {key}: backbone {backbone.name!r} has "
                    f"{tuple(own[key].shape)}, source has {tuple(value.shape)} "
                    f"(source: {source_name})"
                )
            new_state[key] = value
        elif key.split(".", 1)[0] in used_layers:
            foreign.append(key)
        else:
            ignored.append(key)

    missing = [k for k in own if k not in new_state and not k.endswith(".num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"{len(missing)} weights of backbone {backbone.name!r} missing from {source_name}: "
            f"{_format_keys(missing)}"
        )
    if foreign:
        raise WeightsError(
            f"{source_name} has {len(foreign)} keys inside layers that backbone "
            f"{backbone.name!r} uses but does not have ({_format_keys(foreign)}): the weights "
            f"are for another architecture (expected {backbone.weights_arch!r})"
        )
    loaded = len(new_state)
    defaulted = [k for k in own if k not in new_state]  # num_batches_tracked only
    for key in defaulted:
        new_state[key] = own[key]
    backbone.load_state_dict(new_state, strict=True)

    logger.info(
        "loaded %d tensors into backbone %r from %s; ignored %d keys of layers it does not use%s",
        loaded,
        backbone.name,
        source_name,
        len(ignored),
        f": {_summarise_by_layer(ignored)}" if ignored else "",
    )
    if defaulted:
        logger.info(
            "%s has no BatchNorm num_batches_tracked counters (old checkpoint format): "
            "%d counters keep their current value",
            source_name,
            len(defaulted),
        )
    return LoadReport(loaded=loaded, ignored=ignored)
