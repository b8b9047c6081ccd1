"""Single-process training on in-memory data: the generated data set, tests, benchmarks.

The distributed job (Ray Train) drives the same ``train_one_epoch`` / ``evaluate`` from
``wsdan.engine`` with Ray Data batches; this module only supplies the batches from memory
and the outer loop.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from wsdan import storage
from wsdan.accel import Accel
from wsdan.backbones import build_backbone
from wsdan.config import TrainConfig
from wsdan.engine import evaluate, train_one_epoch
from wsdan.model import WSDAN, build_model
from wsdan.optim import build_optimizer, scaled_lr
from wsdan.plain import PlainClassifier, plain_evaluate, plain_train_epoch
from wsdan.transforms import resize

log = logging.getLogger(__name__)


@dataclass
class InMemoryData:
    """Images resized once to ``resize_size`` (uint8 N×3×R×R), labels, boxes in R pixels."""

    images: Tensor
    labels: Tensor
    coarse_labels: Tensor | None = None
    object_boxes: Tensor | None = None
    part_boxes: Tensor | None = None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], resize_size: int) -> InMemoryData:
        """From ``wsdan.data.synthetic`` arrays (images N×H×W×3 uint8, boxes in H pixels)."""
        imgs = torch.from_numpy(np.ascontiguousarray(arrays["images"])).permute(0, 3, 1, 2)
        src = imgs.shape[-1]
        imgs = torch.cat([resize(c, resize_size) for c in imgs.split(256)])
        scale = resize_size / src

        def boxes(key: str) -> Tensor | None:
            if key not in arrays:
                return None
            return torch.as_tensor(arrays[key], dtype=torch.float32) * scale

        coarse = arrays.get("coarse_labels")
        return cls(
            images=imgs.contiguous(),
            labels=torch.as_tensor(arrays["labels"], dtype=torch.long),
            coarse_labels=None if coarse is None else torch.as_tensor(coarse, dtype=torch.long),
            object_boxes=boxes("object_boxes"),
            part_boxes=boxes("part_boxes"),
        )

    def __len__(self) -> int:
        return self.labels.numel()

    def batches(
        self, batch_size: int, *, generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        """Shuffled when a generator is given, in order otherwise."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s : s + batch_size]
            batch = {"image": self.images[idx], "label": self.labels[idx]}
            if self.coarse_labels is not None:
                batch["coarse_label"] = self.coarse_labels[idx]
            if self.object_boxes is not None:
                batch["object_box"] = self.object_boxes[idx]
            if self.part_boxes is not None:
                batch["part_box"] = self.part_boxes[idx]
            yield batch

    def steps(self, batch_size: int, drop_last: bool = True) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)


def fit_wsdan(
    cfg: TrainConfig,
    train: InMemoryData,
    val: InMemoryData | None,
    *,
    model: WSDAN | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> tuple[WSDAN, list[dict]]:
    """Train WS-DAN for ``cfg.optim.epochs`` epochs in this process; returns the model and
    per-epoch metrics (train losses, val raw/crop/fused accuracy, localisation)."""
    torch.manual_seed(cfg.seed)
    if model is None:
        m = cfg.model
        model = build_model(m.backbone, num_classes=m.num_classes,
                            num_attentions=m.num_attentions, logit_scale=m.logit_scale,
                            pretrained=m.pretrained, weights=m.weights,
                            sqrt_grad_eps=m.sqrt_grad_eps)
    accel = Accel.from_config(cfg.model, "cpu")
    accel.prepare(model)
    bs = cfg.optim.batch_size
    base_lr = scaled_lr(cfg.optim, bs)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = train.steps(bs)
    history = []
    for epoch in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        metrics = train_one_epoch(model, optimizer, train.batches(bs, generator=gen, drop_last=True),
                                  cfg=cfg, epoch=epoch, steps_per_epoch=steps, base_lr=base_lr,
                                  generator=gen, log=log_fn, accel=accel)
        if val is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(
                model, val.batches(max(bs, 32)), cfg=cfg, accel=accel).items()})
        metrics["epoch"] = epoch + 1
        metrics["epoch_time_s"] = time.perf_counter() - t0
        history.append(metrics)
        if log_fn is not None:
            log_fn(format_epoch(metrics))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return model, history


def format_epoch(m: dict) -> str:
    parts = [f"epoch {m['epoch']}", f"loss {m['loss']:.3f}"]
    for key in ("val_fused_top1", "val_raw_top1", "val_crop_top1", "val_attention_hit_rate"):
        if key in m:
            parts.append(f"{key[4:]} {m[key]:.3f}")
    parts.append(f"{m['images_per_s']:.1f} img/s")
    return " | ".join(parts)


def fit_plain(
    cfg: TrainConfig,
    train: InMemoryData,
    val: InMemoryData | None,
    *,
    num_classes: int,
    label_key: str = "label",
    log_fn: Callable[[str], None] | None = None,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[PlainClassifier, list[dict]]:
    """Train the plain baseline (backbone + GAP + linear) with the same recipe. With
    ``progress``, a bar per epoch (steps, ETA); ``on_epoch(metrics)`` after each epoch."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = PlainClassifier(build_backbone(m.backbone, pretrained=m.pretrained, weights=m.weights),
                            num_classes)
    accel = Accel.from_config(cfg.model, "cpu")
    accel.prepare(model)
    bs = cfg.optim.batch_size
    base_lr = scaled_lr(cfg.optim, bs)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = train.steps(bs)
    history = []
    for epoch in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        batches = train.batches(bs, generator=gen, drop_last=True)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                           unit="step", leave=False)
        metrics = plain_train_epoch(model, optimizer, batches,
                                    cfg=cfg, epoch=epoch, steps_per_epoch=steps, base_lr=base_lr,
                                    generator=gen, label_key=label_key, log=log_fn)
        if val is not None:
            metrics["val_top1"] = plain_evaluate(model, val.batches(max(bs, 32)),
                                                 image_size=cfg.data.image_size, label_key=label_key)
        metrics["epoch"] = epoch + 1
        metrics["epoch_time_s"] = time.perf_counter() - t0
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return model, history


def save_backbone_weights(model: torch.nn.Module, uri: str) -> None:
    """Write the backbone's state dict (torchvision key names) to a local path or s3:// URI,
    in the format ``weights=`` loads."""
    backbone = model.backbone if hasattr(model, "backbone") else model
    buf = io.BytesIO()
    torch.save(backbone.state_dict(), buf)
    storage.write_bytes(uri, buf.getvalue())


def load_synthetic(
    root: str,
    *,
    spec,
    resize_size: int,
    counts: dict[str, int],
    splits: tuple[str, ...] = ("train", "val", "test"),
    progress: bool = True,
) -> dict[str, InMemoryData]:
    """Write the generated data set to ``root`` once (idempotent) and load splits in memory."""
    from wsdan.data.synthetic import load_synthetic_split, write_synthetic_dataset

    write_synthetic_dataset(root, spec=spec, n_train=counts["train"], n_val=counts["val"],
                            n_test=counts["test"], progress=progress)
    return {s: InMemoryData.from_arrays(load_synthetic_split(root, s), resize_size)
            for s in splits}
