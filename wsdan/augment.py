"""Attention-guided data augmentation for a whole batch (docs/algorithm.md §3).

Everything is batched tensor code: no per-sample Python loop and no host sync (no
``.item()``, ``.tolist()`` or data-dependent Python branching), and every random draw takes
a ``torch.Generator`` so that a seed reproduces a step exactly.

Boxes are integer pixel boxes ``(x0, y0, x1, y1)`` with exclusive ends, i.e. the crop of
image b is ``images[b, :, y0:y1, x0:x1]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class AugmentedBatch(NamedTuple):
    crop_images: Tensor  # B×3×H×W
    drop_images: Tensor  # B×3×H×W
    crop_boxes: Tensor  # B×4 long, (x0, y0, x1, y1)
    crop_index: Tensor  # B, attention map used for cropping
    drop_index: Tensor  # B, attention map used for dropping
    crop_theta: Tensor  # B
    drop_theta: Tensor  # B


def sample_attention_indices(
    attentions: Tensor, num_samples: int, generator: torch.Generator | None, eps: float = 1e-12
) -> Tensor:
    """Draw map indices per image with weights ∝ sqrt(mean_hw A_k + eps) (docs/algorithm.md §3.1).

    Inverse-CDF sampling (uniforms looked up in the cumulative weights with
    ``searchsorted``) rather than ``torch.multinomial``, whose CUDA path validates its input
    on the host (a sync).

    Args:
        attentions: A, B×M×h×w (detached here).
    Returns:
        B×num_samples long indices, drawn with replacement.
    """
    weights = torch.sqrt(attentions.detach().float().mean(dim=(2, 3)).clamp(min=0) + eps)  # B×M
    cdf = weights.cumsum(dim=1)
    u = torch.rand(weights.shape[0], num_samples, generator=generator, device=weights.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_(max=weights.shape[1] - 1)


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of B×h×w maps to B×H×W (align_corners=False)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def threshold_mask(maps_up: Tensor, theta: Tensor) -> Tensor:
    """mask = Â ≥ θ·max(Â), the max taken over the *same* upsampled map. B×H×W bool."""
    peak = maps_up.flatten(1).amax(dim=1)  # B
    return maps_up >= (theta * peak)[:, None, None]


def _first_true(x: Tensor) -> Tensor:
    """Index of the first True along the last dim (0 when none)."""
    return x.to(torch.uint8).argmax(dim=-1)


def mask_to_boxes(mask: Tensor, padding: float) -> Tensor:
    """Tight box of each mask, padded by ``padding``·H (·W) on each side, clipped.

    An empty mask gives the whole image. Args: mask B×H×W bool. Returns B×4 long
    (x0, y0, x1, y1), ends exclusive.
    """
    _, h, w = mask.shape
    rows = mask.any(dim=2)  # B×H
    cols = mask.any(dim=1)  # B×W
    y_first = _first_true(rows)
    y_last = h - 1 - _first_true(rows.flip(-1))
    x_first = _first_true(cols)
    x_last = w - 1 - _first_true(cols.flip(-1))
    pad_y, pad_x = int(padding * h), int(padding * w)  # Python ints from shapes: no sync
    y0 = (y_first - pad_y).clamp(min=0)
    y1 = (y_last + 1 + pad_y).clamp(max=h)
    x0 = (x_first - pad_x).clamp(min=0)
    x1 = (x_last + 1 + pad_x).clamp(max=w)
    # An empty mask: the whole image (Python scalars in torch.where: no host-to-device copy).
    empty = ~rows.any(dim=1)  # B
    x0, y0 = torch.where(empty, 0, x0), torch.where(empty, 0, y0)
    x1, y1 = torch.where(empty, w, x1), torch.where(empty, h, y1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop every image to its box and resize it to ``size`` (bilinear), in one batched op.

    Output pixel (i, j) of image b is the bilinear sample of the *image* at
    ``y = y0 + (i + 0.5)·(y1 − y0)/out_h − 0.5``, ``x = x0 + (j + 0.5)·(x1 − x0)/out_w − 0.5``,
    coordinates clamped to the image (border). These are the sample points of
    ``F.interpolate(images[b:b+1, :, y0:y1, x0:x1], size, mode="bilinear",
    align_corners=False)``, and the two agree wherever a sample point lies between the
    centres of the box's first and last pixels. Within half a pixel of the box's edges,
    interpolating the *cut-out* window clamps to its edge pixels, while this blends in the
    image's pixels just outside the box (the crop of a region of the image, not of a
    cut-out; at the image's own border both clamp). A box as large as the output copies
    pixels exactly. ``tests/test_augment.py`` pins this against both references.

    One ``torchvision.ops.roi_align`` call (``aligned=True``, one sample per output pixel):
    a single kernel on CPU and GPU, no loop, no host sync; 1.4–1.75× faster on the CPU than
    the hand-written separable gathers it replaces (BENCHMARKS.md, bench_step).

    Args:
        images: B×C×H×W float. boxes: B×4 (x0, y0, x1, y1), ends exclusive, non-empty.
    Returns:
        B×C×size[0]×size[1], the dtype of ``images``.
    """
    from torchvision.ops import roi_align

    # In fp32 whatever the images' dtype: bf16 cannot even hold pixel coordinates > 256.
    x = images.float()
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
    rois = torch.cat([index[:, None], boxes.to(x.dtype)], dim=1)  # B×5: (b, x0, y0, x1, y1)
    out = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=1,
                    aligned=True)
    return out.to(images.dtype)


def attention_crop(
    images: Tensor, maps: Tensor, theta: Tensor, padding: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Attention cropping (docs/algorithm.md §3.2).

    Args:
        images: B×3×H×W. maps: B×h×w, one attention map per image. theta: B thresholds.
    Returns:
        (crops B×3×H×W resized back to the input size, boxes B×4 long).
    """
    h, w = images.shape[-2:]
    mask = threshold_mask(upsample_maps(maps, (h, w)), theta)
    boxes = mask_to_boxes(mask, padding)
    return crop_and_resize(images, boxes, (h, w)), boxes


def attention_drop(images: Tensor, maps: Tensor, theta: Tensor, fill: Tensor | None = None) -> Tensor:
    """Attention dropping (docs/algorithm.md §3.3): erase pixels where Â ≥ θ·max(Â).

    ``fill`` (3 values) is what erased pixels become; the model's normalisation mean makes
    them zero after normalisation, as in the public codes, which drop normalised input.
    """
    h, w = images.shape[-2:]
    drop = threshold_mask(upsample_maps(maps, (h, w)), theta)[:, None]  # B×1×H×W
    value = torch.zeros((), dtype=images.dtype, device=images.device) if fill is None \
        else fill.view(1, -1, 1, 1).to(images.dtype)
    return torch.where(drop, value, images)  # one pass; cheaper than x·m + f·(1 − m)


def _uniform(b: int, low: float, high: float, like: Tensor, generator) -> Tensor:
    u = torch.rand(b, generator=generator, device=like.device, dtype=torch.float32)
    return low + (high - low) * u


def augment_batch(
    images: Tensor,
    attentions: Tensor,
    *,
    generator: torch.Generator | None,
    crop_theta: tuple[float, float] = (0.4, 0.6),
    drop_theta: tuple[float, float] = (0.2, 0.5),
    crop_padding: float = 0.1,
    fill: Tensor | None = None,
) -> AugmentedBatch:
    """Pick one map per image for cropping and one for dropping, then crop and drop.

    Args:
        images: B×3×H×W training images (model input scale).
        attentions: A, B×M×h×w from the raw pass; detached here, so no gradient flows
            through the map selection or the masks.
        generator: the step's generator (same device as the images).
    """
    attentions = attentions.detach()
    b = images.shape[0]
    idx = sample_attention_indices(attentions, 2, generator)  # B×2
    crop_idx, drop_idx = idx[:, 0], idx[:, 1]
    ar = torch.arange(b, device=images.device)
    theta_c = _uniform(b, *crop_theta, images, generator)
    theta_d = _uniform(b, *drop_theta, images, generator)
    crops, boxes = attention_crop(images, attentions[ar, crop_idx], theta_c, crop_padding)
    drops = attention_drop(images, attentions[ar, drop_idx], theta_d, fill)
    return AugmentedBatch(crops, drops, boxes, crop_idx, drop_idx, theta_c, theta_d)
