"""Model registry: register a logged model and move the ``champion`` alias only to a better one.

Each version carries its validation metric as a version tag (e.g. ``val_fused_top1=0.8125``);
the alias moves when the new value beats the current champion's tag, or when there is no
champion. Aliases replace MLflow's deprecated stages: load the best model anywhere with
``mlflow.pyfunc.load_model("models:/NAME@champion")``.

Two jobs registering at the same moment can both read the old champion and both move the
alias (last writer wins): run registrations one at a time, e.g. from the driver of one job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

CHAMPION = "champion"
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)/?$")


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    became_champion: bool
    previous_champion_version: str | None
    previous_value: float | None  # the previous champion's metric tag, if it had one
    reason: str


def champion_version(name: str, *, alias: str = CHAMPION,
                     client: MlflowClient | None = None) -> str | None:
    """Version of registered model ``name`` that holds ``alias``, or None (no such alias or
    no such model)."""
    client = client or MlflowClient()
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def register_if_better(
    model: str | ModelInfo,
    name: str,
    metric_name: str,
    metric_value: float,
    *,
    higher_is_better: bool = True,
    alias: str = CHAMPION,
    client: MlflowClient | None = None,
) -> RegistrationResult:
    """Register ``model`` under ``name``, tag the version with the metric, and move ``alias``
    to it if it beats the current holder.

    model: the ModelInfo that ``log_wsdan_model`` returned (when it was logged with
        registered_model_name=name, that version is used instead of registering a second
        one), or a model URI: ``models:/m-<id>`` (``ModelInfo.model_uri``), or another URI
        such as ``runs:/<run_id>/model``, registered with MLflow's fluent API.
    A tie keeps the current champion. A champion without the metric tag cannot be compared:
    it keeps the alias and ``reason`` says so (tag it, or move the alias by hand).
    """
    value = float(metric_value)
    if not math.isfinite(value):
        raise ValueError(f"{metric_name} must be a finite number, got {metric_value!r}")
    client = client or MlflowClient()
    version = _registered_version(model, name, client)
    client.set_model_version_tag(name, version, metric_name, repr(value))

    previous = champion_version(name, alias=alias, client=client)
    previous_value: float | None = None
    if previous is None:
        better, reason = True, f"no version held the alias {alias!r}"
    elif previous == version:
        better, reason = True, f"version {version} already holds the alias {alias!r}"
    else:
        tag = client.get_model_version(name, previous).tags.get(metric_name)
        previous_value = _parse_float(tag)
        if previous_value is None:
            better = False
            reason = (f"{alias} version {previous} has no usable {metric_name} tag "
                      f"({tag!r}), so it cannot be compared: alias left in place")
        else:
            better = value > previous_value if higher_is_better else value < previous_value
            relation = "beats" if better else "does not beat"
            reason = (f"{metric_name}={value:g} {relation} {alias} version {previous} "
                      f"({previous_value:g}, {'higher' if higher_is_better else 'lower'} is "
                      "better)")
    if better:
        client.set_registered_model_alias(name, alias, version)
    return RegistrationResult(
        name=name,
        version=version,
        became_champion=better,
        previous_champion_version=previous,
        previous_value=previous_value,
        reason=reason,
    )


def _registered_version(model: str | ModelInfo, name: str, client: MlflowClient) -> str:
    """The version of ``model`` under ``name``: the one registered at log time, else a new one."""
    if isinstance(model, ModelInfo):
        if model.registered_model_version is not None:
            # Registered under this name at log time? (ModelInfo does not keep the name.) Over
            # REST, MLflow 3.17 returns model_id=None: the source URI names the model too.
            try:
                version = client.get_model_version(name, str(model.registered_model_version))
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            else:
                if model.model_id in (version.model_id, _model_id(version.source)):
                    return str(version.version)
        model_id, run_id = model.model_id, model.run_id
    else:
        model_id = _model_id(model)
        if model_id is None:
            # runs:/... and other URIs: MLflow's fluent API resolves them (global registry URI).
            return str(mlflow.register_model(model, name).version)
        run_id = client.get_logged_model(model_id).source_run_id
    try:  # create_model_version alone fails for a new name
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    created = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id
    )
    return str(created.version)


def _model_id(uri: str | None) -> str | None:
    """``m-<id>`` of a ``models:/m-<id>`` URI, else None."""
    match = _LOGGED_MODEL_URI.match(uri or "")
    return None if match is None else match.group(1)


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
