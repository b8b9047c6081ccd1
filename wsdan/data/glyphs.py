"""The part vocabulary of the generated data set, and the drawing primitives it is drawn with.

A glyph is a shape x colour x inner pattern (6 x 7 x 5 = 210 vocabulary entries): a filled
polygon in unit coordinates (y down, reaching about radius 1 from its centre), mapped into
the image by a 2x2 linear map and a centre, with dark pattern marks (stripes, a dot, a split)
or a hole clipped to it. Entry ``j`` is ``(j % 7, j % 6, j % 5)``, so every prefix of the
vocabulary cycles through colours, shapes and patterns at once.

`wsdan.data.synthetic` puts one glyph on each bird's head (the fine class) and takes
distractor glyphs from the same vocabulary; `wsdan.data.synthetic_pretrain` draws one large
glyph per image. Both use :func:`_background`: a colour gradient with random clutter shapes
(ellipses, boxes, branches) and a few vocabulary glyphs, whose colours are mixed so that
global colour statistics do not give a glyph's colour away.

Everything is drawn with PIL on a canvas ``_SUPERSAMPLE`` times the image size and box-filtered
down (``canvas.reduce(_SUPERSAMPLE)``) by the caller. Coordinates are pixels in the final
image, continuous, the image spanning ``[0, size]``.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw


class BackgroundSpec(Protocol):
    """What :func:`_background` reads of a data set's spec. `wsdan.data.synthetic`'s
    ``SyntheticSpec`` is one; naming the fields here keeps this module free of that one
    (which imports this one)."""

    @property
    def image_size(self) -> int: ...
    @property
    def num_clutter_shapes(self) -> tuple[int, int]: ...
    @property
    def num_background_glyphs(self) -> tuple[int, int]: ...


# --- the vocabulary --------------------------------------------------------------------
# Colours sit in distinct cells of a 4x4x4 RGB histogram, so a part's colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 220),
    "magenta": (200, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PATTERNS = ("solid", "stripes", "dot", "hollow", "split")
# 7, 6 and 5 are pairwise coprime, so j -> (j % 7, j % 6, j % 5) enumerates all 210 patterns
# (Chinese remainder theorem) and every prefix cycles through colours, shapes and patterns
# at once: the first K classes are as far apart as K classes can be.
VOCABULARY_SIZE = len(COLOURS) * len(SHAPES) * len(PATTERNS)

_DARK = (22, 20, 18)  # head ring, glyph patterns, legs
# Clutter colours: 35 % a vocabulary colour, 40 % a neutral (black to white), else any. The
# mix was tuned so that a colour-histogram classifier on whole images stays at chance: with
# fewer neutrals the head's cream and dark pixels, whose amounts depend on the part's shape
# and pattern, gave the class away; with fewer vocabulary colours the part's colour did.
_CLUTTER_VOCAB_COLOUR_P = 0.35
_CLUTTER_NEUTRAL_P = 0.4
_CLUTTER_RADIUS = (0.05, 0.25)  # clutter shape semi-axes, fraction of the image side
_SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap anti-aliasing for PIL's polygons


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2.0 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return radii[:, None] * _regular(10, 1.0, -math.pi / 2)


_C = 0.34  # half-width of the cross's arms
# Glyphs in unit coordinates (y down), each reaching about radius 1 from its centre.
_GLYPHS: dict[str, np.ndarray] = {
    "circle": _regular(32),
    "square": np.array([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]),
    "triangle": _regular(3, 1.0, -math.pi / 2),
    "diamond": np.array([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]),
    "star": _star(),
    "cross": np.array(
        [
            (-_C, -1),
            (_C, -1),
            (_C, -_C),
            (1, -_C),
            (1, _C),
            (_C, _C),
            (_C, 1),
            (-_C, 1),
            (-_C, _C),
            (-1, _C),
            (-1, -_C),
            (-_C, -_C),
        ],
        dtype=float,
    ),
}


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


# Dark marks drawn over the glyph's colour (clipped to the glyph), in unit coordinates.
_PATTERN_MARKS: dict[str, list[np.ndarray]] = {
    "solid": [],
    "stripes": [_rect(-1.2, y - 0.13, 1.2, y + 0.13) for y in (-0.55, 0.0, 0.55)],
    "dot": [_regular(20, 0.38)],
    "hollow": [],  # a hole instead: the inner half of the glyph shows what lies beneath
    "split": [_rect(0.0, -1.2, 1.2, 1.2)],
}


def _pattern(index: int) -> tuple[str, str, str]:
    """Vocabulary entry ``index`` as (colour, shape, pattern) names."""
    return (
        list(COLOURS)[index % len(COLOURS)],
        SHAPES[index % len(SHAPES)],
        PATTERNS[index % len(PATTERNS)],
    )


# --- drawing ---------------------------------------------------------------------------
def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    return _regular(40) * np.array([ax, ay]) @ _rotation(angle).T + np.array([cx, cy])


def _poly(points: np.ndarray) -> list[tuple[float, float]]:
    """Image pixels -> PIL polygon on the supersampled canvas."""
    return [tuple(p) for p in (points * _SUPERSAMPLE).tolist()]


def _draw_glyph(
    canvas: Image.Image, entry: tuple[str, str, str], centre: np.ndarray, linear: np.ndarray
) -> np.ndarray:
    """Draw vocabulary glyph ``entry`` at image point ``centre`` with the 2x2 map ``linear``
    (unit glyph -> image pixels); returns its outline (n, 2) in image pixels."""
    colour, shape, pattern = entry
    unit = _GLYPHS[shape]
    outline = unit @ linear.T + centre
    # Draw in a small tile and paste it through the glyph's mask: patterns stay clipped.
    lo = np.floor(outline.min(axis=0) * _SUPERSAMPLE).astype(int) - 1
    hi = np.ceil(outline.max(axis=0) * _SUPERSAMPLE).astype(int) + 1
    tile_size = (int(hi[0] - lo[0]), int(hi[1] - lo[1]))

    def local(points: np.ndarray) -> list[tuple[float, float]]:
        pts = (points @ linear.T + centre) * _SUPERSAMPLE - lo
        return [tuple(p) for p in pts.tolist()]

    mask = Image.new("L", tile_size, 0)
    mask_draw = ImageDraw.Draw(mask)
    mask_draw.polygon(local(unit), fill=255)
    if pattern == "hollow":
        mask_draw.polygon(local(0.5 * unit), fill=0)
    tile = Image.new("RGB", tile_size, COLOURS[colour])
    tile_draw = ImageDraw.Draw(tile)
    for mark in _PATTERN_MARKS[pattern]:
        tile_draw.polygon(local(mark), fill=_DARK)
    canvas.paste(tile, (int(lo[0]), int(lo[1])), mask)
    return outline


def _random_entry(rng: np.random.Generator) -> tuple[str, str, str]:
    return (
        list(COLOURS)[rng.integers(len(COLOURS))],
        SHAPES[rng.integers(len(SHAPES))],
        PATTERNS[rng.integers(len(PATTERNS))],
    )


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A clutter colour: often a vocabulary colour or a neutral (white to black), so that the
    part's colour and the head's cream and dark pixels are common everywhere; else any."""
    u = rng.random()
    if u < _CLUTTER_VOCAB_COLOUR_P:
        return list(COLOURS.values())[rng.integers(len(COLOURS))]
    if u < _CLUTTER_VOCAB_COLOUR_P + _CLUTTER_NEUTRAL_P:
        grey = rng.uniform(0.0, 255.0)
        return tuple(int(np.clip(grey + v, 0, 255)) for v in rng.uniform(-12.0, 12.0, size=3))
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, spec: BackgroundSpec, glyph_scale: float) -> Image.Image:
    """A linear colour gradient in a random direction, clutter shapes and vocabulary glyphs;
    the supersampled canvas."""
    s = spec.image_size
    c0, c1 = (np.array(_random_colour(rng), dtype=np.float32) for _ in range(2))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    axis = np.arange(s, dtype=np.float32) / s
    ramp = axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle)  # (s, s)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    gradient = (c0 + (c1 - c0) * ramp[..., None]).astype(np.uint8)  # (s, s, 3)
    # Computed at the final size (4x fewer pixels): the box filter undoes the nearest resize.
    canvas = Image.fromarray(gradient).resize((s * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(spec.num_clutter_shapes[0], spec.num_clutter_shapes[1] + 1)):
        kind = rng.integers(3)
        cx, cy = rng.uniform(0, s, size=2)
        rx, ry = rng.uniform(*_CLUTTER_RADIUS, size=2) * s
        theta = rng.uniform(0.0, math.pi)
        colour = _random_colour(rng)
        if kind == 0:
            draw.polygon(_poly(_ellipse(cx, cy, rx, ry, theta)), fill=colour)
        elif kind == 1:
            draw.polygon(
                _poly(_rect(-rx, -ry, rx, ry) @ _rotation(theta).T + (cx, cy)), fill=colour
            )
        else:  # a branch
            d = np.array([math.cos(theta), math.sin(theta)]) * rx * 2.5
            ends = np.array([[cx, cy] - d, [cx, cy] + d])
            width = max(1, int(rng.uniform(0.01, 0.03) * s * _SUPERSAMPLE))
            draw.line(_poly(ends), fill=colour, width=width)
    for _ in range(rng.integers(spec.num_background_glyphs[0], spec.num_background_glyphs[1] + 1)):
        centre = rng.uniform(0, s, size=2)
        linear = glyph_scale * rng.uniform(0.6, 1.0) * _rotation(rng.uniform(0, 2 * math.pi))
        _draw_glyph(canvas, _random_entry(rng), centre, linear)
    return canvas
