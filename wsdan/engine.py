"""Plain training and evaluation loops (torchvision-references style) over batch iterators.

The single-process trainer (``wsdan.local``) and the benchmarks call these; the Ray Train
worker loop calls the same ``train_one_epoch`` / ``evaluate`` with its own batch iterator.
A batch is a dict with ``image`` (uint8 B×3×R×R, resized), ``label`` (B long) and optionally
``object_box`` / ``part_box`` (B×4 float in the resized image's pixels, NaN when unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from wsdan.accel import Accel
from wsdan.config import TrainConfig
from wsdan.inference import predict
from wsdan.metrics import EvalCounts
from wsdan.optim import lr_factor, set_lr
from wsdan.train_step import train_step
from wsdan.transforms import center_crop, train_transform

Batch = dict[str, Tensor]


def eval_boxes(boxes: Tensor, resized: int, crop: int) -> Tensor:
    """Boxes in the resized image → boxes in the centre-cropped eval input."""
    off = (resized - crop) // 2
    return (boxes - off).clamp(0, crop)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    base_lr: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
    log_every: int = 20,
    accel: Accel | None = None,
    progress: Callable[[int, int, int, int, float], None] | None = None,
) -> dict[str, float]:
    """One epoch of WS-DAN steps; returns mean losses, accuracy on raw images, img/s and
    the fraction of wall time spent waiting for data.

    ``accel``: precision and memory format (default: from ``cfg.model`` for ``device``;
    pass the job's own so that an fp16 gradient scaler keeps its state across epochs).
    The running sums stay on the device: the host reads them every ``log_every`` steps
    (only when logging) and at the end of the epoch, not every step.

    ``progress(epoch, step, steps_per_epoch, images, elapsed_s)`` is called after every
    step with counts the loop keeps on the host anyway (no sync); it throttles itself
    (``wsdan.progress.StepReporter``).
    """
    model.train()
    accel = accel if accel is not None else Accel.from_config(cfg.model, device)
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    n_img, wait, t0 = 0, 0.0, time.perf_counter()
    lr = base_lr
    t_wait = time.perf_counter()
    for i, batch in enumerate(batches):
        wait += time.perf_counter() - t_wait
        lr = set_lr(optimizer, base_lr, lr_factor(cfg.optim, epoch + i / steps_per_epoch))
        images = train_transform(
            batch["image"].to(device, non_blocking=True),
            cfg.data.image_size,
            generator=generator,
            hflip=cfg.data.hflip,
            brightness=cfg.data.brightness,
            saturation=cfg.data.saturation,
        )
        labels = batch["label"].to(device, non_blocking=True)
        res = train_step(model, optimizer, images, labels, generator=generator,
                         augment=cfg.augment, optim=cfg.optim, accel=accel)
        b = labels.numel()
        correct = (res.logits_raw.argmax(1) == labels).sum()
        sums += torch.stack([res.loss * b, res.loss_raw * b, res.loss_crop * b,
                             res.loss_drop * b, res.loss_center * b,
                             correct.to(res.loss.dtype)]).double()
        n_img += b
        if progress is not None:
            progress(epoch, i + 1, steps_per_epoch, n_img, time.perf_counter() - t0)
        if log is not None and (i + 1) % log_every == 0:
            log(f"epoch {epoch} step {i + 1}/{steps_per_epoch} loss {res.loss.item():.4f} "
                f"lr {lr:.2e}")
        t_wait = time.perf_counter()
    elapsed = time.perf_counter() - t0
    s = (sums / max(n_img, 1)).tolist()  # the epoch's one read of the sums
    return {
        "loss": s[0], "loss_raw": s[1], "loss_crop": s[2], "loss_drop": s[3],
        "loss_center": s[4], "train_raw_top1": s[5], "lr": lr,
        "images_per_s": n_img / elapsed if elapsed > 0 else 0.0, "train_images": n_img,
        "data_wait_fraction": wait / elapsed if elapsed > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    distributed: bool = False,
    confusion: bool = False,
    accel: Accel | None = None,
) -> dict[str, Any]:
    """Refined evaluation (docs/algorithm.md §4): raw/crop/fused top-1/top-5 and, where boxes
    exist, refinement-box IoU and attention-peak hit rates. With ``distributed``, counts
    are summed over ranks before dividing. With ``confusion``, the result also holds
    ``"confusion"``: the K×K counts of the fused prediction (a CPU long tensor)."""
    model.eval()
    accel = accel if accel is not None else Accel.from_config(cfg.model, device)
    counts = EvalCounts(device, num_classes=cfg.model.num_classes if confusion else None)
    size = cfg.data.image_size
    for batch in batches:
        images = center_crop(batch["image"].to(device, non_blocking=True), size)
        labels = batch["label"].to(device, non_blocking=True)
        with accel.autocast():
            out = predict(model, accel.inputs(images), theta=cfg.inference.refine_theta,
                          padding=cfg.inference.refine_padding)
        boxes = {}
        for key in ("object_box", "part_box"):
            if key in batch:
                boxes[key] = eval_boxes(batch[key].to(device).float(),
                                        batch["image"].shape[-1], size)
        counts.update(out, labels, boxes.get("object_box"), boxes.get("part_box"),
                      image_size=(size, size))
    if distributed:
        counts.all_reduce()
    result: dict[str, Any] = counts.metrics()
    if confusion:
        result["confusion"] = counts.confusion()
    return result
