"""Checkpoints are read with ``torch.load(weights_only=True)``: a file that would run code
is refused (and does not run), a checkpoint of another model shape is refused naming the
parameters that differ, and a whole one loads to the same weights."""

from __future__ import annotations

import pathlib

import pytest
import torch

from wsdan.config import TrainConfig
from wsdan.model import build_model
from wsdan.raytrain import load_checkpoint, save_checkpoint
from wsdan.weights import WeightsError


def _state(num_attentions: int, cfg_attentions: int | None = None) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=num_attentions)
    cfg = TrainConfig.from_dict({"model": {"backbone": "resnet18_layer3", "num_classes": 3,
                                           "num_attentions": cfg_attentions or num_attentions,
                                           "weights": None}})
    return {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1}


def _checkpoint(path: pathlib.Path):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(path))


class _RunsCode:
    """Pickles to a call of ``Path.touch``: what an unsafe load would execute."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_whole_checkpoint_loads_to_the_same_weights(tmp_path):
    from wsdan.launcher import model_from_checkpoint

    state = _state(2)
    save_checkpoint(tmp_path, state)
    model, loaded = model_from_checkpoint(_checkpoint(tmp_path))
    assert loaded["epoch"] == 1
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(WeightsError, match=r"checkpoint .*state\.pt: refused by "
                                           r"torch\.load\(weights_only=True\)"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    torch.save([1, 2, 3], tmp_path / "state.pt")  # loads, but is not a checkpoint
    with pytest.raises(WeightsError, match="not a wsdan checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(WeightsError, match="refused by"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_of_another_shape_names_the_mismatch(tmp_path):
    from wsdan.launcher import model_from_checkpoint

    save_checkpoint(tmp_path, _state(2, cfg_attentions=4))  # weights of M=2, config says 4
    with pytest.raises(WeightsError, match=r"does not fit the model: shapes differ: .*"
                                           r"attention\.0\.weight \(2, 256, 1, 1\) "
                                           r"\(the model has \(4, 256, 1, 1\)\)"):
        model_from_checkpoint(_checkpoint(tmp_path))
    state = _state(2)
    state["model"] = {k: v for k, v in state["model"].items() if k != "feature_centers"}
    save_checkpoint(tmp_path, state)
    with pytest.raises(WeightsError, match=r"does not fit the model: missing: feature_centers"):
        model_from_checkpoint(_checkpoint(tmp_path))
