"""FGVC-Aircraft 2013b (Maji et al. 2013), variant level, as extracted from
``fgvc-aircraft-2013b.tar.gz``::

    fgvc-aircraft-2013b/data/
      variants.txt                      one variant name per line (the class list, in order)
      images_variant_train.txt          <image_id> <variant name, may hold spaces>
      images_variant_val.txt            (same)
      images_variant_test.txt           (same)
      images_variant_trainval.txt       (train + val, same format)
      images_box.txt                    <image_id> <xmin> <ymin> <xmax> <ymax>  (1-based pixels)
      images/<image_id>.jpg             seven-digit ids

The official train/val/test split is used when the three files exist; with only
``trainval`` and ``test``, validation is carved from trainval.

Every image carries a 20-pixel copyright banner at the bottom, which the data set's README
asks users to remove. We crop it here, which is the one case where the stored image is
re-encoded rather than copied: JPEG with the source's own quantisation tables and chroma
subsampling, so the loss is one more rounding of the same quantiser. Boxes are clipped to
the cropped image. The manifest says ``"banner_cropped": true``.
"""

from __future__ import annotations

import io

from PIL import JpegImagePlugin

from ..decode import open_image
from ._common import (
    SPLITS,
    DatasetListing,
    ImageRecord,
    Problems,
    SourceTree,
    box_from_one_based,
    check_unique,
    find_root,
    parse_floats,
    read_rows,
)

NAME = "FGVC-Aircraft"
BANNER_PX = 20  # copyright banner at the bottom of every image (data set README)


def crop_banner(data: bytes) -> bytes:
    """Remove the bottom ``BANNER_PX`` rows and re-encode in the source's format (JPEG with
    its own quantisation tables and subsampling). Raises ``DecodeError`` (a ValueError) on a
    corrupt image, one over ``MAX_IMAGE_PIXELS`` (refused from its header, by `open_image`)
    or one not taller than the banner."""
    with open_image(data) as im:
        width, height = im.size
        if height <= BANNER_PX:
            raise ValueError(
                f"image is {height} px high, not taller than the {BANNER_PX} px banner"
            )
        fmt = im.format or "JPEG"
        options = {key: im.info[key] for key in ("icc_profile", "exif", "dpi") if key in im.info}
        if fmt == "JPEG":
            options["qtables"] = im.quantization
            sampling = JpegImagePlugin.get_sampling(im)
            if sampling != -1:
                options["subsampling"] = sampling
        cropped = im.crop((0, 0, width, height - BANNER_PX))  # decodes: corrupt data raises here
        out = io.BytesIO()
        cropped.save(out, format=fmt, **options)
    return out.getvalue()


def read_aircraft(tree: SourceTree) -> DatasetListing:
    root = find_root(tree, "variants.txt", ["data", "fgvc-aircraft-2013b/data"])
    tree.require([root + "variants.txt"], "variants.txt")
    tree.require([root + "images_box.txt"], "images_box.txt")
    official = [f"{root}images_variant_{s}.txt" for s in SPLITS]
    if all(tree.is_file(f) for f in official):
        split_files = dict(zip(SPLITS, official))
        val_from_trainval = False
    else:
        split_files = {
            "train": tree.require(
                [root + "images_variant_trainval.txt"],
                "images_variant_train/val/test.txt or images_variant_trainval.txt",
            ),
            "test": tree.require([root + "images_variant_test.txt"], "images_variant_test.txt"),
        }
        val_from_trainval = True
    problems = Problems()

    classes: list[str] = []
    index: dict[str, int] = {}
    variants = tree.where(root + "variants.txt")
    for lineno, line in enumerate(tree.read_text(root + "variants.txt").splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in index:
            problems.add(f"{variants}:{lineno}", f"variant {name!r} listed twice")
            continue
        index[name] = len(classes)
        classes.append(name)
    problems.raise_if_any(NAME)

    boxes: dict[str, tuple[str, tuple[float, ...] | None]] = {}
    for where, parts in read_rows(tree, root + "images_box.txt", problems, fields=5):
        if parts[0] in boxes:
            problems.add(where, f"duplicate image id {parts[0]!r} (first at {boxes[parts[0]][0]})")
            continue
        values = parse_floats(parts[1:], where, problems, "box")
        boxes[parts[0]] = (where, box_from_one_based(values, where, problems) if values else None)

    records, seen = [], []
    for split, rel in split_files.items():
        for where, (image_id, variant) in read_rows(tree, rel, problems, fields=2, rest=True):
            seen.append((image_id, where))
            if variant not in index:
                problems.add(where, f"variant {variant!r} is not in variants.txt")
                continue
            path = f"{root}images/{image_id}.jpg"
            if not tree.is_file(path):
                problems.add(where, f"image listed but absent: {tree.where(path)}")
            if image_id not in boxes:
                problems.add(where, f"no box for image {image_id!r} in images_box.txt")
                continue
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    label=index[variant],
                    split=split,
                    bbox=boxes[image_id][1],
                )
            )
    check_unique(seen, problems)
    problems.raise_if_any(NAME)
    return DatasetListing(
        name=NAME,
        source_format="aircraft",
        tree=tree,
        classes=classes,
        records=records,
        transform=crop_banner,
        info={
            "annotation_level": "variant",
            "banner_cropped": True,
            "banner_px": BANNER_PX,
            "reencoded": "JPEG, source quantisation tables and subsampling (banner crop)",
            "official_val_split": not val_from_trainval,
            "bbox_source": "images_box.txt, 1-based inclusive: (xmin-1, ymin-1, xmax, ymax), "
            "clipped to the cropped image",
        },
    )
