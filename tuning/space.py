"""Sweep configs: the YAML a sweep is started from, validated before any trial starts.

A sweep file names a base training config, fixed overrides, the search space, the trial
resources and the scheduler::

    base: jobs/configs/synthetic_cpu.yaml   # relative to the working directory or this file
    overrides: {optim.epochs: 4}            # applied to every trial
    trials: 8
    seed: 0
    searcher: optuna                        # TPE, seeded; or "random"
    resources: {num_workers: 1, cpus_per_worker: 1, data_cpus: 1}
    scheduler: {grace_period: 1, reduction_factor: 2}
    space:
      model.num_attentions: {choice: [4, 8, 16]}
      optim.center_beta: {loguniform: [0.01, 0.5]}
      optim.lr: {loguniform: [0.003, 0.03]}
      augment.crop_theta: {center: {uniform: [0.35, 0.65]}, half_width: {uniform: [0, 0.1]}}

Every key of the space is a dotted config key (``TrainConfig.flat()``), or one of the two
threshold ranges ``augment.crop_theta`` / ``augment.drop_theta``, searched as a centre and
a half-width: a trial gets ``low = centre - half_width`` and ``high = centre + half_width``,
so low > high cannot happen, and the whole space is checked to stay inside (0, 1).

Errors are :class:`~wsdan.config.ConfigError` naming the key (``space.optim.lr: ...``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsdan.config import ConfigError, TrainConfig, parse_yaml, read_file

DOMAINS = ("choice", "uniform", "loguniform", "randint")
THRESHOLDS = {  # pseudo-key -> (low key, high key)
    "augment.crop_theta": ("augment.crop_theta_low", "augment.crop_theta_high"),
    "augment.drop_theta": ("augment.drop_theta_low", "augment.drop_theta_high"),
}
THRESHOLD_PARTS = ("center", "half_width")
SEARCHERS = ("optuna", "random")
METRIC, MODE = "val_fused_top1", "max"


@dataclass(frozen=True)
class Domain:
    """One searched dimension: ``kind`` in DOMAINS and its arguments."""

    key: str  # the parameter's name in the trial config, e.g. "augment.crop_theta.center"
    kind: str
    args: tuple[Any, ...]

    def tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def extremes(self) -> list[Any]:
        """Values that bound what the domain can produce (every value, for a choice)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":  # Ray's randint excludes the upper bound
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    @property
    def low(self) -> float:
        return min(self.extremes())

    @property
    def high(self) -> float:
        return max(self.extremes())


def _finite(x: Any) -> bool:
    """A real number (not bool) that is finite as a float (an int beyond float's range is not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def parse_domain(key: str, spec: Any, *, numeric: bool = False) -> Domain:
    """One domain; ``numeric``: a choice too must be of finite numbers (threshold parts,
    which are added and compared)."""
    where = f"space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(k + ': ...' for k in DOMAINS)}}}"
                          f", got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list, got {args!r}")
        if numeric and not all(_finite(a) for a in args):
            raise ConfigError(f"{where}: choice needs finite numbers here, got {args!r}")
        return Domain(key, kind, tuple(args))
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not all(_finite(a) for a in args):
        raise ConfigError(f"{where}: {kind} bounds must be finite, got {args!r}")
    if low > high:
        raise ConfigError(f"{where}: {kind} low {low!r} > high {high!r}")
    if low == high or (kind == "randint" and high - low < 1):
        raise ConfigError(f"{where}: {kind} range [{low!r}, {high!r}] is empty")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low!r}")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint needs integer bounds, got {args!r}")
        return Domain(key, kind, (low, high))
    return Domain(key, kind, (float(low), float(high)))


@dataclass(frozen=True)
class SearchSpace:
    """Domains by trial-parameter name, plus how trial parameters become config overrides."""

    domains: dict[str, Domain]

    @classmethod
    def parse(cls, space: Any, base: TrainConfig) -> SearchSpace:
        if not isinstance(space, Mapping) or not space:
            raise ConfigError(f"space: expected a non-empty mapping of config keys, got {space!r}")
        known = set(base.flat())
        domains: dict[str, Domain] = {}
        for key, spec in space.items():
            key = str(key)
            if key in THRESHOLDS:
                if not isinstance(spec, Mapping) or set(spec) != set(THRESHOLD_PARTS):
                    raise ConfigError(f"space.{key}: expected {{center: ..., half_width: ...}} "
                                      f"(low = center - half_width, high = center + "
                                      f"half_width), got {spec!r}")
                for part in THRESHOLD_PARTS:
                    d = parse_domain(f"{key}.{part}", spec[part], numeric=True)
                    domains[d.key] = d
            elif key in known:
                if any(key in pair for pair in THRESHOLDS.values()):
                    pseudo = next(p for p, pair in THRESHOLDS.items() if key in pair)
                    raise ConfigError(f"space.{key}: search the range as {pseudo} "
                                      "(center, half_width), so that low <= high always")
                domains[key] = parse_domain(key, spec)
            else:
                raise ConfigError(f"space.{key}: unknown config key (known: "
                                  f"{', '.join(sorted([*known, *THRESHOLDS]))})")
        out = cls(domains)
        out.check(base)
        return out

    def check(self, base: TrainConfig) -> None:
        """Every value the space can produce must be one the config accepts."""
        for key, d in self.domains.items():
            if key.rsplit(".", 1)[0] in THRESHOLDS:
                continue
            for value in d.extremes():
                try:
                    base.with_overrides({key: value})
                except ConfigError as e:
                    raise ConfigError(f"space.{key}: value {value!r} is rejected ({e})") from None
        for pseudo, (low_key, high_key) in THRESHOLDS.items():
            center = self.domains.get(f"{pseudo}.center")
            if center is None:
                continue
            half = self.domains[f"{pseudo}.half_width"]
            if half.low < 0:
                raise ConfigError(f"space.{pseudo}.half_width: must be >= 0, got {half.low!r}")
            for c in (center.low, center.high):
                lo, hi = c - half.high, c + half.high
                try:
                    base.with_overrides({low_key: lo, high_key: hi})
                except ConfigError as e:
                    raise ConfigError(
                        f"space.{pseudo}: center {c!r} ± half_width {half.high!r} gives "
                        f"[{lo:.4g}, {hi:.4g}], which is rejected ({e})") from None

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: flat parameter names to Tune domains."""
        return {key: d.tune() for key, d in self.domains.items()}

    def overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's parameters as flat config overrides (threshold ranges resolved)."""
        out: dict[str, Any] = {}
        for key, value in params.items():
            if key not in self.domains:
                continue
            pseudo, _, part = key.rpartition(".")
            if pseudo in THRESHOLDS:
                if part == "center":
                    low_key, high_key = THRESHOLDS[pseudo]
                    half = float(params[f"{pseudo}.half_width"])
                    out[low_key] = float(value) - half
                    out[high_key] = float(value) + half
            else:
                out[key] = value.item() if hasattr(value, "item") else value  # numpy scalars
        return out


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1  # Ray Train workers per trial
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    data_cpus: float = 1.0  # Ray Data CPU cap per trial
    max_concurrent: int | None = None  # default: as many trials as the cluster holds

    def per_worker(self) -> dict[str, float]:
        res = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            res["GPU"] = float(self.gpus_per_worker)
        return res

    def per_trial(self) -> dict[str, float]:
        """What one trial holds: its workers plus its Ray Data CPUs."""
        out = {k: v * self.num_workers for k, v in self.per_worker().items()}
        out["CPU"] += self.data_cpus
        return out


@dataclass(frozen=True)
class Scheduler:
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # keep the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class SweepConfig:
    base: str
    space: SearchSpace
    train: TrainConfig  # the base config with the fixed overrides
    overrides: dict[str, Any] = field(default_factory=dict)
    trials: int = 8
    seed: int = 0
    searcher: str = "optuna"
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler = field(default_factory=Scheduler)
    name: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # as given, for the record

    @property
    def epochs(self) -> int:
        return self.train.optim.epochs

    def rungs(self) -> list[int]:
        """Epochs at which ASHA compares trials."""
        out, t = [], self.scheduler.grace_period
        while t < self.epochs:
            out.append(t)
            t *= self.scheduler.reduction_factor
        return out

    def trial_config(self, params: Mapping[str, Any]) -> TrainConfig:
        return self.train.with_overrides(self.space.overrides(params))


_TOP_KEYS = {"name", "base", "overrides", "trials", "seed", "searcher", "resources",
             "scheduler", "space"}


def _section(d: Any, cls: type, where: str) -> Any:
    import dataclasses

    from wsdan.config import from_dict

    if d is None:
        return cls()
    names = {f.name for f in dataclasses.fields(cls)}
    if isinstance(d, Mapping) and set(d) - names:
        raise ConfigError(f"{where}.{sorted(set(d) - names, key=str)[0]}: unknown key (known: "
                          f"{', '.join(sorted(names))})")
    return from_dict(cls, dict(d) if isinstance(d, Mapping) else d, prefix=f"{where}.")


def parse_sweep(d: Any, *, origin: str | Path | None = None,
                cli_overrides: list[str] | None = None,
                base_config: TrainConfig | None = None) -> SweepConfig:
    """Validate a sweep dict (from YAML). cli_overrides: ``key=value`` items applied to the
    base config after the file's ``overrides``. base_config: the trials' base config as
    already resolved (a resumed sweep's record); the file named by ``base`` is then not
    read and no overrides are applied again."""
    from wsdan.config import apply_overrides, from_dict

    if not isinstance(d, Mapping):
        raise ConfigError(f"sweep config: top level must be a mapping, got {d!r}")
    unknown = sorted(set(d) - _TOP_KEYS, key=str)  # YAML keys may be ints, None...
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep key (known: {', '.join(sorted(_TOP_KEYS))})")
    if "base" not in d:
        raise ConfigError("base: the sweep must name its base training config (a YAML file)")
    base_path = _find_base(str(d["base"]), origin) if base_config is None else d["base"]
    trials = d.get("trials", 8)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials: must be an integer >= 1, got {trials!r}")
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    searcher = d.get("searcher", "optuna")
    if searcher not in SEARCHERS:
        raise ConfigError(f"searcher: must be one of {', '.join(SEARCHERS)}, got {searcher!r}")
    overrides = d.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides: expected a mapping of config keys, got {overrides!r}")
    try:
        if base_config is not None:
            train = base_config
        else:
            train = TrainConfig.from_yaml(base_path).with_overrides(dict(overrides))
        if cli_overrides and base_config is None:  # the command line wins over the file's overrides
            raw = apply_overrides(train.to_dict(), cli_overrides)
            train = from_dict(TrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"overrides: {e}") from None
    resources = _section(d.get("resources"), Resources, "resources")
    _check_resources(resources)
    scheduler = _section(d.get("scheduler"), Scheduler, "scheduler")
    if scheduler.grace_period < 1:
        raise ConfigError(f"scheduler.grace_period: must be >= 1, got {scheduler.grace_period}")
    if scheduler.reduction_factor < 2:
        raise ConfigError("scheduler.reduction_factor: must be >= 2, got "
                          f"{scheduler.reduction_factor}")
    space = SearchSpace.parse(d.get("space"), train)
    name = d.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        raise ConfigError(f"name: must be a non-empty name without '/', got {name!r}")
    return SweepConfig(base=str(base_path), space=space, train=train, overrides=dict(overrides),
                       trials=trials, seed=seed, searcher=searcher, resources=resources,
                       scheduler=scheduler, name=name, raw=dict(d))


def _check_resources(r: Resources) -> None:
    if r.num_workers < 1:
        raise ConfigError(f"resources.num_workers: must be >= 1, got {r.num_workers}")
    if r.cpus_per_worker < 0:
        raise ConfigError(f"resources.cpus_per_worker: must be >= 0, got {r.cpus_per_worker}")
    if r.use_gpu and not r.gpus_per_worker > 0:
        raise ConfigError(f"resources.gpus_per_worker: must be > 0, got {r.gpus_per_worker}")
    if not r.data_cpus > 0:
        raise ConfigError(f"resources.data_cpus: must be > 0, got {r.data_cpus}")
    if r.max_concurrent is not None and r.max_concurrent < 1:
        raise ConfigError(f"resources.max_concurrent: must be >= 1, got {r.max_concurrent}")


def _find_base(base: str, origin: str | Path | None) -> Path:
    candidates = [Path(base)]
    if origin is not None and not Path(base).is_absolute():
        candidates.append(Path(origin).parent / base)
    for c in candidates:
        with contextlib.suppress(OSError):  # e.g. a name too long for the file system
            if c.is_file():
                return c
    raise ConfigError(f"base: training config {base!r} not found (looked in "
                      f"{', '.join(str(c) for c in candidates)})")


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None) -> SweepConfig:
    p = Path(path)
    text = read_file(p, "sweep config file")
    try:
        d = parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        return parse_sweep(d, origin=p, cli_overrides=cli_overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def max_concurrent(cfg: SweepConfig, cluster: Mapping[str, float]) -> int:
    """How many trials run at once: what the cluster holds (each trial's workers plus its Ray
    Data CPUs), at most ``resources.max_concurrent`` and at most the number of trials."""
    need = cfg.resources.per_trial()
    fits = min(int(cluster.get(k, 0.0) // v) if v > 0 else cfg.trials for k, v in need.items())
    if fits < 1:
        short = {k: v for k, v in need.items() if cluster.get(k, 0.0) < v}
        k, v = next(iter(short.items()))
        raise ConfigError(
            f"resources: one trial needs {v:g} {k} ({cfg.resources.num_workers} worker(s) × "
            f"{cfg.resources.per_worker()[k]:g}" + (f" + {cfg.resources.data_cpus:g} for Ray "
                                                     "Data" if k == "CPU" else "")
            + f"); the Ray cluster has {cluster.get(k, 0.0):g}")
    limit = cfg.resources.max_concurrent or fits
    return max(1, min(fits, limit, cfg.trials))
