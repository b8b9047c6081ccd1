"""Model cards and run provenance, read back from a real tracking server and registry."""

import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from wsdan.config import TrainConfig
from wsdan.tracking.card import (
    apply_card,
    log_run_provenance,
    manifest_digest,
    model_card,
    source_info,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MANIFEST = {"name": "birds-k3", "classes": ["auklet", "bunting", "crow"], "num_classes": 3,
            "counts": {"train": 30, "val": 9, "test": 0}, "shards": {"train": ["a"], "val": ["b"]}}


def test_digest_is_stable_and_changes_with_the_data():
    assert manifest_digest(MANIFEST) == manifest_digest(dict(reversed(MANIFEST.items())))
    other = {**MANIFEST, "counts": {"train": 31, "val": 9, "test": 0}}
    assert manifest_digest(other) != manifest_digest(MANIFEST)


def test_source_info_is_this_checkouts_commit(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    info = source_info()
    assert info["commit"] == head.stdout.strip() and info["dirty"] in (True, False)
    monkeypatch.setenv("WSDAN_GIT_COMMIT", "abc123")
    monkeypatch.setenv("WSDAN_GIT_DIRTY", "false")
    assert source_info(tmp_path) == {"commit": "abc123", "dirty": False}  # no git there


def test_card_and_provenance_read_back_from_server_and_registry(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    try:
        client = MlflowClient()
        cfg = TrainConfig.from_dict({"model": {"backbone": "resnet18_layer3", "num_classes": 3,
                                               "num_attentions": 8},
                                     "data": {"source": "s3://wsdan-data/birds-k3"}})
        exp = client.create_experiment("wsdan-card-test")
        with mlflow.start_run(experiment_id=exp) as run:
            prov = log_run_provenance(cfg.data.source, MANIFEST)
        desc, tags = model_card(cfg, MANIFEST, {"val_fused_top1": 0.8125, "loss": 1.0},
                                run_id=run.info.run_id, source=prov)
        client.create_registered_model("card-test")
        version = client.create_model_version("card-test", source="s3://wsdan-data/model",
                                              run_id=run.info.run_id).version
        apply_card("card-test", version, desc, tags, client=client)

        got = client.get_run(run.info.run_id)
        assert got.data.tags["mlflow.source.git.commit"] == source_info()["commit"]
        inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
        assert set(inputs) == {"birds-k3/train", "birds-k3/val"}  # no test images: not listed
        train = inputs["birds-k3/train"]
        assert train.dataset.digest == manifest_digest(MANIFEST)
        assert "s3://wsdan-data/birds-k3" in train.dataset.source
        assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"

        mv = client.get_model_version("card-test", version)
        assert manifest_digest(MANIFEST) in mv.description
        assert "resnet18_layer3" in mv.description and "M=8" in mv.description
        assert "val_fused_top1 0.8125" in mv.description
        assert source_info()["commit"] in mv.description
        assert "auklet, bunting, crow" in mv.description
        assert mv.tags["data.source"] == "s3://wsdan-data/birds-k3"
        assert mv.tags["data.digest"] == manifest_digest(MANIFEST)
        assert mv.tags["model.num_attentions"] == "8"
        assert mv.tags["val_fused_top1"] == "0.8125"
        assert "loss" not in mv.tags  # only the card's metrics
        assert mv.run_id == run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)
