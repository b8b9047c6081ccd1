"""wsdan.tracking.registry on a real MLflow server (slow tests); the run helpers of
wsdan.tracking.runs that need no server (fast tests)."""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from wsdan.config import TrainConfig
from wsdan.tracking import attention_figure, confusion_figure, register_if_better
from wsdan.tracking.registry import champion_version
from wsdan.tracking.runs import (
    REDACTED,
    config_params,
    local_tracking_uri,
    redact,
    resolve_tracking_uri,
    setup_experiment,
)

METRIC = "val_fused_top1"

# -- registry (real server) -----------------------------------------------------------------


@pytest.fixture
def registry(mlflow_env, monkeypatch):
    """(client, registered model name, a function that makes a new logged model's URI)."""
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    client = MlflowClient()
    name = f"wsdan-registry-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)

    def new_model_uri() -> str:
        # An external model: a logged model with no artifacts, enough for the registry.
        model = mlflow.create_external_model(name="model", experiment_id=experiment_id)
        return f"models:/{model.model_id}"

    return client, name, new_model_uri


@pytest.mark.slow
def test_alias_moves_only_to_a_better_version(registry):
    client, name, new_model_uri = registry
    assert champion_version(name) is None  # no such model yet

    first = register_if_better(new_model_uri(), name, METRIC, 0.60)
    assert first.version == "1" and first.became_champion
    assert first.previous_champion_version is None and first.previous_value is None
    assert "no version held" in first.reason
    assert champion_version(name) == "1"

    worse = register_if_better(new_model_uri(), name, METRIC, 0.55)
    assert worse.version == "2" and not worse.became_champion
    assert worse.previous_champion_version == "1" and worse.previous_value == 0.60
    assert "does not beat" in worse.reason and "version 1" in worse.reason
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version(name, "2").tags[METRIC] == "0.55"

    better = register_if_better(new_model_uri(), name, METRIC, 0.70)
    assert better.version == "3" and better.became_champion
    assert better.previous_champion_version == "1" and better.previous_value == 0.60
    assert "beats" in better.reason
    assert client.get_model_version_by_alias(name, "champion").version == "3"

    tie = register_if_better(new_model_uri(), name, METRIC, 0.70)
    assert not tie.became_champion  # a tie keeps the incumbent
    assert champion_version(name) == "3"
    assert [client.get_model_version(name, v).tags[METRIC] for v in "1234"] == [
        "0.6", "0.55", "0.7", "0.7"
    ]


@pytest.mark.slow
def test_lower_is_better_and_untagged_champion(registry):
    client, name, new_model_uri = registry
    assert register_if_better(new_model_uri(), name, "val_loss", 0.5,
                              higher_is_better=False).became_champion
    lower = register_if_better(new_model_uri(), name, "val_loss", 0.4, higher_is_better=False)
    assert lower.became_champion and lower.previous_value == 0.5

    # A champion set by hand, without the metric tag, cannot be compared: it stays.
    manual = mlflow.register_model(new_model_uri(), name).version
    client.set_registered_model_alias(name, "champion", manual)
    result = register_if_better(new_model_uri(), name, "val_loss", 0.1, higher_is_better=False)
    assert not result.became_champion
    assert result.previous_champion_version == str(manual) and result.previous_value is None
    assert "no usable val_loss tag" in result.reason
    assert champion_version(name) == str(manual)

    with pytest.raises(ValueError, match="finite"):
        register_if_better(new_model_uri(), name, "val_loss", float("nan"))


# -- run helpers (no server) ---------------------------------------------------------------


def test_config_params_are_flat_redacted_and_cut():
    cfg = TrainConfig.from_dict({
        "model": {"backbone": "resnet18_layer3", "num_classes": 3,
                  "weights": "s3://AKIAEXAMPLE:topsecret@bucket/w.pt"},
        "data": {"source": "https://host/data?X-Amz-Signature=abcdef&part=1" + "x" * 7000},
    })  # fmt: skip
    params = config_params(cfg)
    assert params["model.backbone"] == "resnet18_layer3"
    assert params["model.num_classes"] == "3"
    assert params["model.sqrt_grad_eps"] == "0.0001"
    assert params["model.weights"] == f"s3://{REDACTED}@bucket/w.pt"
    source = params["data.source"]
    assert "abcdef" not in source and f"X-Amz-Signature={REDACTED}&part=1" in source
    assert len(source) == 6000 and source.endswith("...")
    assert set(params) == set(cfg.flat())
    assert redact("s3.secret_key", "hunter2") == REDACTED
    assert redact("api_token", 12) == 12  # numbers are not secrets
    assert redact("optim.lr", "1e-3") == "1e-3"


def test_resolve_tracking_uri(tmp_path):
    assert resolve_tracking_uri(environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == \
        "http://127.0.0.1:5000"
    uri = resolve_tracking_uri(tmp_path / ".wsdan", environ={})
    assert uri == f"sqlite:///{tmp_path.resolve()}/.wsdan/mlflow.db"
    assert (tmp_path / ".wsdan").is_dir()


@pytest.mark.slow  # ~6 s: MLflow creates and migrates a fresh sqlite store
def test_local_experiment_keeps_artifacts_under_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    root = tmp_path / ".wsdan"
    try:
        experiment_id = setup_experiment("wsdan/demo run", root=root)
        assert mlflow.get_tracking_uri() == local_tracking_uri(root)
        experiment = MlflowClient().get_experiment(experiment_id)
        assert experiment.name == "wsdan/demo run"
        assert experiment.artifact_location == (root / "mlartifacts" / "wsdan_demo_run").as_uri()
        assert setup_experiment("wsdan/demo run", root=root) == experiment_id  # idempotent
    finally:
        mlflow.set_tracking_uri(None)


def test_attention_figure_draws_image_heat_and_box():
    images = torch.rand(5, 3, 32, 32)
    attention = torch.rand(5, 4, 4)
    boxes = torch.tensor([[2, 3, 20, 30]] * 5)
    fig = attention_figure(images, attention, boxes, [0, 1, 2, 0, 1], [0, 1, 1, 0, 2],
                           ["a", "b", "c"], columns=3)
    axes = fig.get_axes()
    assert len(axes) == 4 * 3  # 2 grid rows × (image row + heat row) × 3 columns
    image_ax, heat_ax = axes[0], axes[3]
    assert len(image_ax.images) == 1 and len(heat_ax.images) == 2
    assert len(image_ax.patches) == 1
    rect = image_ax.patches[0]
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (2, 3, 18, 27)
    assert image_ax.get_title() == "true a\npred a"
    assert axes[2].get_title() == "true c\npred b"  # the third image: wrong
    assert axes[2].title.get_color() == "red"
    heat = heat_ax.images[1].get_array()
    assert heat.shape == (32, 32) and float(np.max(heat)) == pytest.approx(1.0)
    fig.canvas.draw()  # renders without pyplot


def test_confusion_figure_shows_counts():
    cm = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]])
    fig = confusion_figure(cm, ["a", "b", "c"])
    ax = fig.get_axes()[0]
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(shown, cm / cm.sum(axis=1, keepdims=True))
    assert [t.get_text() for t in ax.texts][:3] == ["5", "1", "0"]
    with pytest.raises(ValueError, match="K×K"):
        confusion_figure(cm, ["a", "b"])
