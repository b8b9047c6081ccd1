"""Learning check (slow): from the stand-in pretrained backbone, a short WS-DAN fine-tune on
the generated fine-grained set is far above chance and its attention finds the object."""

from types import SimpleNamespace

import pytest

from jobs import pretrain
from wsdan.config import TrainConfig
from wsdan.data.synthetic import SyntheticSpec
from wsdan.engine import evaluate
from wsdan.local import fit_wsdan, load_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.learning]


@pytest.fixture(scope="session")
def pretrained_weights(tmp_path_factory):
    """A short run of the real pretraining job (smaller than the demo's)."""
    out = tmp_path_factory.mktemp("weights") / "backbone.pt"
    result = pretrain.main(SimpleNamespace(
        config="jobs/configs/pretrain_synthetic.yaml", out=str(out), n_train=1200, n_val=300,
        data_seed=1000, force=False, no_progress=True,
        overrides=["optim.epochs=3", "optim.lr=0.05", "optim.lr_step_epochs=2"]))
    # It learned something (the fine-tune test below is what the weights are for).
    print(f"stand-in pretraining: val top-1 {result['val_top1']:.3f}, chance {result['chance']:.3f}")
    assert result["val_top1"] > 1.3 * result["chance"]
    return str(out)


def test_wsdan_fine_tune_beats_chance_and_attends_to_the_object(pretrained_weights, tmp_path):
    cfg = TrainConfig.from_yaml("jobs/configs/synthetic_cpu.yaml", [
        f"model.weights={pretrained_weights}", "optim.epochs=3",
        f"data.source={tmp_path / 'data'}"])
    spec = SyntheticSpec(num_classes=cfg.model.num_classes, image_size=128, seed=0)
    data = load_synthetic(cfg.data.source, spec=spec, resize_size=cfg.data.resize_size,
                          counts={"train": 640, "val": 0, "test": 300},
                          splits=("train", "test"), progress=False)
    model, hist = fit_wsdan(cfg, data["train"], None)
    assert hist[-1]["loss"] < hist[0]["loss"] or hist[-1]["train_raw_top1"] > 0.3
    m = evaluate(model, data["test"].batches(64), cfg=cfg)
    print(f"fine-tune: test fused top-1 {m['fused_top1']:.3f}, attention in object "
          f"{m['attention_hit_rate']:.3f}")
    chance = 1 / cfg.model.num_classes
    assert m["fused_top1"] >= 3 * chance, m
    assert m["attention_hit_rate"] > 0.5, m
