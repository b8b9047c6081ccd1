"""Configuration: frozen dataclasses, to and from plain dicts and YAML.

Plain dicts are what Ray Tune's ``param_space``, MLflow params and the YAML files under
``jobs/configs`` exchange. Every value is validated when the dataclass is built, and an
unknown key is an error naming the key: a typo never silently falls back to a default.
Defaults follow the paper and public codes (docs/algorithm.md §5) unless a comment says why
not. The trailing comment of each field is its meaning in the configuration reference of
docs/operations.md (``python -m jobs.config_reference`` writes it; every field needs one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value or key; the message names the field."""


def _check(cond: bool, name: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}, got {value!r}")


def _unit_open(name: str, value: float) -> None:
    _check(0.0 < value < 1.0, name, "must lie in (0, 1)", value)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "inception_v3"  # Inception-v3 cut at Mixed_6e: the paper's setting
    num_classes: int = 200  # K; must equal the prepared data set's class count
    num_attentions: int = 32  # M: accuracy rises with M and saturates at 32 (paper)
    logit_scale: float = 100.0  # fixed temperature of the L2-normalised features
    pretrained: bool = False  # torchvision weights from the local TORCH_HOME cache
    weights: str | None = None  # backbone state dict: local path or s3:// URI
    # Backward epsilon of the signed square root; None = exact, unbounded derivative.
    sqrt_grad_eps: float | None = 1e-4  # signed-sqrt backward epsilon; null = exact
    # SyncBatchNorm across workers: BN then sees the global batch, as one process would
    # (small per-GPU batches, e.g. the recipe's 12, give noisy BN statistics otherwise).
    sync_batchnorm: bool = False  # SyncBatchNorm across workers (needs --use-gpu)
    # How the step runs on its device (wsdan.accel): autocast precision (auto = bf16 on a
    # GPU with bf16, fp32 elsewhere; BAP, the head and the centres stay fp32 always),
    # NHWC memory format (null = on with CUDA), torch.compile, cuDNN autotuning.
    precision: str = "auto"  # autocast: auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU with it)
    channels_last: bool | None = None  # NHWC weights and inputs; null = on with CUDA
    compile: bool = False  # torch.compile the model (in place: same state-dict keys)
    cudnn_benchmark: bool = True  # let cuDNN autotune convolutions for the fixed input size

    def __post_init__(self) -> None:
        from wsdan.accel import PRECISIONS
        from wsdan.backbones import list_backbones

        _check(self.precision in PRECISIONS, "precision",
               f"must be one of {', '.join(PRECISIONS)}", self.precision)

        _check(self.backbone in list_backbones(), "backbone",
               f"unknown backbone (known: {', '.join(list_backbones())})", self.backbone)
        _check(self.num_classes >= 2, "num_classes", "must be >= 2", self.num_classes)
        _check(self.num_attentions >= 1, "num_attentions", "must be >= 1", self.num_attentions)
        _check(self.logit_scale > 0, "logit_scale", "must be > 0", self.logit_scale)
        _check(not (self.pretrained and self.weights), "weights",
               "give either pretrained=true or weights=..., not both", self.weights)
        if self.sqrt_grad_eps is not None:
            _check(self.sqrt_grad_eps > 0, "sqrt_grad_eps", "must be > 0 or null",
                   self.sqrt_grad_eps)


@dataclass(frozen=True)
class AugmentConfig:
    crop_theta_low: float = 0.4  # θc ~ U(low, high) per image; paper: 0.5
    crop_theta_high: float = 0.6  # upper end of θc's range
    drop_theta_low: float = 0.2  # θd ~ U(low, high) per image; paper: 0.5
    drop_theta_high: float = 0.5  # upper end of θd's range
    crop_padding: float = 0.1  # box padding, fraction of H and W on each side
    # Run crop and drop images as one 2B batch: faster, but BN sees one mixed batch;
    # off until shown equal in accuracy (docs/algorithm.md §3.4).
    fuse_crop_drop: bool = False  # crop and drop passes as one 2B batch (speed option)

    def __post_init__(self) -> None:
        for name in ("crop_theta_low", "crop_theta_high", "drop_theta_low", "drop_theta_high"):
            _unit_open(name, getattr(self, name))
        _check(self.crop_theta_low <= self.crop_theta_high, "crop_theta_low",
               f"must be <= crop_theta_high ({self.crop_theta_high})", self.crop_theta_low)
        _check(self.drop_theta_low <= self.drop_theta_high, "drop_theta_low",
               f"must be <= drop_theta_high ({self.drop_theta_high})", self.drop_theta_low)
        _check(0.0 <= self.crop_padding < 0.5, "crop_padding", "must lie in [0, 0.5)",
               self.crop_padding)


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 80  # training epochs (80-160 in the paper and the public codes)
    batch_size: int = 12  # images per worker per step
    lr: float = 1e-3  # for base_batch_size images per step; scaled by lr_scaling
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-5  # SGD weight decay (L2), every parameter
    # Learning-rate multiplier of the new layers (attention conv, classifier) relative to
    # the backbone; < 1 tames the fresh head (docs/algorithm.md §1.3).
    head_lr_mult: float = 1.0  # lr of attention conv and classifier = lr × this
    grad_clip_norm: float | None = None  # clip the global gradient norm; None (null) = off
    lr_step_epochs: int = 2  # StepLR: ×lr_gamma every lr_step_epochs epochs
    lr_gamma: float = 0.9  # StepLR decay factor
    warmup_epochs: float = 0.0  # linear warm-up from 0 (fractions allowed)
    lr_scaling: str = "linear"  # "linear": lr × global_batch / base_batch_size; "none"
    base_batch_size: int = 12  # global batch that lr is given for (linear scaling)
    center_beta: float = 0.05  # β, feature-centre update rate
    center_weight: float = 1.0  # λ, weight of the attention regularisation loss

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(0 <= self.momentum < 1, "momentum", "must lie in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self.head_lr_mult > 0, "head_lr_mult", "must be > 0", self.head_lr_mult)
        if self.grad_clip_norm is not None:
            _check(self.grad_clip_norm > 0, "grad_clip_norm", "must be > 0 or null",
                   self.grad_clip_norm)
        _check(self.lr_step_epochs >= 1, "lr_step_epochs", "must be >= 1", self.lr_step_epochs)
        _check(0 < self.lr_gamma <= 1, "lr_gamma", "must lie in (0, 1]", self.lr_gamma)
        _check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", self.warmup_epochs)
        _check(self.lr_scaling in ("linear", "none"), "lr_scaling",
               "must be 'linear' or 'none'", self.lr_scaling)
        _check(self.base_batch_size >= 1, "base_batch_size", "must be >= 1",
               self.base_batch_size)
        _check(0 < self.center_beta <= 1, "center_beta", "must lie in (0, 1]", self.center_beta)
        _check(self.center_weight >= 0, "center_weight", "must be >= 0", self.center_weight)


@dataclass(frozen=True)
class DataConfig:
    source: str = ""  # data set location (local path or s3:// URI); job-specific
    image_size: int = 448  # network input (random crop / centre crop size)
    resize_size: int = 512  # square resize at decode (aspect not kept), before cropping
    hflip: bool = True  # random horizontal flip in training
    brightness: float = 0.126  # ColorJitter brightness, as in the public codes
    saturation: float = 0.5  # ColorJitter saturation, as in the public codes

    def __post_init__(self) -> None:
        _check(self.image_size >= 32, "image_size", "must be >= 32", self.image_size)
        _check(self.resize_size >= self.image_size, "resize_size",
               f"must be >= image_size ({self.image_size})", self.resize_size)
        _check(self.brightness >= 0, "brightness", "must be >= 0", self.brightness)
        _check(self.saturation >= 0, "saturation", "must be >= 0", self.saturation)


@dataclass(frozen=True)
class InferenceConfig:
    refine_theta: float = 0.1  # test-time crop box: where the mean attention map ≥ θ·its max
    refine_padding: float = 0.05  # test-time box padding, fraction of H and W on each side

    def __post_init__(self) -> None:
        _unit_open("refine_theta", self.refine_theta)
        _check(0.0 <= self.refine_padding < 0.5, "refine_padding", "must lie in [0, 0.5)",
               self.refine_padding)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    seed: int = 0  # seeds initial weights, augmentation generators and data order

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        p = Path(path)
        text = read_file(p, "config file")
        try:
            d = parse_yaml(text) or {}
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(d).__name__}")
        try:
            return from_dict(cls, apply_overrides(d, overrides or []))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, e.g. for MLflow params or a Tune search space."""
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with flat dotted-key overrides applied, e.g. ``{"model.num_attentions": 16,
        "optim.lr": 0.01}`` (a Tune trial's config). Validated exactly as ``key=value``
        overrides on the command line are: an unknown key or a rejected value raises
        :class:`ConfigError` naming the dotted key. Values are taken as they are (not parsed
        from text); numbers are converted to the field's type where that is lossless."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, str(key), value, what=f"override {key!r}")
        return from_dict(TrainConfig, d)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_file(path: str | Path, what: str) -> bytes:
    """The bytes of the file ``path`` (``what`` names it in errors); :class:`ConfigError` when it
    is missing or cannot be read (a name too long for the file system is an OSError)."""
    p = Path(path)
    try:
        if p.is_file():
            return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read: {e.strerror or e}") from None
    raise ConfigError(f"{what} not found: {p}")


def parse_yaml(text: str | bytes) -> Any:
    """``yaml.safe_load``; what is not YAML is a :class:`ConfigError`. Give a file's bytes: PyYAML
    then reports bad UTF-8 as a YAMLError. Besides YAMLError it raises ValueError (an integer of
    over 4300 digits) and RecursionError (deep nesting)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"not valid YAML ({e})") from None


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a plain value to the annotated field type; error names the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string: accept numeric strings.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            # inf passes most range checks (lr > 0) and NaN fails them with a confusing
            # message; an int beyond float's range would raise OverflowError in float().
            try:
                number = float(number)
            except OverflowError:
                number = math.inf
            _check(math.isfinite(number), name, "must be a finite number", value)
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used
        return value
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")


def from_dict(cls: type, d: dict[str, Any], prefix: str = "") -> Any:
    """Build a config dataclass from a nested dict; unknown keys and bad values raise
    :class:`ConfigError` naming the dotted key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names, key=str)  # YAML keys may be ints, None...: sort as text
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known in {prefix.rstrip('.') or 'top level'}:"
            f" {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict copy."""
    import copy

    out = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: value is {e}") from None
        _set_dotted(out, key.strip(), value, what=f"override {item!r}")
    return out


def _set_dotted(d: dict[str, Any], key: str, value: Any, *, what: str) -> None:
    """``d[a][b] = value`` for ``key = "a.b"``. A missing section is created (``from_dict``
    then names it as an unknown key); a value where a section should be is an error."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{what}: {key!r} is not a dotted config key")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {p} is not a section")
    if isinstance(node.get(parts[-1]), dict):
        raise ConfigError(f"{what}: {key} is a section, not a value")
    node[parts[-1]] = value
