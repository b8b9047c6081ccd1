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


def test_confusion_counts_match_a_per_image_loop():
    g = torch.Generator().manual_seed(3)
    k, n = 5, 37
    raw, crop = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    out = InferenceOutput((raw + crop) / 2, raw, crop, torch.zeros(n, 2, 2), torch.zeros(n, 4))
    counts = EvalCounts(num_classes=k)
    for sl in (slice(0, 20), slice(20, n)):  # two batches
        counts.update(InferenceOutput(*(t[sl] for t in out)), labels[sl])
    expected = torch.zeros(k, k, dtype=torch.long)
    for i in range(n):  # independent slow reference
        expected[int(labels[i]), int(((raw[i] + crop[i]) / 2).argmax())] += 1
    assert torch.equal(counts.confusion(), expected)
    assert counts.confusion().sum() == n == counts.metrics()["n"]
    assert math.isclose(counts.metrics()["fused_top1"], expected.trace().item() / n)


def _two_rank_sums(rank: int, world: int, init: str, q) -> None:
    import torch.distributed as dist

    from wsdan.raytrain import reduce_train_metrics

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        per_rank = [  # rank 0 saw 24 images, rank 1 saw 8
            {"loss": 1.0, "loss_raw": 2.0, "loss_crop": 3.0, "loss_drop": 4.0,
             "loss_center": 0.5, "train_raw_top1": 0.25, "data_wait_fraction": 0.1,
             "images_per_s": 30.0, "train_images": 24, "lr": 0.01},
            {"loss": 3.0, "loss_raw": 6.0, "loss_crop": 1.0, "loss_drop": 0.0,
             "loss_center": 1.5, "train_raw_top1": 0.75, "data_wait_fraction": 0.5,
             "images_per_s": 10.0, "train_images": 8, "lr": 0.01},
        ]
        reduced = reduce_train_metrics(per_rank[rank], world)
        g = torch.Generator().manual_seed(0)
        raw, crop = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
        labels = torch.randint(0, 3, (10,), generator=g)
        half = slice(0, 6) if rank == 0 else slice(6, 10)
        out = InferenceOutput((raw + crop) / 2, raw, crop, torch.zeros(10, 2, 2),
                              torch.zeros(10, 4))
        counts = EvalCounts(num_classes=3)
        counts.update(InferenceOutput(*(t[half] for t in out)), labels[half])
        counts.all_reduce()
        q.put((rank, reduced, counts.confusion(), counts.metrics()))
    finally:
        dist.destroy_process_group()


def test_train_metrics_and_confusion_over_two_ranks_equal_one_process(tmp_path):
    """Two gloo ranks: the reduced train metrics are the image-weighted means (images and
    images/s summed), and the all-reduced confusion equals one process that saw all."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path}/pg"
    procs = [ctx.Process(target=_two_rank_sums, args=(r, 2, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        reduced, confusion, metrics = results[rank]
        assert reduced["train_images"] == 32 and reduced["images_per_s"] == 40.0
        assert math.isclose(reduced["loss"], (1.0 * 24 + 3.0 * 8) / 32)
        assert math.isclose(reduced["train_raw_top1"], (0.25 * 24 + 0.75 * 8) / 32)
        assert math.isclose(reduced["data_wait_fraction"], (0.1 * 24 + 0.5 * 8) / 32)
        assert reduced["lr"] == 0.01
        g = torch.Generator().manual_seed(0)
        raw, crop = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
        labels = torch.randint(0, 3, (10,), generator=g)
        single = EvalCounts(num_classes=3)
        single.update(InferenceOutput((raw + crop) / 2, raw, crop, torch.zeros(10, 2, 2),
                                      torch.zeros(10, 4)), labels)
        assert torch.equal(confusion, single.confusion())
        assert metrics == single.metrics()
