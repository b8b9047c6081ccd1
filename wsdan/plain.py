"""The plain baseline: backbone → global average pooling → linear classifier.

Used (1) to pretrain a backbone on the generated data set's coarse task, which stands in
for ImageNet pretraining on machines that cannot download weights, and (2) as the
fine-tuning baseline that WS-DAN has to beat in ``jobs.bench_learning``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsdan.backbones import Backbone
from wsdan.config import TrainConfig
from wsdan.optim import lr_factor, set_lr
from wsdan.transforms import center_crop, train_transform


class PlainClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, num_classes)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)  # B×C×h×w
        return self.fc(feats.mean(dim=(2, 3)))  # B×K


def plain_train_epoch(
    model: PlainClassifier,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, Tensor]],
    *,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    base_lr: float,
    generator: torch.Generator,
    label_key: str = "label",
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """One epoch of cross-entropy training with the same transforms as WS-DAN."""
    model.train()
    total, correct, n = 0.0, 0, 0
    for i, batch in enumerate(batches):
        set_lr(optimizer, base_lr, lr_factor(cfg.optim, epoch + i / steps_per_epoch))
        x = train_transform(batch["image"], cfg.data.image_size, generator=generator,
                            hflip=cfg.data.hflip, brightness=cfg.data.brightness,
                            saturation=cfg.data.saturation)
        y = batch[label_key]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        total += loss.item() * y.numel()
        correct += int((logits.argmax(1) == y).sum())
        n += y.numel()
    if log is not None:
        log(f"epoch {epoch}: loss {total / max(n, 1):.4f} train top1 {correct / max(n, 1):.3f}")
    return {"loss": total / max(n, 1), "train_top1": correct / max(n, 1)}


@torch.no_grad()
def plain_evaluate(
    model: PlainClassifier, batches: Iterable[dict[str, Tensor]], *, image_size: int,
    label_key: str = "label",
) -> float:
    """Top-1 accuracy with the eval transform (centre crop)."""
    model.eval()
    correct, n = 0, 0
    for batch in batches:
        logits = model(center_crop(batch["image"], image_size))
        correct += int((logits.argmax(1) == batch[label_key]).sum())
        n += batch[label_key].numel()
    return correct / max(n, 1)
