"""The generated fine-grained data set: birds told apart only by a small mark on the head.

No public fine-grained data set can be downloaded on the machines this project runs on, so
it ships a generator. Each image shows a bird-like object (body, head, beak, tail, wing,
legs) on a cluttered background. The fine class is decided *only* by a small part, a glyph
inside the head, which is a light disc in a dark ring so that a network can learn where to
look. The glyph is an entry of the part vocabulary of `wsdan.data.glyphs` (shape x colour x
inner pattern, 6 x 7 x 5 = 210 entries); its tight box covers about 2-5 % of the image. The
same vocabulary also supplies 1-3 *distractor* glyphs on the wing, tail and belly and a few
glyphs in the background, chosen at random per image, and the background is a colour
gradient with random shapes and noise, so global colour or shape statistics do not solve the
task (see tests/data/test_synthetic.py for a colour-histogram classifier that stays near
chance on whole images and is far above it on the part box).

Each image also has a *coarse* label, body family x shape of the wing glyph (2 x 6 = 12
classes). It is independent of the fine label and stands in for ImageNet pretraining: a
plain backbone is pretrained on it here, because no pretrained weights can be downloaded.

Sample ``i`` depends only on ``(spec, i)``: its random stream is
``default_rng([seed, 0, i])``, so generation can be split over workers and resumed.
Labels are balanced: each aligned block of ``num_classes`` consecutive indices holds every
class once, in an order drawn from ``default_rng([seed, 1, block])``.

Coordinates are pixels in the final image, continuous, the image spanning ``[0, size]``;
boxes are ``(x0, y0, x1, y1)``, the tight box of the drawn polygons, clipped to the image.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from wsdan.data.glyphs import (
    _DARK,
    _SUPERSAMPLE,
    COLOURS,
    PATTERNS,
    SHAPES,
    VOCABULARY_SIZE,
    _background,
    _draw_glyph,
    _ellipse,
    _pattern,
    _poly,
    _random_entry,
    _rotation,
)

# The vocabulary (COLOURS, SHAPES, PATTERNS, VOCABULARY_SIZE) lives in wsdan.data.glyphs and
# stays importable from here.
__all__ = [
    "ANNOTATION_COLUMNS",
    "COLOURS",
    "FAMILIES",
    "FORMAT_VERSION",
    "PATTERNS",
    "SHAPES",
    "SPLITS",
    "VOCABULARY_SIZE",
    "SyntheticSample",
    "SyntheticSpec",
    "class_names",
    "coarse_class_names",
    "generate_arrays",
    "load_synthetic_split",
    "render_sample",
    "sample_label",
    "write_synthetic_dataset",
]

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FAMILIES = ("round", "slender")
_HEAD_INTERIOR = (236, 230, 214)  # constant cream: carries no class information


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or not 2 <= num_classes <= VOCABULARY_SIZE:
        raise ValueError(
            f"num_classes must be an int between 2 and {VOCABULARY_SIZE}, got {num_classes!r}"
        )


def class_names(num_classes: int) -> list[str]:
    """Fine class names, e.g. ``"red-circle-solid"``; class k is vocabulary entry k."""
    _check_num_classes(num_classes)
    return ["-".join(_pattern(k)) for k in range(num_classes)]


def coarse_class_names() -> list[str]:
    """Coarse class names, ``family * len(SHAPES) + wing shape``, e.g. ``"round-star-wing"``."""
    return [f"{family}-{shape}-wing" for family in FAMILIES for shape in SHAPES]


# --- the spec --------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSpec:
    num_classes: int = 10
    image_size: int = 128  # square images, pixels
    seed: int = 0  # non-negative; sample i depends only on (spec, i)
    # Side of the head glyph's nominal square, squared, as a fraction of the image area.
    # The drawn glyph's tight box covers 52-100 % of that square (it depends on the shape
    # and the rotation), so the part box is about 2-5 % of the image. The rest of the bird
    # scales with the glyph, so this is also the object's scale range.
    part_area_range: tuple[float, float] = (0.036, 0.052)
    num_distractors: tuple[int, int] = (1, 3)  # inclusive; the first is always on the wing
    num_background_glyphs: tuple[int, int] = (2, 4)  # vocabulary glyphs in the clutter
    num_clutter_shapes: tuple[int, int] = (6, 12)  # ellipses, boxes and branches behind
    max_rotation_deg: float = 45.0  # uniform in +-this, then a horizontal flip half the time
    noise_std_range: tuple[float, float] = (2.0, 6.0)  # Gaussian pixel noise, 0-255 scale

    def __post_init__(self) -> None:
        _check_num_classes(self.num_classes)
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        lo, hi = self.part_area_range
        if not 0.0 < lo <= hi <= 0.08:
            raise ValueError(f"part_area_range must satisfy 0 < lo <= hi <= 0.08, got {(lo, hi)}")
        for name in ("num_distractors", "num_background_glyphs", "num_clutter_shapes"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got {(lo, hi)}")
        if self.num_distractors[0] < 1 or self.num_distractors[1] > 3:
            raise ValueError(f"num_distractors must lie within (1, 3), got {self.num_distractors}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must lie in [0, 180], got {self.max_rotation_deg}")
        lo, hi = self.noise_std_range
        if not 0.0 <= lo <= hi:
            raise ValueError(f"noise_std_range must satisfy 0 <= lo <= hi, got {(lo, hi)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticSpec:
        """Inverse of `to_dict`; an unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SyntheticSpec keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class SyntheticSample(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8
    label: int
    label_name: str
    coarse_label: int
    object_box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels
    part_box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels


def sample_label(spec: SyntheticSpec, index: int) -> int:
    """Fine label of sample ``index``: a seeded permutation of each aligned block of K."""
    k = spec.num_classes
    perm = np.random.default_rng([spec.seed, 1, index // k]).permutation(k)
    return int(perm[index % k])


# --- drawing ---------------------------------------------------------------------------
class _Frame:
    """Object frame -> image: rotate, maybe mirror horizontally, translate (pixels)."""

    def __init__(self, angle: float, mirror: bool, offset: np.ndarray) -> None:
        c, s = math.cos(angle), math.sin(angle)
        self.linear = np.diag([-1.0 if mirror else 1.0, 1.0]) @ np.array([[c, -s], [s, c]])
        self.offset = offset

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return points @ self.linear.T + self.offset


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.2, 0.7), rng.uniform(0.35, 0.8)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _box(points: np.ndarray, size: int) -> tuple[float, float, float, float]:
    lo = np.clip(points.min(axis=0), 0.0, size)
    hi = np.clip(points.max(axis=0), 0.0, size)
    return tuple(round(float(v), 3) for v in (lo[0], lo[1], hi[0], hi[1]))


class _Bird(NamedTuple):
    """A bird in its own frame: pixels, x towards the head, y down, body centred at 0."""

    family: int  # index into FAMILIES
    body: np.ndarray  # (n, 2) polygons, here and below
    tail: np.ndarray
    wing: np.ndarray
    beak: np.ndarray
    legs: list[np.ndarray]  # (2, 2) centre lines
    head_centre: np.ndarray  # (2,)
    head_radius: float  # the dark ring's outer radius
    head_inner_radius: float  # the cream disc holding the part
    anchors: dict[str, np.ndarray]  # where distractor glyphs sit, (2,) each


def _bird(rng: np.random.Generator, g: float) -> _Bird:
    """Sample a bird's shape; every length scales with the head glyph's half-size ``g``."""
    r_in = 1.08 * g  # the glyph's corners reach ~1.06 g
    r_head = r_in + 0.2 * g  # dark ring
    family = int(rng.integers(len(FAMILIES)))
    if FAMILIES[family] == "round":  # plump body, short fan tail
        a, b = rng.uniform(1.35, 1.5) * r_head, rng.uniform(1.0, 1.12) * r_head
        tail_len, tail_w = rng.uniform(0.55, 0.8) * r_head, rng.uniform(0.55, 0.75) * r_head
        tail = [(-0.8 * a, -0.25 * b), (-a - tail_len, -tail_w), (-a - tail_len, tail_w),
                (-0.8 * a, 0.25 * b)]  # fmt: skip
    else:  # slender body, long forked tail
        a, b = rng.uniform(1.5, 1.65) * r_head, rng.uniform(0.72, 0.85) * r_head
        tail_len, tail_w = rng.uniform(0.85, 1.15) * r_head, rng.uniform(0.45, 0.6) * r_head
        tail = [(-0.8 * a, -0.2 * b), (-a - tail_len, -tail_w), (-a - 0.55 * tail_len, 0.0),
                (-a - tail_len, tail_w), (-0.8 * a, 0.2 * b)]  # fmt: skip
    head_c = np.array([a + 0.1 * r_head, -0.45 * b])
    beak = head_c + r_head * np.array([(0.85, -0.28), (1.45, 0.05), (0.85, 0.28)])
    wing_c = np.array([-0.2 * a, -0.05 * b])
    return _Bird(
        family=family,
        body=_ellipse(0.0, 0.0, a, b),
        tail=np.array(tail),
        wing=_ellipse(*wing_c, 0.68 * a, 0.55 * b, -0.12),
        beak=beak,
        legs=[
            np.array([(x, 0.8 * b), (x - 0.1 * r_head, b + 0.55 * r_head)])
            for x in (-0.15 * a, 0.2 * a)
        ],
        head_centre=head_c,
        head_radius=r_head,
        head_inner_radius=r_in,
        anchors={
            "wing": wing_c,
            "tail": np.array([-a - 0.4 * tail_len, 0.0]),
            "belly": np.array([0.42 * a, 0.45 * b]),
        },
    )


def _pose(rng: np.random.Generator, spec: SyntheticSpec, bird: _Bird) -> tuple[_Frame, np.ndarray]:
    """Rotate, maybe mirror, and place the bird inside the image where it fits; returns the
    frame and the bird's outline (n, 2) in image pixels."""
    size = spec.image_size
    angle = math.radians(rng.uniform(-1, 1) * spec.max_rotation_deg)
    frame = _Frame(angle, bool(rng.random() < 0.5), np.zeros(2))
    r = bird.head_radius
    head_disc = _ellipse(*bird.head_centre, r, r)
    parts = (bird.body, bird.tail, bird.beak, head_disc, *bird.legs)
    outline = np.concatenate([frame(p) for p in parts])  # legs count as their centre lines
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    head = frame(bird.head_centre[None])[0]
    for ax in range(2):
        if hi[ax] - lo[ax] <= size:
            frame.offset[ax] = rng.uniform(-lo[ax], size - hi[ax])
        else:  # too big to fit: centre it, but keep the head (and its part) inside
            centred = 0.5 * size - 0.5 * (lo[ax] + hi[ax])
            frame.offset[ax] = np.clip(centred, r - head[ax], size - r - head[ax])
    return frame, outline + frame.offset


def render_sample(spec: SyntheticSpec, index: int) -> SyntheticSample:
    """Render sample ``index``; it depends only on ``(spec, index)``."""
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    rng = np.random.default_rng([spec.seed, 0, index])
    label = sample_label(spec, index)
    part_entry = _pattern(label)
    # The head glyph's half-size: its nominal square is the spec's fraction of the image.
    g = 0.5 * spec.image_size * math.sqrt(rng.uniform(*spec.part_area_range))
    bird = _bird(rng, g)
    frame, outline = _pose(rng, spec, bird)

    canvas = _background(rng, spec, g)
    draw = ImageDraw.Draw(canvas)
    colour = _body_colour(rng)
    draw.polygon(_poly(frame(bird.tail)), fill=_rgb(colour * 0.8))
    leg_width = max(1, round(0.12 * bird.head_radius * _SUPERSAMPLE))
    for leg in bird.legs:
        draw.line(_poly(frame(leg)), fill=_DARK, width=leg_width)
    draw.polygon(_poly(frame(bird.body)), fill=_rgb(colour))
    draw.polygon(_poly(frame(bird.wing)), fill=_rgb(colour * 0.7))
    # Distractors: the wing always carries one (its shape is the coarse label), the tail and
    # belly sometimes; their patterns are random, independent of the class.
    n_extra = int(rng.integers(spec.num_distractors[0], spec.num_distractors[1] + 1)) - 1
    places = ["wing"] + [["tail", "belly"][i] for i in rng.permutation(2)[:n_extra]]
    entries = [_random_entry(rng) for _ in places]
    for place, entry in zip(places, entries):
        local = g * rng.uniform(0.6, 0.85) * _rotation(rng.uniform(0, 2 * math.pi))
        _draw_glyph(canvas, entry, frame(bird.anchors[place][None])[0], frame.linear @ local)
    beak_colour = np.array([120, 105, 80]) + rng.uniform(-30, 30)
    draw.polygon(_poly(frame(bird.beak)), fill=_rgb(beak_colour))
    c, r_head, r_in = bird.head_centre, bird.head_radius, bird.head_inner_radius
    draw.polygon(_poly(frame(_ellipse(*c, r_head, r_head))), fill=_DARK)
    draw.polygon(_poly(frame(_ellipse(*c, r_in, r_in))), fill=_HEAD_INTERIOR)
    part = _draw_glyph(canvas, part_entry, frame(c[None])[0], frame.linear * g)

    image = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)  # (H, W, 3)
    image = image + rng.normal(0.0, rng.uniform(*spec.noise_std_range), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return SyntheticSample(
        image=image,
        label=label,
        label_name="-".join(part_entry),
        coarse_label=bird.family * len(SHAPES) + SHAPES.index(entries[0][1]),
        object_box=_box(outline, spec.image_size),
        part_box=_box(part, spec.image_size),
    )


def generate_arrays(spec: SyntheticSpec, indices) -> dict[str, np.ndarray]:
    """Render ``indices`` into arrays: images (N, H, W, 3) uint8, labels (N,) int64,
    coarse_labels (N,) int64, object_boxes (N, 4) float32, part_boxes (N, 4) float32."""
    samples = [render_sample(spec, int(i)) for i in indices]
    s = spec.image_size
    return {
        "images": np.stack([x.image for x in samples])
        if samples
        else np.zeros((0, s, s, 3), np.uint8),
        "labels": np.array([x.label for x in samples], dtype=np.int64),
        "coarse_labels": np.array([x.coarse_label for x in samples], dtype=np.int64),
        "object_boxes": np.array([x.object_box for x in samples], dtype=np.float32).reshape(-1, 4),
        "part_boxes": np.array([x.part_box for x in samples], dtype=np.float32).reshape(-1, 4),
    }


# --- on disk ---------------------------------------------------------------------------
ANNOTATION_COLUMNS = (  # annotations.csv; read back by wsdan.data.formats.synthetic
    "image_id",
    "path",
    "label",
    "label_name",
    "coarse_label",
    "split",
    "obj_x0",
    "obj_y0",
    "obj_x1",
    "obj_y1",
    "part_x0",
    "part_y0",
    "part_x1",
    "part_y1",
)


def _manifest(spec: SyntheticSpec, counts: dict[str, int]) -> dict[str, Any]:
    start, ranges = 0, {}
    for split in SPLITS:
        ranges[split] = [start, start + counts[split]]
        start += counts[split]
    return {
        "format_version": FORMAT_VERSION,
        "source": "wsdan.data.synthetic",
        "spec": spec.to_dict(),
        "counts": counts,
        "index_ranges": ranges,  # half-open [start, stop) of sample indices per split
        "classes": class_names(spec.num_classes),
        "coarse_classes": coarse_class_names(),
    }


def _complete(root: Path, manifest_text: str) -> bool:
    """Whether ``root`` already holds exactly this data set (same manifest, every file)."""
    path = root / "dataset.json"
    if not path.is_file() or path.read_text() != manifest_text:
        return False
    if not (root / "annotations.csv").is_file():
        return False
    with open(root / "annotations.csv", newline="") as f:
        return all((root / row["path"]).is_file() for row in csv.DictReader(f))


def write_synthetic_dataset(
    root: str | Path,
    *,
    spec: SyntheticSpec,
    n_train: int,
    n_val: int,
    n_test: int,
    progress: bool = True,
) -> Path:
    """Write the data set to ``root``: ``images/<label_name>/<image_id>.jpg`` (JPEG q95, 4:4:4),
    ``annotations.csv``, ``classes.txt``, ``coarse_classes.txt`` and ``dataset.json``.

    Splits are consecutive index ranges: train, then val, then test. Re-running with the
    same arguments gives the same files (and returns at once when they are all there);
    ``dataset.json`` is written last, so an interrupted run is redone. A folder that holds
    a different generated data set is refused rather than mixed.
    """
    from tqdm import tqdm

    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n_{split} must be a non-negative int, got {n!r}")
    root = Path(root)
    manifest_text = json.dumps(_manifest(spec, counts), indent=2, sort_keys=True) + "\n"
    if _complete(root, manifest_text):
        return root
    if (root / "dataset.json").exists():
        raise FileExistsError(
            f"{root} already holds a different generated data set; use another folder"
        )
    names = class_names(spec.num_classes)
    for name in names:
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
    split_of = [s for s in SPLITS for _ in range(counts[s])]
    rows = []
    for index in tqdm(range(len(split_of)), desc="synthetic", disable=not progress):
        sample = render_sample(spec, index)
        image_id = f"{index:07d}"
        rel = f"images/{sample.label_name}/{image_id}.jpg"
        # 4:4:4 chroma: the default 4:2:0 halves colour resolution and smears the small
        # coloured parts the classes are told apart by (twice the error at 64 px).
        Image.fromarray(sample.image).save(root / rel, format="JPEG", quality=95, subsampling=0)
        rows.append(
            [
                image_id,
                rel,
                sample.label,
                sample.label_name,
                sample.coarse_label,
                split_of[index],
                *(f"{v:.3f}" for v in sample.object_box),
                *(f"{v:.3f}" for v in sample.part_box),
            ]
        )
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    (root / "coarse_classes.txt").write_text("\n".join(coarse_class_names()) + "\n")
    (root / "dataset.json").write_text(manifest_text)
    return root


def load_synthetic_split(root: str | Path, split: str) -> dict[str, np.ndarray]:
    """Read one split of a written data set back into arrays (same keys as `generate_arrays`;
    images are the decoded JPEGs)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    manifest = json.loads((root / "dataset.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root}: unsupported format_version {manifest.get('format_version')!r}")
    size = int(manifest["spec"]["image_size"])
    with open(root / "annotations.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    images = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        with Image.open(root / row["path"]) as im:
            images[i] = np.asarray(im.convert("RGB"))
    return {
        "images": images,
        "labels": np.array([int(r["label"]) for r in rows], dtype=np.int64),
        "coarse_labels": np.array([int(r["coarse_label"]) for r in rows], dtype=np.int64),
        "object_boxes": np.array(
            [[float(r[c]) for c in ANNOTATION_COLUMNS[6:10]] for r in rows], dtype=np.float32
        ).reshape(-1, 4),
        "part_boxes": np.array(
            [[float(r[c]) for c in ANNOTATION_COLUMNS[10:14]] for r in rows], dtype=np.float32
        ).reshape(-1, 4),
    }
