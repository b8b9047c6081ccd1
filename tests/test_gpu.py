"""The step on a GPU: no host sync in a training step or a prediction, bf16 by default,
channels_last, the batched crop. Skipped where CUDA is absent; ``infra/gpu_check.sh`` runs
these with ``python -m jobs.bench_gpu`` on a GPU machine."""

import copy

import pytest
import torch

from wsdan.accel import Accel
from wsdan.config import AugmentConfig, ModelConfig, OptimConfig
from wsdan.inference import predict
from wsdan.model import build_model
from wsdan.optim import build_optimizer
from wsdan.train_step import train_step
from wsdan.transforms import train_transform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _setup(b=8, size=96):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=10, num_attentions=8).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    images = torch.randint(0, 256, (b, 3, size + 16, size + 16), dtype=torch.uint8,
                           generator=g, device=dev)
    labels = torch.randint(0, 10, (b,), generator=g, device=dev)
    return dev, model, images, labels, g


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_train_step_and_predict_make_no_host_sync(precision, channels_last):
    dev, model, images, labels, g = _setup()
    acc = Accel(device=dev, precision=precision, channels_last=channels_last)
    acc.prepare(model)
    oc = OptimConfig(lr=0.01, grad_clip_norm=10.0)
    opt = build_optimizer(model, oc, oc.lr)

    def step():
        x = train_transform(images, 96, generator=g)
        return train_step(model, opt, x, labels, generator=g, augment=AugmentConfig(),
                          optim=oc, accel=acc)

    step()  # warm-up: lazy initialisation (cuBLAS handles, optimiser state) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = step()
        model.eval()
        with acc.autocast():
            out = predict(model, acc.inputs(images[:, :, 8:104, 8:104].float() / 255))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.loss) and out.logits.shape == (8, 10)


def test_bf16_is_the_default_on_a_gpu_with_it_and_matches_fp32():
    dev, model, images, labels, _ = _setup()
    acc = Accel.from_config(ModelConfig(backbone="resnet18_layer3", num_classes=10), dev)
    if torch.cuda.is_bf16_supported():
        assert acc.precision == "bf16" and acc.channels_last
    oc = OptimConfig(lr=0.01)
    x = images[:, :, 8:104, 8:104].float() / 255
    losses = {}
    for name, a in (("fp32", Accel(device=dev, precision="fp32")), ("auto", acc)):
        m = copy.deepcopy(model)
        a.prepare(m)
        res = train_step(m, build_optimizer(m, oc, oc.lr), x, labels,
                         generator=torch.Generator(device=dev).manual_seed(1),
                         augment=AugmentConfig(), optim=oc, accel=a)
        losses[name] = float(res.loss_raw)
    assert abs(losses["auto"] / losses["fp32"] - 1) < 0.02
