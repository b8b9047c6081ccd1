"""CUB-200-2011 (Wah et al. 2011), as extracted from ``CUB_200_2011.tgz``::

    CUB_200_2011/
      images.txt               <image_id> <relative path under images/>
      image_class_labels.txt   <image_id> <class_id>            (class ids 1..200)
      train_test_split.txt     <image_id> <is_training_image>   (1 train, 0 test)
      bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (floats, pixels)
      classes.txt              <class_id> <class_name>          (e.g. "001.Black_footed_Albatross")
      images/<class_name>/<file>.jpg

``image_id`` is CUB's own id (so rows join with its part and attribute files). Class names
lose their ``NNN.`` prefix. The box's ``x, y`` is taken as the top-left corner in the same
continuous coordinates we store, so ``(x, y, x + width, y + height)``. CUB has no
validation split: one is carved from train.
"""

from __future__ import annotations

import re

from ._common import (
    DatasetListing,
    ImageRecord,
    Problems,
    SourceTree,
    box_from_xywh,
    find_root,
    parse_floats,
    parse_int,
    read_rows,
)

NAME = "CUB-200-2011"
_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "classes.txt",
)
_CLASS_PREFIX = re.compile(r"^\d+\.")


def _by_id(tree: SourceTree, rel: str, problems: Problems, fields: int, rest: bool = False):
    """``{image_id: (where, values)}`` of a per-image file; a repeated id is a problem."""
    out: dict[str, tuple[str, list[str]]] = {}
    for where, parts in read_rows(tree, rel, problems, fields=fields, rest=rest):
        if parts[0] in out:
            problems.add(where, f"duplicate image id {parts[0]!r} (first at {out[parts[0]][0]})")
            continue
        out[parts[0]] = (where, parts[1:])
    return out


def read_cub(tree: SourceTree) -> DatasetListing:
    root = find_root(tree, "images.txt", ["CUB_200_2011"])
    for name in _FILES:
        tree.require([root + name], name)
    problems = Problems()

    classes: list[str] = []
    for where, (cid, name) in read_rows(tree, root + "classes.txt", problems, fields=2, rest=True):
        if parse_int(cid, where, problems, "class id") != len(classes) + 1:
            problems.add(
                where, f"class ids must run 1, 2, ... in order; expected {len(classes) + 1}"
            )
        classes.append(_CLASS_PREFIX.sub("", name))
    problems.raise_if_any(NAME)  # labels cannot be checked without the class list

    images = _by_id(tree, root + "images.txt", problems, 2, rest=True)
    labels = _by_id(tree, root + "image_class_labels.txt", problems, 2)
    is_train = _by_id(tree, root + "train_test_split.txt", problems, 2)
    boxes = _by_id(tree, root + "bounding_boxes.txt", problems, 5)
    for rel, table in (
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", is_train),
        ("bounding_boxes.txt", boxes),
    ):
        for image_id, (where, _) in table.items():
            if image_id not in images:
                problems.add(where, f"image id {image_id!r} is not in images.txt")
        missing = [i for i in images if i not in table]
        if missing:
            problems.add(
                tree.where(root + rel),
                f"no line for {len(missing)} image id(s) of images.txt, e.g. {missing[:3]}",
            )

    records = []
    for image_id, (where, (path,)) in images.items():
        rel = f"{root}images/{path}"
        if not tree.is_file(rel):
            problems.add(where, f"image listed but absent: {tree.where(rel)}")
        if image_id not in labels or image_id not in is_train or image_id not in boxes:
            continue
        lwhere, (label_text,) = labels[image_id]
        label = parse_int(label_text, lwhere, problems, "class id")
        if label is not None and not 1 <= label <= len(classes):
            problems.add(lwhere, f"class id {label} out of range 1..{len(classes)}")
        swhere, (flag,) = is_train[image_id]
        if flag not in ("0", "1"):
            problems.add(swhere, f"is_training_image must be 0 or 1, got {flag!r}")
        bwhere, box_text = boxes[image_id]
        values = parse_floats(box_text, bwhere, problems, "box")
        box = box_from_xywh(values, bwhere, problems) if values else None
        if label is None or problems:
            continue
        records.append(
            ImageRecord(
                image_id=image_id,
                path=rel,
                label=label - 1,
                split="train" if flag == "1" else "test",
                bbox=box,
            )
        )
    problems.raise_if_any(NAME)
    return DatasetListing(
        name=NAME,
        source_format="cub",
        tree=tree,
        classes=classes,
        records=records,
        info={"bbox_source": "bounding_boxes.txt: (x, y, x + width, y + height)"},
    )
