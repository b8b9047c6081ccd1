"""The stand-in for ImageNet pretraining: a glyph-recognition task on generated images.

WS-DAN fine-tunes an ImageNet-pretrained backbone; ImageNet teaches object and part
detectors that fine-grained data sets reuse (CUB's birds are themselves ImageNet classes).
No weights can be downloaded here, and pretraining on the bird images' coarse labels
(``synthetic.coarse_class_names``: body family × wing-glyph shape) did not train from
scratch in minutes on two cores: the signal is one small part per image (measured: train
top-1 stayed at chance, 0.09 vs 1/12, after 3 epochs of 4,000 images).

So the pretraining images are *object-centric*, like ImageNet's: one large glyph of the
vocabulary (half-size 10–40 px at 128 px, i.e. 1–3× the head glyph's) on the same
cluttered backgrounds, with small background glyphs around it. The label is the glyph's
shape × inner pattern (30 classes). Colour is not part of the label, and no bird, head or
position cue is taught: the fine-grained task (which glyph sits on the head, in which
colour) still has to be learned by fine-tuning, by WS-DAN and the plain baseline alike.
"""

from __future__ import annotations

import math

import numpy as np

from wsdan.data.glyphs import (
    _SUPERSAMPLE,
    PATTERNS,
    SHAPES,
    _background,
    _draw_glyph,
    _random_entry,
    _rotation,
)
from wsdan.data.synthetic import SyntheticSpec

GLYPH_HALF_SIZE = (10.0, 40.0)  # pixels at 128 px; scaled with the image size


def pretrain_class_names() -> list[str]:
    return [f"{shape}-{pattern}" for shape in SHAPES for pattern in PATTERNS]


def render_pretrain_sample(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, int]:
    """(image H×W×3 uint8, label) of pretraining sample ``index``; depends only on
    ``(spec.seed, spec.image_size, index)`` (its own stream: ``default_rng([seed, 2, i])``)."""
    rng = np.random.default_rng([spec.seed, 2, index])
    s = spec.image_size
    g = rng.uniform(*GLYPH_HALF_SIZE) * s / 128.0
    canvas = _background(rng, spec, 0.5 * s * math.sqrt(spec.part_area_range[0]))
    colour, shape, pattern = _random_entry(rng)
    centre = rng.uniform(g, s - g, size=2)
    linear = g * _rotation(rng.uniform(0, 2 * math.pi))
    _draw_glyph(canvas, (colour, shape, pattern), centre, linear)
    image = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    image = image + rng.normal(0.0, rng.uniform(*spec.noise_std_range), size=image.shape)
    label = SHAPES.index(shape) * len(PATTERNS) + PATTERNS.index(pattern)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def generate_pretrain_arrays(spec: SyntheticSpec, indices) -> dict[str, np.ndarray]:
    """images (N×H×W×3 uint8) and labels (N int64) of the pretraining task."""
    samples = [render_pretrain_sample(spec, int(i)) for i in indices]
    s = spec.image_size
    return {
        "images": np.stack([x[0] for x in samples]) if samples else np.zeros((0, s, s, 3), np.uint8),
        "labels": np.array([x[1] for x in samples], dtype=np.int64),
    }
