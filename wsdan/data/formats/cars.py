"""Stanford Cars (Krause et al. 2013), devkit layout::

    stanford_cars/
      devkit/cars_meta.mat            class_names: 1 x 196 cell of strings
      devkit/cars_train_annos.mat     annotations: 1 x N struct, fields bbox_x1, bbox_y1,
                                      bbox_x2, bbox_y2 (pixels), class (1-based), fname
      cars_test_annos_withlabels.mat  the same for the test images (released later; the
                                      devkit's cars_test_annos.mat has no class field)
      cars_train/<fname>              00001.jpg ...
      cars_test/<fname>               00001.jpg ... (the same names as in cars_train)

The ``.mat`` files may also sit directly in the source folder (or in ``car_devkit/devkit``).
``image_id`` is ``cars_train/00001`` or ``cars_test/00001``, since file names repeat across
the two folders. Boxes are MATLAB's 1-based inclusive pixel indices, stored as
``(x1 - 1, y1 - 1, x2, y2)``. Cars has no validation split: one is carved from train.
"""

from __future__ import annotations

import posixpath

import numpy as np

from ._common import (
    DatasetFormatError,
    DatasetListing,
    ImageRecord,
    Problems,
    SourceTree,
    box_from_one_based,
    check_unique,
    load_mat,
    mat_field,
    parse_floats,
    parse_int,
)

NAME = "Stanford Cars"
_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
_DEVKIT_DIRS = ("devkit/", "", "car_devkit/devkit/")


def _scalar(entry, name: str) -> str:
    """One struct field as text: loadmat gives a number, a string or a 1-element array."""
    value = np.asarray(entry[name]).reshape(-1)
    if value.size != 1:
        return repr(value.tolist())  # not a scalar: parse_* reports it
    item = value[0].item() if hasattr(value[0], "item") else value[0]
    if isinstance(item, float) and item.is_integer():
        item = int(item)  # MATLAB doubles holding integers
    return str(item)


def _annotations(
    tree: SourceTree, rel: str, folder: str, split: str, num_classes: int, problems: Problems
) -> list[tuple[str, ImageRecord]]:
    where_file = tree.where(rel)
    annos = mat_field(load_mat(tree, rel), "annotations", where_file)
    missing = [f for f in _FIELDS if f not in (annos.dtype.names or ())]
    if missing:
        hint = " (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)"
        problems.add(
            where_file,
            f"annotations lack the field(s) {missing}{hint if 'class' in missing else ''}",
        )
        return []
    out = []
    for i, entry in enumerate(annos, 1):
        fname = _scalar(entry, "fname")
        where = f"{where_file}: annotations({i}) fname {fname!r}"
        values = parse_floats([_scalar(entry, f) for f in _FIELDS[:4]], where, problems, "box")
        label = parse_int(_scalar(entry, "class"), where, problems, "class")
        if label is None:
            continue
        if not 1 <= label <= num_classes:
            problems.add(where, f"class {label} out of range 1..{num_classes}")
            continue
        if not fname or "/" in fname or "\\" in fname:
            problems.add(where, f"bad fname {fname!r}")
            continue
        path = f"{folder}/{fname}"
        if not tree.is_file(path):
            problems.add(where, f"image listed but absent: {tree.where(path)}")
        box = box_from_one_based(values, where, problems) if values else None
        image_id = f"{posixpath.basename(folder)}/{posixpath.splitext(fname)[0]}"
        out.append((where, ImageRecord(image_id, path, label - 1, split, box)))
    return out


def read_cars(tree: SourceTree) -> DatasetListing:
    meta = tree.require([d + "cars_meta.mat" for d in _DEVKIT_DIRS], "cars_meta.mat")
    train = tree.require([d + "cars_train_annos.mat" for d in _DEVKIT_DIRS], "cars_train_annos.mat")
    test = tree.require(
        [d + "cars_test_annos_withlabels.mat" for d in ("", "devkit/", "car_devkit/devkit/")],
        "cars_test_annos_withlabels.mat (the devkit's cars_test_annos.mat has no labels)",
    )
    problems = Problems()
    classes = [
        str(c).strip() for c in mat_field(load_mat(tree, meta), "class_names", tree.where(meta))
    ]
    if not classes:
        raise DatasetFormatError(f"{tree.where(meta)}: class_names is empty")
    rows = _annotations(tree, train, "cars_train", "train", len(classes), problems)
    rows += _annotations(tree, test, "cars_test", "test", len(classes), problems)
    check_unique(((r.image_id, where) for where, r in rows), problems)
    problems.raise_if_any(NAME)
    return DatasetListing(
        name=NAME,
        source_format="cars",
        tree=tree,
        classes=classes,
        records=[r for _, r in rows],
        info={"bbox_source": "bbox_x1..bbox_y2, 1-based inclusive: (x1-1, y1-1, x2, y2)"},
    )
