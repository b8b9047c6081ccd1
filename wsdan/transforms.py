"""Batched image transforms of the training recipe (docs/algorithm.md §5), as tensor code.

Input: uint8 B×3×R×R images already resized to ``resize_size``. Output: float B×3×S×S in
[0, 1] (the model normalises itself). Train: random crop S, horizontal flip, brightness
and saturation jitter; eval: centre crop. Randomness takes a ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wsdan.augment import crop_and_resize

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def to_float(images: Tensor) -> Tensor:
    """uint8 → float in [0, 1]; float input is returned as is."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def resize(images: Tensor, size: int) -> Tensor:
    """Resize a float or uint8 batch to size×size (bilinear, antialiased); keeps dtype."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(to_float(images), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    if images.dtype == torch.uint8:
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _crop_boxes(offsets_x: Tensor, offsets_y: Tensor, size: int) -> Tensor:
    return torch.stack([offsets_x, offsets_y, offsets_x + size, offsets_y + size], dim=1)


def center_crop(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[-2:]
    y, x = (h - size) // 2, (w - size) // 2
    return to_float(images[..., y : y + size, x : x + size])


def train_transform(
    images: Tensor,
    size: int,
    *,
    generator: torch.Generator | None,
    hflip: bool = True,
    brightness: float = 0.126,
    saturation: float = 0.5,
) -> Tensor:
    """Random crop, flip and colour jitter for a whole batch. Returns B×3×size×size float."""
    x = to_float(images)
    b, _, h, w = x.shape
    dev = x.device
    oy = torch.randint(0, h - size + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, w - size + 1, (b,), generator=generator, device=dev)
    # A box as large as the output: crop_and_resize then copies pixels exactly.
    x = crop_and_resize(x, _crop_boxes(ox, oy, size), (size, size))
    if hflip:
        flip = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if brightness > 0:
        f = 1 + brightness * (2 * torch.rand(b, generator=generator, device=dev) - 1)
        x = (x * f[:, None, None, None]).clamp_(0, 1)
    if saturation > 0:
        f = 1 + saturation * (2 * torch.rand(b, generator=generator, device=dev) - 1)
        # Weights as Python scalars: a tensor of them would be a host-to-device copy.
        gray = _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]
        x = (gray + f[:, None, None, None] * (x - gray)).clamp_(0, 1)
    return x
