"""Precision, memory format and compilation of the step (wsdan.accel), on the CPU.

The GPU side (bf16 by default, no host sync in a step) is tests/test_gpu.py."""

import copy

import pytest
import torch

from wsdan.accel import Accel, resolve_precision
from wsdan.config import AugmentConfig, ConfigError, ModelConfig, OptimConfig
from wsdan.inference import predict
from wsdan.model import build_model
from wsdan.optim import build_optimizer
from wsdan.train_step import train_step


def _setup(seed=0, b=6, size=64):
    torch.manual_seed(seed)
    model = build_model("resnet18_layer3", num_classes=5, num_attentions=4)
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(b, 3, size, size, generator=g), torch.randint(0, 5, (b,), generator=g)


def _step(model, x, y, accel, seed=1):
    oc = OptimConfig(lr=0.01, grad_clip_norm=10.0)
    opt = build_optimizer(model, oc, oc.lr)
    return train_step(model, opt, x, y, generator=torch.Generator().manual_seed(seed),
                      augment=AugmentConfig(), optim=oc, accel=accel)


def test_precision_resolves_per_device_and_bad_values_name_the_key():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    acc = Accel.from_config(ModelConfig(backbone="resnet18_layer3"), "cpu")
    assert (acc.precision, acc.channels_last, acc.compile, acc.scaler) == ("fp32", False, False, None)
    assert Accel.from_config(ModelConfig(backbone="resnet18_layer3", precision="fp16"),
                             "cpu").scaler is not None
    with pytest.raises(ConfigError, match="precision"):
        ModelConfig(backbone="resnet18_layer3", precision="fp8")
    with pytest.raises(ValueError, match="model.precision"):
        resolve_precision("half", "cpu")


def test_bf16_step_matches_fp32_and_keeps_head_and_centres_in_fp32():
    model, x, y = _setup()
    ref, half = copy.deepcopy(model), copy.deepcopy(model)
    r32 = _step(ref, x, y, None)
    r16 = _step(half, x, y, Accel(device=torch.device("cpu"), precision="bf16"))
    # Same batch, same augmentation seed: the raw-image loss within 2 %, the total (whose
    # crop/drop terms see boxes that may move by a pixel with the maps) within 3 %.
    assert abs(float(r16.loss_raw) / float(r32.loss_raw) - 1) < 0.02
    assert abs(float(r16.loss) / float(r32.loss) - 1) < 0.03
    assert r16.logits_raw.dtype == torch.float32
    assert half.feature_centers.dtype == torch.float32
    # The centre update (β · mean delta of unit-norm features) agrees to a few % of its size.
    moved = ref.feature_centers.abs().max()
    assert moved > 1e-3
    assert (half.feature_centers - ref.feature_centers).abs().max() < 0.05 * moved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(x)
    assert out.features.dtype == out.logits.dtype == out.attention_maps.dtype == torch.float32
    torch.testing.assert_close(out.features.norm(dim=1), torch.ones(6))


def test_fp16_step_scales_and_unscales_gradients():
    # fp16 is for GPUs. On the CPU, torch's fp16 backward of this backbone gives gradients
    # ~20 % off fp32 (bf16: within 5 %), so here only the scaler's mechanics are checked:
    # the same step with loss scale 1 and 16 reports the same (unscaled) gradient norm.
    model, x, y = _setup(b=4, size=32)
    runs = {}
    for scale in (1.0, 16.0):
        acc = Accel(device=torch.device("cpu"), precision="fp16",
                    scaler=torch.amp.GradScaler("cpu", init_scale=scale))
        m = copy.deepcopy(model)
        runs[scale] = (_step(m, x, y, acc), m, acc)
    (r1, m1, _), (r16, m16, acc) = runs[1.0], runs[16.0]
    assert torch.isfinite(r16.grad_norm)
    assert abs(float(r16.grad_norm) / float(r1.grad_norm) - 1) < 0.01  # not 16× it
    assert not torch.equal(m16.classifier.weight, model.classifier.weight)  # step taken
    torch.testing.assert_close(m16.classifier.weight, m1.classifier.weight, atol=1e-4, rtol=1e-3)
    assert acc.scaler.get_scale() == 16.0 and acc.state_dict()["scaler"]["scale"] == 16.0
    fresh = Accel(device=torch.device("cpu"), precision="fp16",
                  scaler=torch.amp.GradScaler("cpu"))
    fresh.load_state_dict(acc.state_dict())  # resumed jobs keep their loss scale
    assert fresh.scaler.get_scale() == 16.0


def test_channels_last_and_compile_give_the_same_step():
    model, x, y = _setup(b=4, size=32)
    ref = _step(copy.deepcopy(model), x, y, None)
    cl = copy.deepcopy(model)
    acc = Accel(device=torch.device("cpu"), precision="fp32", channels_last=True)
    acc.prepare(cl)
    assert cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    r = _step(cl, x, y, acc)
    torch.testing.assert_close(r.loss, ref.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.crop_boxes, ref.crop_boxes)
    # torch.compile (graph capture through autograd.Function and the fp32 head; a cheap
    # backend here, the default inductor in the GPU check), state dict keys unchanged.
    eager, comp = copy.deepcopy(model), copy.deepcopy(model)
    _step(eager, x, y, None)
    acc = Accel(device=torch.device("cpu"), precision="fp32", compile=True,
                compile_backend="aot_eager")
    acc.prepare(comp)
    r = _step(comp, x, y, acc)
    torch.testing.assert_close(r.loss, ref.loss, atol=1e-4, rtol=1e-4)
    assert list(comp.state_dict()) == list(model.state_dict())
    comp.eval()
    eager.eval()
    torch.testing.assert_close(predict(comp, x).logits, predict(eager, x).logits, atol=1e-3,
                               rtol=1e-3)
