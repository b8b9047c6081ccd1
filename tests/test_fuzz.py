"""Fuzzing of what users and clients hand the project (issue 10): training configs and their
``key=value`` overrides, data-set manifests, sweep configs and serving payloads. Each target
gives a valid result or the project's own error naming what is wrong (ConfigError,
DataSourceError, ImageInputError, MlflowException with INVALID_PARAMETER_VALUE), never
another exception type. An ``@example`` commented "was ..." once raised another exception
type (or was wrongly accepted); the code now handles it.

Pure Python, no services: the examples are derandomized (same inputs on every run, no example
database), so a failure in CI reproduces here.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlflow.exceptions import MlflowException
from PIL import Image

from tuning.space import (
    DOMAINS,
    SEARCHERS,
    THRESHOLD_PARTS,
    THRESHOLDS,
    Resources,
    Scheduler,
    SweepConfig,
    load_sweep,
)
from wsdan.accel import PRECISIONS
from wsdan.backbones import list_backbones
from wsdan.config import ConfigError, TrainConfig
from wsdan.data.pipeline import FORMAT_VERSION, DataSourceError, read_manifest
from wsdan.launcher import check_data
from wsdan.tracking.card import manifest_digest, model_card
from wsdan.tracking.inputs import (
    ImageInputError,
    decode_image,
    decode_resized,
    image_values,
    preprocess,
)

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BASE_CONFIG = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "synthetic_cpu.yaml")

# -- values of every type -------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),  # floats: NaN and ±inf included
    st.integers(min_value=10**308, max_value=10**320),  # beyond float's range
    st.text(max_size=8), st.sampled_from(["1e-3", "nan", "-inf", "0x10", "1_000", ""]),
)
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
# YAML mapping keys need not be strings.
JUNK_KEYS = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans(),
                      st.floats(allow_nan=False))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plausible(tp: Any) -> st.SearchStrategy:
    """Values of the field's type, near its valid range (so that many configs are valid)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return st.one_of(*[_plausible(a) for a in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-2, 600)
    if tp is float:
        return st.one_of(st.floats(-0.5, 1.5), st.floats(0, 1000),
                         st.sampled_from([math.inf, 10**400, "1e-3", "0.5", "inf", "nan", "x"]))
    if tp is str:
        return st.one_of(st.sampled_from([*list_backbones(), *PRECISIONS, "linear", "none", ""]),
                         st.text(max_size=6))
    raise AssertionError(f"no strategy for {tp}")


def _section(cls: type) -> st.SearchStrategy:
    """A section of ``cls``: a random subset of its fields, plausible or junk values, and
    now and then an unknown key."""
    fields = st.fixed_dictionaries(
        {}, optional={name: st.one_of(_plausible(tp), _plausible(tp), JUNK)
                      for name, tp in _hints(cls).items()})
    extra = st.dictionaries(JUNK_KEYS, JUNK, min_size=1, max_size=2)
    return st.one_of(fields, fields, st.tuples(fields, extra).map(lambda t: {**t[0], **t[1]}))


SECTIONS = {name: tp for name, tp in _hints(TrainConfig).items() if isinstance(tp, type)
            and hasattr(tp, "__dataclass_fields__")}
CONFIG_DICTS = st.tuples(
    st.fixed_dictionaries({}, optional={
        **{name: st.one_of(_section(cls), _section(cls), JUNK) for name, cls in SECTIONS.items()},
        "seed": st.one_of(_plausible(int), JUNK)}),
    st.dictionaries(JUNK_KEYS, JUNK, max_size=2),
).map(lambda t: {**t[0], **t[1]})
FLAT_KEYS = sorted(TrainConfig().flat())
KEY_NAMES = {*FLAT_KEYS, *SECTIONS, *(k.rsplit(".", 1)[-1] for k in FLAT_KEYS)}


def _keys(d: Any) -> set[str]:
    """Every key of a nested dict, as text."""
    if not isinstance(d, dict):
        return set()
    return {str(k) for k in d} | {k for v in d.values() for k in _keys(v)}


def _check_config(cfg: TrainConfig) -> None:
    assert isinstance(cfg, TrainConfig)
    for key, value in cfg.flat().items():
        assert not isinstance(value, float) or math.isfinite(value), (key, value)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# -- training configs -------------------------------------------------------------------------


@FUZZ
@given(CONFIG_DICTS)
@example({1: 2, "x": 3})  # was TypeError: keys of mixed types were sorted
@example({"optim": {"lr": 10**400}})  # was OverflowError in float()
@example({"optim": {"lr": math.inf}})  # was accepted: an infinite learning rate
@example({"model": {"logit_scale": "inf"}})  # was accepted likewise, from text
@example(["not", "a", "mapping"])
def test_config_from_dict(d: Any) -> None:
    try:
        cfg = TrainConfig.from_dict(d)
    except ConfigError as e:
        event("ConfigError")
        names = KEY_NAMES | _keys(d) | {"config"}
        assert any(n and n in str(e) for n in names), str(e)
    else:
        event("valid")
        _check_config(cfg)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)


OVERRIDES = st.one_of(
    st.builds(lambda k, v: f"{k}={v}",
              st.one_of(st.sampled_from(FLAT_KEYS), st.sampled_from(sorted(SECTIONS)),
                        st.text(max_size=10)),
              st.one_of(st.sampled_from(["0.01", "1e-3", "16", "null", "true", "resnet18"]),
                        JUNK.map(_yaml), st.text(max_size=10))),
    st.text(max_size=12),  # mostly without "="
)
YAML_FILES = st.one_of(
    CONFIG_DICTS.map(_yaml), CONFIG_DICTS.map(_yaml),
    st.just(TrainConfig().to_yaml()), JUNK.map(_yaml),  # scalars and lists: not a mapping
    st.text(max_size=40), st.binary(max_size=40),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the fuzzed files are written to (one file per target, overwritten)."""
    return tmp_path_factory.mktemp("fuzz")


def _write(path: Path, body: str | bytes) -> Path:
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body, encoding="utf-8")
    return path


@FUZZ
@given(body=YAML_FILES, overrides=st.lists(OVERRIDES, max_size=3))
@example(body="{}", overrides=["optim.lr=[1"])  # was yaml.ParserError
@example(body="a: [1", overrides=[])  # was yaml.ParserError
@example(body=b"optim: \xff\xfe", overrides=[])  # was UnicodeDecodeError
@example(body="optim: {lr: " + "9" * 5000 + "}", overrides=[])  # was ValueError from PyYAML
@example(body="[" * 5000, overrides=[])  # was RecursionError from PyYAML
@example(body="{}", overrides=["seed=" + "[" * 5000])  # was RecursionError likewise
@example(body="{}", overrides=["optim.lr=1" + "0" * 400])  # was OverflowError
def test_config_from_yaml_with_overrides(scratch: Path, body: str | bytes,
                                         overrides: list[str]) -> None:
    path = _write(scratch / "config.yaml", body)
    try:
        cfg = TrainConfig.from_yaml(path, overrides)
    except ConfigError as e:
        event("ConfigError")
        assert str(path) in str(e), str(e)
    else:
        event("valid")
        _check_config(cfg)


# -- data-set manifests --------------------------------------------------------------------

SPLITS = st.one_of(st.sampled_from(["train", "val", "test"]), st.text(max_size=4))
COUNT = st.one_of(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), JUNK)
DROP = object()  # a field to leave out


def _manifest_dict(classes: Any, counts: Any, shards: Any, row_groups: Any,
                   changes: dict[str, Any]) -> dict[str, Any]:
    out = {"format_version": FORMAT_VERSION, "name": "fuzz", "classes": classes,
           "num_classes": len(classes) if isinstance(classes, list) else 2, "counts": counts,
           "shards": shards, "row_groups": row_groups, **changes}
    return {k: v for k, v in out.items() if v is not DROP}


MANIFESTS = st.builds(
    _manifest_dict,
    st.one_of(st.lists(st.text(max_size=5), max_size=5), st.lists(st.text(max_size=5), max_size=5),
              st.lists(JUNK, max_size=3), JUNK),
    st.one_of(st.fixed_dictionaries({"train": COUNT, "val": COUNT}, optional={"test": COUNT}),
              st.fixed_dictionaries({"train": COUNT, "val": COUNT}, optional={"test": COUNT}),
              st.dictionaries(SPLITS, COUNT, max_size=3), JUNK),
    st.one_of(st.dictionaries(SPLITS, st.lists(st.text(max_size=8), max_size=3), max_size=3),
              st.dictionaries(SPLITS, st.lists(st.text(max_size=8), max_size=3), max_size=3),
              st.dictionaries(SPLITS, JUNK, max_size=2), JUNK),
    st.one_of(st.just(DROP), st.dictionaries(SPLITS, st.lists(st.lists(COUNT, max_size=3),
                                                              max_size=3), max_size=2), JUNK),
    # Replace or drop a field now and then (a missing key, a wrong format_version).
    st.dictionaries(st.sampled_from(["format_version", "classes", "num_classes", "counts",
                                     "shards", "row_groups", "name"]),
                    st.one_of(JUNK, st.just(DROP)), max_size=2),
)
MANIFEST_FILES = st.one_of(
    MANIFESTS.map(json.dumps), MANIFESTS.map(json.dumps), MANIFESTS.map(json.dumps),
    JUNK.map(json.dumps), st.text(max_size=30), st.binary(max_size=30),
)
_BASE_MANIFEST = {"format_version": FORMAT_VERSION, "classes": ["a", "b"], "num_classes": 2,
                  "counts": {"train": 1, "val": 1}, "shards": {}}


def _manifest(**fields: Any) -> str:
    return json.dumps({**_BASE_MANIFEST, **fields})


@FUZZ
@given(body=MANIFEST_FILES, num_classes=st.one_of(st.none(), st.integers(2, 4)))
@example(body=_manifest(num_classes="x"), num_classes=2)  # was ValueError in check_data
@example(body=_manifest(num_classes=[1]), num_classes=2)  # was TypeError in check_data
@example(body=_manifest(num_classes=None), num_classes=2)  # was TypeError in check_data
@example(body=_manifest(num_classes=3), num_classes=3)  # was accepted: 2 names, 3 classes
@example(body=_manifest(counts=[1]), num_classes=2)  # was AttributeError in check_data
@example(body=_manifest(counts=None), num_classes=2)  # was AttributeError in check_data
@example(body=_manifest(classes=[1, None]), num_classes=2)  # was TypeError in model_card
@example(body=_manifest(num_classes=1e400), num_classes=2)  # was OverflowError in check_data
@example(body=_manifest(row_groups={"train": [["x"]]}), num_classes=2)  # TypeError in reader
@example(body="[" * 100_000, num_classes=2)  # was RecursionError from json
def test_manifest(scratch: Path, body: str | bytes, num_classes: int | None) -> None:
    root = scratch / "dataset"
    root.mkdir(exist_ok=True)
    _write(root / "dataset.json", body)
    try:
        manifest = read_manifest(str(root))
    except DataSourceError as e:
        event("DataSourceError")
        assert "dataset.json" in str(e), str(e)
        return
    event("read")
    # What the launcher, evaluate and the model card do with a manifest that passed.
    assert len(manifest_digest(manifest)) == 16
    if num_classes is None:  # the data set's
        num_classes = max(2, manifest["num_classes"])
    cfg = TrainConfig.from_dict({"model": {"num_classes": num_classes},
                                 "data": {"source": str(root)}})
    try:
        check_data(cfg, manifest)
    except ConfigError as e:
        event("check_data: ConfigError")
        assert "model.num_classes" in str(e) or "dataset.json counts" in str(e), str(e)
    _, tags = model_card(cfg, manifest, {}, run_id="r",
                                   source={"commit": "c", "dirty": False})
    assert tags["data.num_classes"] == str(manifest["num_classes"])


# -- sweep configs -------------------------------------------------------------------------

NUMBERS = st.one_of(st.integers(-2, 40), st.floats(-0.5, 1.5), st.floats(1e-6, 1.0),
                    st.floats(), st.integers(min_value=10**308, max_value=10**320))
DOMAIN_SPECS = st.one_of(
    st.builds(lambda kind, args: {kind: args},
              st.one_of(st.sampled_from(DOMAINS), st.sampled_from(DOMAINS), st.text(max_size=4)),
              st.one_of(st.lists(NUMBERS, min_size=2, max_size=2), st.lists(NUMBERS, max_size=4),
                        st.lists(JUNK, max_size=3), JUNK)),
    JUNK,
)
THRESHOLD_SPECS = st.one_of(
    st.fixed_dictionaries({part: DOMAIN_SPECS for part in THRESHOLD_PARTS}),
    st.fixed_dictionaries({}, optional={part: DOMAIN_SPECS for part in THRESHOLD_PARTS}),
    JUNK,
)


def _range(kind: str, a: float, b: float) -> dict[str, list[float]]:
    return {kind: sorted([a, b])}


# Entries a sweep file would have, with values near the valid ones.
PLAUSIBLE_ENTRIES = st.one_of(
    st.tuples(st.just("optim.lr"), st.builds(_range, st.sampled_from(["uniform", "loguniform"]),
                                             st.floats(1e-5, 1), st.floats(1e-5, 1))),
    st.tuples(st.just("model.num_attentions"),
              st.builds(lambda v: {"choice": v}, st.lists(st.integers(0, 40), min_size=1,
                                                          max_size=3))),
    st.tuples(st.just("optim.epochs"),
              st.builds(lambda a, b: {"randint": [a, b]}, st.integers(0, 3), st.integers(1, 9))),
    st.tuples(st.sampled_from(sorted(THRESHOLDS)), st.builds(
        lambda c0, c1, h: {"center": _range("uniform", c0, c1), "half_width": {"uniform": [0, h]}},
        st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.5))),
)
RANDOM_SPACES = st.one_of(
    st.lists(st.one_of(
        PLAUSIBLE_ENTRIES,
        st.tuples(st.sampled_from(FLAT_KEYS), DOMAIN_SPECS),
        st.tuples(st.sampled_from(sorted(THRESHOLDS)), THRESHOLD_SPECS),
        st.tuples(JUNK_KEYS, DOMAIN_SPECS),
    ), min_size=1, max_size=3).map(dict),
    JUNK,
)
# A sweep file as a user would write it...
PLAUSIBLE_SWEEPS = st.fixed_dictionaries(
    {"base": st.just(BASE_CONFIG),
     "space": st.lists(PLAUSIBLE_ENTRIES, min_size=1, max_size=3).map(dict)},
    optional={
        "overrides": st.fixed_dictionaries({}, optional={"optim.epochs": st.integers(1, 6),
                                                         "data.source": st.text(max_size=8)}),
        "trials": st.integers(1, 20), "seed": st.integers(), "searcher": st.sampled_from(SEARCHERS),
        "resources": st.fixed_dictionaries({}, optional={
            "num_workers": st.integers(1, 4), "use_gpu": st.booleans(),
            "cpus_per_worker": st.floats(0, 4), "gpus_per_worker": st.floats(0, 2),
            "data_cpus": st.floats(0, 4), "max_concurrent": st.one_of(st.none(),
                                                                      st.integers(0, 4))}),
        "scheduler": st.fixed_dictionaries({}, optional={"grace_period": st.integers(0, 4),
                                                         "reduction_factor": st.integers(1, 4)}),
        "name": st.text(max_size=8),
    })
# ... with up to two of its fields replaced by anything (or an unknown field added).
SWEEP_FIELDS = sorted({"name", "base", "overrides", "trials", "seed", "searcher", "resources",
                       "scheduler", "space"})
SWEEPS = st.builds(
    lambda sweep, changes: {**sweep, **changes},
    PLAUSIBLE_SWEEPS,
    st.dictionaries(
        st.one_of(st.sampled_from(SWEEP_FIELDS), st.sampled_from(SWEEP_FIELDS), JUNK_KEYS),
        st.one_of(JUNK, RANDOM_SPACES, NUMBERS, _section(Resources), _section(Scheduler),
                  st.dictionaries(st.one_of(st.sampled_from(FLAT_KEYS), st.text(max_size=8)),
                                  st.one_of(NUMBERS, JUNK), max_size=3)),
        max_size=2),
)
_SPACE = {"optim.lr": {"loguniform": [0.001, 0.1]}}


def _sweep(**fields: Any) -> str:
    return _yaml({"base": BASE_CONFIG, "space": _SPACE, **fields})


@FUZZ
@given(body=st.one_of(SWEEPS.map(_yaml), SWEEPS.map(_yaml), SWEEPS.map(_yaml),
                      st.text(max_size=40), st.binary(max_size=40)))
@example(body=_sweep(**{"x": 1}) + "1: 2\n")  # was TypeError: mixed key types sorted
@example(body=_sweep(resources={1: 2, "x": 3}))  # was TypeError likewise
@example(body=_sweep(space={"augment.crop_theta": {"center": {"choice": [0.5, "a"]},
                                                   "half_width": {"uniform": [0, 0.1]}}}))
@example(body=_sweep(space={"augment.crop_theta": {"center": {"choice": [0.5]},
                                                   "half_width": {"choice": [None]}}}))
@example(body=_sweep(space={"optim.lr": {"uniform": [0, 10**400]}}))  # was OverflowError
@example(body=_sweep(space={"optim.epochs": {"randint": [1, 10**400]}}))  # likewise
@example(body=_sweep(overrides={"optim.lr": 10**400}))  # was OverflowError
@example(body=_sweep(resources={"cpus_per_worker": 10**400}))  # was OverflowError
@example(body=b"base: \xff")  # was UnicodeDecodeError
@example(body="trials: " + "9" * 5000)  # was ValueError from PyYAML
def test_sweep_config(scratch: Path, body: str | bytes) -> None:
    path = _write(scratch / "sweep.yaml", body)
    try:
        sweep = load_sweep(path)
    except ConfigError as e:
        event("ConfigError")
        assert str(path) in str(e), str(e)
        return
    event("valid")
    assert isinstance(sweep, SweepConfig)
    assert sweep.space.domains and sweep.trials >= 1
    sweep.space.param_space()
    sweep.rungs()
    params = {key: d.extremes()[0] for key, d in sweep.space.domains.items()}
    # Each key's values are checked alone; a combination may still be rejected.
    with contextlib.suppress(ConfigError):
        sweep.trial_config(params)


# -- serving payloads ----------------------------------------------------------------------

R, S = 20, 16  # resize_size, image_size of the served model: small, for speed


def _encode(mode: str, fmt: str, w: int, h: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    elif mode in ("I", "F"):
        im = im.convert("L").convert(mode)
    else:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# Small images of the modes and formats clients send, made once: format -> modes it writes.
FORMATS = {"PNG": ["RGB", "L", "RGBA", "P", "1", "I;16", "LA"], "JPEG": ["RGB", "L", "CMYK"],
           "GIF": ["L", "P"], "BMP": ["RGB", "L", "P", "1"],
           "TIFF": ["RGB", "L", "RGBA", "P", "1", "I;16", "I", "F", "CMYK"],
           "WEBP": ["RGB", "RGBA"]}
IMAGES = [_encode(mode, fmt, w, h, seed) for fmt, modes in FORMATS.items() for mode in modes
          for seed, (w, h) in enumerate([(1, 1), (7, 3), (24, 17)])]
ENCODED = st.sampled_from(IMAGES)


def _damage(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[: max(0, len(data) - cut)] if cut else data)
    for pos, byte in flips:
        if out:
            out[pos % len(out)] = byte
    return bytes(out)


DAMAGED = st.builds(_damage, ENCODED, st.integers(0, 200),
                    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
MAGIC = st.builds(lambda m, rest: m + rest,
                  st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM",
                                   b"RIFF", b"II*\x00", b"MM\x00*"]), st.binary(max_size=60))
BYTES = st.one_of(ENCODED, DAMAGED, DAMAGED, MAGIC, st.binary(max_size=40))


def _b64(data: bytes, as_text: bool, wrap: bool) -> str | bytes:
    text = base64.encodebytes(data) if wrap else base64.b64encode(data)  # MIME: newlines
    return text.decode("ascii") if as_text else text


ARRAYS = hnp.arrays(
    st.sampled_from([np.uint8, np.uint8, np.float32, np.int64, np.bool_, np.uint16]),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)
VALUES = st.one_of(
    BYTES, BYTES, st.builds(_b64, BYTES, st.booleans(), st.booleans()),
    st.builds(_b64, ENCODED, st.booleans(), st.booleans()), st.text(max_size=20),
    ARRAYS, st.sampled_from([None, math.nan, pd.NA, pd.NaT, 0, 1.5, True]),
    st.builds(bytearray, st.binary(max_size=10)), st.builds(memoryview, ENCODED),
    st.lists(st.integers(0, 255), max_size=4), st.lists(st.lists(st.integers(0, 3), max_size=3),
                                                        max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
COLUMNS = st.lists(st.one_of(st.just("image"), st.sampled_from(["IMAGE", "images", "x", 0])),
                   max_size=3)


def _frame(columns: list[Any], rows: list[list[Any]]) -> pd.DataFrame:
    data = {i: [row[i % len(row)] if row else None for row in rows] for i in range(len(columns))}
    frame = pd.DataFrame({i: pd.Series(v, dtype=object) for i, v in data.items()},
                         index=range(len(rows)))
    frame.columns = columns[: frame.shape[1]] if columns else frame.columns
    return frame


PAYLOADS = st.one_of(
    st.lists(st.one_of(ENCODED, st.builds(_b64, ENCODED, st.booleans(), st.booleans())),
             min_size=1, max_size=3).map(lambda v: pd.DataFrame({"image": v})),
    st.builds(_frame, COLUMNS, st.lists(st.lists(VALUES, min_size=1, max_size=2), max_size=3)),
    st.builds(lambda v: pd.DataFrame({"image": pd.Series(v, dtype=object)}),
              st.lists(VALUES, max_size=3)),
    st.builds(lambda v: pd.Series(v, dtype=object), st.lists(VALUES, max_size=3)),
    st.lists(VALUES, max_size=3), st.lists(VALUES, max_size=3).map(tuple),
    st.builds(lambda v: {"image": v}, st.one_of(st.lists(VALUES, max_size=2), VALUES)),
    st.dictionaries(st.text(max_size=5), VALUES, max_size=2), ARRAYS, VALUES,
)


@pytest.fixture(scope="module")
def small_images():
    """PIL's decompression-bomb limit lowered while fuzzing (an error above 2**20 pixels): a
    random header may claim a big image, which PIL would allocate before finding the data
    truncated. Above the limit PIL raises (a DecodeError here), as it does above its own."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 2**19  # PIL raises above twice this
    yield
    Image.MAX_IMAGE_PIXELS = saved


# PIL warns about the broken files it still reads (truncated TIFF tags, corrupt EXIF).
pil_warnings = pytest.mark.filterwarnings("ignore::UserWarning:PIL",
                                          "ignore::PIL.Image.DecompressionBombWarning")


def _is_client_error(e: MlflowException) -> bool:
    return e.error_code == "INVALID_PARAMETER_VALUE"


@pil_warnings
@FUZZ
@given(PAYLOADS)
@example({"image": 5})  # was TypeError: a scalar under "image" was iterated
@example({"image": None})  # was TypeError likewise
@example(np.array(5, np.uint8))  # was TypeError: iteration over a 0-d array
@example(np.array(0.5))  # likewise
@example(pd.DataFrame([[b"GIF8", b"BM"]], columns=["image", "image"]))  # decoded the labels
@example(pd.DataFrame())
def test_serving_payload(small_images, payload: Any) -> None:
    try:
        values = image_values(payload)
        batch = preprocess(values, resize_size=R, image_size=S)
    except MlflowException as e:
        event("client error")
        assert _is_client_error(e), (e.error_code, str(e))
        assert "image" in str(e) or str(e).startswith("row "), str(e)
        return
    event("valid")
    assert batch.shape == (len(values), 3, S, S)


@pil_warnings
@FUZZ
@given(VALUES)
@example(np.zeros((2, 0, 3), np.uint8))
@example(b"BM" + b"\x00" * 60)
def test_serving_value(small_images, value: Any) -> None:
    for decode in (decode_image, lambda v: decode_resized(v, R)):
        try:
            image = decode(value)
        except ImageInputError as e:
            event("ImageInputError")
            assert str(e)
            continue
        event("valid")
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
