"""Inference with object localisation and refinement (docs/algorithm.md §4).

A_mean = mean_k A_k → box where the upsampled A_mean ≥ θ·max (θ = 0.1), padded by 5 % →
crop and resize → second pass → prediction = (logits_raw + logits_crop) / 2.
The box and A_mean localise the object and feed the heat-map pictures.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from wsdan.augment import crop_and_resize, mask_to_boxes, threshold_mask, upsample_maps


class InferenceOutput(NamedTuple):
    logits: Tensor  # B×K fused: (raw + crop) / 2
    logits_raw: Tensor  # B×K
    logits_crop: Tensor  # B×K
    attention_mean: Tensor  # B×h×w, mean over the M maps
    boxes: Tensor  # B×4 long (x0, y0, x1, y1) in input pixels, ends exclusive


def refinement_boxes(
    attention_mean: Tensor, size: tuple[int, int], theta: float = 0.1, padding: float = 0.05
) -> Tensor:
    """Boxes (B×4 long) where the upsampled mean attention reaches θ of its peak."""
    up = upsample_maps(attention_mean, size)
    theta_t = torch.full((up.shape[0],), theta, device=up.device, dtype=up.dtype)
    return mask_to_boxes(threshold_mask(up, theta_t), padding)


def attention_peaks(attention_mean: Tensor, size: tuple[int, int]) -> Tensor:
    """(x, y) of the peak of each upsampled mean map, in input pixels. B×2 long."""
    up = upsample_maps(attention_mean, size)  # B×H×W
    flat = up.flatten(1).argmax(dim=1)
    w = size[1]
    return torch.stack([flat % w, flat // w], dim=1)


@torch.no_grad()
def predict(
    model: nn.Module, images: Tensor, *, theta: float = 0.1, padding: float = 0.05
) -> InferenceOutput:
    """Refined prediction for B×3×H×W images in [0, 1]; the model should be in eval mode."""
    h, w = images.shape[-2:]
    raw = model(images)
    attn_mean = raw.attention_maps.mean(dim=1)  # B×h×w
    boxes = refinement_boxes(attn_mean, (h, w), theta, padding)
    crops = crop_and_resize(images, boxes, (h, w))
    logits_crop = model(crops).logits
    fused = (raw.logits + logits_crop) / 2
    return InferenceOutput(fused, raw.logits, logits_crop, attn_mean, boxes)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two B×4 (x0, y0, x1, y1) box tensors (float)."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


def points_in_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """Whether each (x, y) point (pixel index) lies inside its box. B bool."""
    p = points.to(torch.float32) + 0.5  # pixel centre
    b = boxes.to(torch.float32)
    return (p[:, 0] >= b[:, 0]) & (p[:, 0] <= b[:, 2]) & (p[:, 1] >= b[:, 1]) & (p[:, 1] <= b[:, 3])
