"""Batched attention crop/drop against a per-sample loop written the public codes' way."""

import torch
import torch.nn.functional as F

from wsdan.augment import (
    attention_crop,
    attention_drop,
    augment_batch,
    crop_and_resize,
    mask_to_boxes,
    sample_attention_indices,
)


def loop_crop(images, maps, thetas, padding):
    """Per image, with host syncs (``.item()``), slicing and F.interpolate, as public code does."""
    _, _, h, w = images.shape
    crops, boxes = [], []
    for b in range(images.shape[0]):
        up = F.interpolate(maps[b][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = up >= thetas[b].item() * up.max().item()
        nz = torch.nonzero(mask)
        if nz.numel() == 0:
            y0, y1, x0, x1 = 0, h, 0, w
        else:
            pad_y, pad_x = int(padding * h), int(padding * w)
            y0 = max(nz[:, 0].min().item() - pad_y, 0)
            y1 = min(nz[:, 0].max().item() + 1 + pad_y, h)
            x0 = max(nz[:, 1].min().item() - pad_x, 0)
            x1 = min(nz[:, 1].max().item() + 1 + pad_x, w)
        crop = images[b : b + 1, :, y0:y1, x0:x1]
        crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
        boxes.append([x0, y0, x1, y1])
    return torch.cat(crops), torch.tensor(boxes)


def loop_drop(images, maps, thetas, fill):
    _, _, h, w = images.shape
    out = []
    for b in range(images.shape[0]):
        up = F.interpolate(maps[b][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        drop = up >= thetas[b].item() * up.max().item()
        img = images[b].clone()
        for c in range(3):
            img[c][drop] = fill[c]
        out.append(img)
    return torch.stack(out)


def _peaky_maps(b, h, w, gen):
    """Maps with a few Gaussian blobs so the boxes vary in size and place."""
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    maps = torch.zeros(b, h, w)
    for i in range(b):
        for _ in range(2):
            cy, cx = torch.rand(2, generator=gen) * torch.tensor([h, w])
            s = 0.5 + 2 * torch.rand(1, generator=gen)
            maps[i] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return maps


def region_crop(images, boxes, size):
    """Independent per-image reference of crop_and_resize's semantics: bilinear samples of
    the whole image at the box's sample points, clamped at the image border (grid_sample)."""
    _, _, h, w = images.shape
    out = []
    for b, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        xs = x0 + (torch.arange(size[1], dtype=torch.float64) + 0.5) * (x1 - x0) / size[1] - 0.5
        ys = y0 + (torch.arange(size[0], dtype=torch.float64) + 0.5) * (y1 - y0) / size[0] - 0.5
        gy, gx = torch.meshgrid((2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]
        out.append(F.grid_sample(images[b : b + 1].double(), grid, mode="bilinear",
                                 padding_mode="border", align_corners=False))
    return torch.cat(out).to(images.dtype)


def _inside(box, h_out, w_out):
    """Output pixels whose sample point lies between the centres of the box's first and last
    pixels: there a crop of the region and a crop of the cut-out window agree."""
    x0, y0, x1, y1 = box
    xs = x0 + (torch.arange(w_out) + 0.5) * (x1 - x0) / w_out - 0.5
    ys = y0 + (torch.arange(h_out) + 0.5) * (y1 - y0) / h_out - 0.5
    return ((ys >= y0) & (ys <= y1 - 1))[:, None] & ((xs >= x0) & (xs <= x1 - 1))[None, :]


def test_batched_crop_equals_loop():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 64, 48, generator=gen)
    maps = _peaky_maps(6, 8, 6, gen)
    thetas = torch.tensor([0.4, 0.5, 0.6, 0.45, 0.55, 0.9])
    crops, boxes = attention_crop(images, maps, thetas, padding=0.1)
    ref_crops, ref_boxes = loop_crop(images, maps, thetas, 0.1)
    assert torch.equal(boxes, ref_boxes)
    assert (boxes[:, 2] - boxes[:, 0]).unique().numel() > 1  # the boxes really differ
    # Exactly the region's samples (independent reference) ...
    torch.testing.assert_close(crops, region_crop(images, boxes, (64, 48)), atol=1e-5, rtol=0)
    # ... and the public codes' crop of the cut-out wherever the two definitions agree;
    # near the box edges they differ by at most one pixel step, and only a little overall.
    for b in range(6):
        inside = _inside(boxes[b].tolist(), 64, 48)
        assert inside.float().mean() > 0.8
        torch.testing.assert_close(crops[b][:, inside], ref_crops[b][:, inside], atol=1e-5, rtol=0)
    assert (crops - ref_crops).abs().mean() < 0.01


def test_crop_and_resize_handles_downscale_identity_and_image_border():
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(4, 2, 20, 30, generator=gen)
    boxes = torch.tensor([[0, 0, 30, 20], [3, 2, 30, 20], [5, 5, 6, 6], [0, 0, 7, 9]])
    out = crop_and_resize(images, boxes, (10, 40))
    torch.testing.assert_close(out, region_crop(images, boxes, (10, 40)), atol=1e-5, rtol=0)
    # The whole image: region and cut-out are the same thing, at every pixel.
    ref = F.interpolate(images[:1], size=(10, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:1], ref, atol=1e-5, rtol=0)
    # A box as large as the output copies pixels exactly.
    same = crop_and_resize(images, boxes[:1].expand(4, 4), (20, 30))
    torch.testing.assert_close(same, images, atol=1e-6, rtol=0)
    shifted = crop_and_resize(images, torch.tensor([[4, 3, 24, 13]] * 4), (10, 20))
    torch.testing.assert_close(shifted, images[:, :, 3:13, 4:24], atol=1e-6, rtol=0)
    # Half-precision input is cropped in fp32 (bf16 cannot hold the coordinates) and
    # returned in its own dtype.
    half = crop_and_resize(images.bfloat16(), boxes, (10, 40))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out, atol=1e-2, rtol=0)


def test_batched_drop_equals_loop():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 40, 40, generator=gen)
    maps = _peaky_maps(5, 5, 5, gen)
    thetas = torch.tensor([0.2, 0.3, 0.5, 0.35, 0.25])
    fill = torch.tensor([0.485, 0.456, 0.406])
    out = attention_drop(images, maps, thetas, fill)
    torch.testing.assert_close(out, loop_drop(images, maps, thetas, fill), atol=1e-6, rtol=0)
    assert (out != images).any()


def test_empty_mask_gives_whole_image():
    mask = torch.zeros(2, 10, 12, dtype=torch.bool)
    mask[1, 3:5, 4:6] = True
    boxes = mask_to_boxes(mask, padding=0.1)
    assert boxes[0].tolist() == [0, 0, 12, 10]
    assert boxes[1].tolist() == [3, 2, 7, 6]  # pad int(0.1·12)=1 in x, int(0.1·10)=1 in y
    # A NaN map gives an empty mask: the crop is the whole image, not a crash.
    images = torch.rand(1, 3, 16, 16)
    crops, b = attention_crop(images, torch.full((1, 4, 4), float("nan")), torch.tensor([0.5]))
    assert b[0].tolist() == [0, 0, 16, 16]
    torch.testing.assert_close(crops, images)


def test_sampling_follows_sqrt_mean_weights():
    # Map 0 has mean 4·(map 1 mean) → weight ratio sqrt(4) = 2 → p(0) = 2/3.
    attn = torch.ones(4000, 2, 3, 3)
    attn[:, 0] *= 4.0
    gen = torch.Generator().manual_seed(0)
    idx = sample_attention_indices(attn, 2, gen)
    p0 = (idx == 0).float().mean().item()
    assert abs(p0 - 2 / 3) < 0.02


def test_augment_batch_is_seeded_and_thresholds_in_range():
    images = torch.rand(8, 3, 32, 32)
    attn = torch.rand(8, 4, 4, 4)
    a = augment_batch(images, attn, generator=torch.Generator().manual_seed(7))
    b = augment_batch(images, attn, generator=torch.Generator().manual_seed(7))
    c = augment_batch(images, attn, generator=torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.crop_theta, c.crop_theta)
    assert ((a.crop_theta >= 0.4) & (a.crop_theta <= 0.6)).all()
    assert ((a.drop_theta >= 0.2) & (a.drop_theta <= 0.5)).all()
    assert ((a.crop_boxes[:, 2:] > a.crop_boxes[:, :2]).all())
