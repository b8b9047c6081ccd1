"""One WS-DAN training step (docs/algorithm.md §2-3), shared by the single-process loop and the
Ray Train workers.

raw pass → L_A with the pre-update centres → centre update (all-reduced when distributed)
→ attention crop and drop of the raw images → crop pass, drop pass →
loss = (CE_raw + CE_crop + CE_drop)/3 + λ·L_A → one backward → (clip) → optimiser step.

No host sync happens here (fp32 and bf16; fp16's gradient scaler reads one overflow flag
per step): the returned losses are tensors; converting them to numbers is the caller's
choice (and a sync). ``tests/test_gpu.py`` runs a step and a prediction under
``torch.cuda.set_sync_debug_mode("error")`` where CUDA exists.

Precision and memory format come from an :class:`wsdan.accel.Accel` (``accel=None``: fp32,
default memory format): the forward passes run under its autocast; the losses, the
feature centres and their update are fp32 (``WSDAN.forward_head``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsdan.accel import Accel
from wsdan.augment import augment_batch
from wsdan.centers import center_loss, update_centers_
from wsdan.config import AugmentConfig, OptimConfig
from wsdan.model import WSDAN


class StepResult(NamedTuple):
    loss: Tensor  # total loss (with grad until backward)
    loss_raw: Tensor  # detached scalars from here on
    loss_crop: Tensor
    loss_drop: Tensor
    loss_center: Tensor
    logits_raw: Tensor  # B×K, detached
    crop_boxes: Tensor  # B×4 long
    grad_norm: Tensor | None  # total gradient norm before clipping (None before backward)


def unwrap(model: nn.Module) -> WSDAN:
    """The WS-DAN module inside a DDP (or similar ``.module``) wrapper."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def wsdan_losses(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    generator: torch.Generator | None,
    augment: AugmentConfig,
    center_beta: float,
    center_weight: float,
    update_centers: bool = True,
    sync_centers: bool = True,
    accel: Accel | None = None,
) -> StepResult:
    """Forward passes and loss of one step; updates the feature centres in place.

    Args:
        model: a :class:`WSDAN` or a DDP wrapper of one (in train mode).
        images: B×3×H×W float in [0, 1]. labels: B long.
        generator: drives map selection and thresholds (same device as ``images``).
        sync_centers: all-reduce the centre update when distributed (always, in training;
            off only to measure what the collective costs, ``jobs.bench_sync``).
    """
    core = unwrap(model)
    autocast = accel.autocast if accel is not None else contextlib.nullcontext
    fmt = accel.inputs if accel is not None else (lambda x: x)
    with autocast():
        raw = model(fmt(images))
    # fp32 from here: the head's outputs are fp32 (WSDAN.forward_head), the losses too.
    loss_raw = F.cross_entropy(raw.logits, labels)
    centers = core.feature_centers
    loss_center = center_loss(raw.features, centers, labels)  # pre-update centres
    if update_centers:
        update_centers_(centers, raw.features, labels, center_beta, sync=sync_centers)

    aug = augment_batch(
        images,
        raw.attention_maps,  # detached inside: no gradient through the selection
        generator=generator,
        crop_theta=(augment.crop_theta_low, augment.crop_theta_high),
        drop_theta=(augment.drop_theta_low, augment.drop_theta_high),
        crop_padding=augment.crop_padding,
        fill=core.input_mean,
    )
    with autocast():
        if augment.fuse_crop_drop:
            # One 2B batch: BN sees crops and drops together (speed option, off by default).
            both = model(fmt(torch.cat([aug.crop_images, aug.drop_images]))).logits
            logits_crop, logits_drop = both.chunk(2)
        else:
            logits_crop = model(fmt(aug.crop_images)).logits
            logits_drop = model(fmt(aug.drop_images)).logits
    loss_crop = F.cross_entropy(logits_crop, labels)
    loss_drop = F.cross_entropy(logits_drop, labels)
    loss = (loss_raw + loss_crop + loss_drop) / 3 + center_weight * loss_center
    return StepResult(
        loss,
        loss_raw.detach(),
        loss_crop.detach(),
        loss_drop.detach(),
        loss_center.detach(),
        raw.logits.detach(),
        aug.crop_boxes,
        None,
    )


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    generator: torch.Generator | None,
    augment: AugmentConfig,
    optim: OptimConfig,
    sync_centers: bool = True,
    accel: Accel | None = None,
) -> StepResult:
    """A full step: losses, backward, optional gradient clipping, optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    res = wsdan_losses(
        model,
        images,
        labels,
        generator=generator,
        augment=augment,
        center_beta=optim.center_beta,
        center_weight=optim.center_weight,
        sync_centers=sync_centers,
        accel=accel,
    )
    if accel is not None:
        accel.backward(res.loss)
        accel.unscale(optimizer)  # true gradients for clipping and the reported norm
    else:
        res.loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if optim.grad_clip_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip_norm)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
    if accel is not None:
        accel.step(optimizer)
    else:
        optimizer.step()
    return res._replace(loss=res.loss.detach(), grad_norm=grad_norm.detach())
