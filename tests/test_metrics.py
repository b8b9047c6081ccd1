"""Evaluation counts, boxes and the learning-rate schedule."""

import math

import torch

from wsdan.config import OptimConfig
from wsdan.inference import InferenceOutput, attention_peaks, box_iou, refinement_boxes
from wsdan.metrics import EvalCounts
from wsdan.model import build_model
from wsdan.optim import build_optimizer, lr_factor, scaled_lr


def _out(raw, crop, attn, boxes):
    raw, crop = torch.tensor(raw), torch.tensor(crop)
    return InferenceOutput((raw + crop) / 2, raw, crop, attn, boxes)


def test_counts_accuracy_and_localisation():
    # 3 images, 6 classes; labels 0, 1, 2.
    raw = [[5.0, 1, 0, 0, 0, 0], [0, 0.5, 3, 2, 1, 0], [0, 0, 1, 0, 0, 9]]
    crop = [[0.0, 3, 0, 0, 0, 0], [0, 9, 0, 0, 0, 0], [0, 0, 7, 0, 0, 0]]
    attn = torch.zeros(3, 4, 4)
    attn[0, 0, 0] = 1  # peak at the top-left pixel block
    attn[1, 3, 3] = 1
    attn[2, 1, 2] = 1
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 16, 16], [4, 4, 12, 12]])
    counts = EvalCounts()
    obj = torch.tensor([[0.0, 0, 8, 8], [0, 0, 8, 8], [float("nan")] * 4])
    part = torch.tensor([[0.0, 0, 4, 4], [12, 12, 16, 16], [0, 0, 2, 2]])
    counts.update(_out(raw, crop, attn, boxes), torch.tensor([0, 1, 2]), obj, part, (16, 16))
    m = counts.metrics()
    assert m["n"] == 3
    assert math.isclose(m["raw_top1"], 1 / 3) and math.isclose(m["crop_top1"], 2 / 3)
    # fused: [2.5, 2, ...] ✓; [0, 4.5, 1.5, ...] ✓; [.., 4, .., 4.5] ✗
    assert math.isclose(m["fused_top1"], 2 / 3)
    assert math.isclose(m["raw_top5"], 1.0)
    # IoU over the two images with an object box: 1.0 and 64/256.
    assert math.isclose(m["box_iou"], (1.0 + 0.25) / 2, rel_tol=1e-6)
    peaks = attention_peaks(attn, (16, 16))
    assert peaks[0].tolist() == [1, 1] or peaks[0].tolist()[0] < 4
    assert math.isclose(m["attention_hit_rate"], 0.5)  # image 0 in, image 1 out
    assert math.isclose(m["part_hit_rate"], 2 / 3)  # images 0, 1 in; 2 out


def test_box_iou_and_refinement_boxes():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[5, 0, 15, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([50 / 150, 0.0]))
    attn = torch.zeros(1, 4, 4)
    attn[0, 1:3, 1:3] = 1.0
    box = refinement_boxes(attn, (40, 40), theta=0.5, padding=0.0)[0].tolist()
    assert 5 <= box[0] <= 10 and 30 <= box[2] <= 35 and box[1] == box[0] and box[3] == box[2]


def test_lr_schedule_and_scaling():
    cfg = OptimConfig(lr=0.01, lr_step_epochs=2, lr_gamma=0.5, warmup_epochs=1,
                      base_batch_size=16)
    assert math.isclose(scaled_lr(cfg, 64), 0.04)
    assert math.isclose(lr_factor(cfg, 0.5), 0.5, rel_tol=1e-6)
    assert math.isclose(lr_factor(cfg, 1.0), 1.0)
    assert math.isclose(lr_factor(cfg, 2.0), 0.5) and math.isclose(lr_factor(cfg, 5.9), 0.25)
    assert scaled_lr(OptimConfig(lr=0.01, lr_scaling="none"), 64) == 0.01


def test_optimizer_groups_use_the_head_multiplier():
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=2)
    opt = build_optimizer(model, OptimConfig(head_lr_mult=0.1), 0.02)
    groups = {g["name"]: g for g in opt.param_groups}
    assert math.isclose(groups["head"]["lr"], 0.002) and groups["backbone"]["lr"] == 0.02
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert head_ids == {id(p) for p in [*model.attention.parameters(), model.classifier.weight]}
    n_all = sum(1 for _ in model.parameters())
    assert len(groups["head"]["params"]) + len(groups["backbone"]["params"]) == n_all
