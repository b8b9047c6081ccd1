"""The training step under Ray Train DDP (two workers, gloo) equals one process.

Two Ray Train workers each take half of every global batch. With BatchNorm on running
statistics (eval mode: a sample's output then does not depend on which rank's batch it is
in; torch's SyncBatchNorm has no CPU path), one attention map (so the map choice is not
random) and fixed thresholds, the step is deterministic, and the distributed run must match
one process that sees whole batches:
feature centres bitwise identical on both ranks and within 1e-6 of the single process,
model weights identical on both ranks.
"""

from pathlib import Path

import pytest
import torch

from wsdan.config import AugmentConfig, OptimConfig
from wsdan.model import build_model
from wsdan.optim import build_optimizer
from wsdan.train_step import train_step, unwrap

pytestmark = pytest.mark.slow

AUG = AugmentConfig(crop_theta_low=0.5, crop_theta_high=0.5, drop_theta_low=0.35,
                    drop_theta_high=0.35)
OPT = OptimConfig(lr=0.01, grad_clip_norm=5.0, center_beta=0.05)


def _model():
    torch.manual_seed(0)
    return build_model("resnet18_layer3", num_classes=4, num_attentions=1).eval()


def _run(model, batches, rank=0, world=1):
    opt = build_optimizer(unwrap(model), OPT, OPT.lr)
    for x, y in batches:
        per = x.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        train_step(model, opt, x[sl], y[sl], generator=torch.Generator().manual_seed(0),
                   augment=AUG, optim=OPT)
    return unwrap(model)


def _loop(config):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = ray.train.torch.prepare_model(_model())
    core = _run(model, config["batches"], rank, world)
    torch.save({k: v.clone() for k, v in core.state_dict().items()},
               Path(config["out"]) / f"rank{rank}.pt")


def test_two_workers_match_one_process(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wsdan.launcher import fit

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 3, 64, 64, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(3)]
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"batches": batches, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="sync-check", storage_path=str(tmp_path / "runs")),
    )
    fit(trainer)  # as the job does: Ray Train's Ctrl-C handler would keep its controller alive
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ in {key}"
    single = _run(_model(), batches).state_dict()
    centres = r0["feature_centers"]
    assert centres.abs().sum() > 0
    torch.testing.assert_close(centres, single["feature_centers"], atol=1e-6, rtol=0)

