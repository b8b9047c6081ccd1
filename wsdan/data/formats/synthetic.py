"""The generated data set, as written by `wsdan.data.synthetic.write_synthetic_dataset`::

    annotations.csv   image_id, path, label, label_name, coarse_label, split,
                      obj_x0..obj_y1 (object box), part_x0..part_y1 (part box)
    classes.txt       one class name per line, index = label
    dataset.json      the generator's manifest, written last (its absence = incomplete)
    images/<class>/<image_id>.jpg

Its own split column is kept; boxes are already in our convention. The object box becomes
``bbox`` and the part box ``part_bbox``; the coarse label is not carried over.
"""

from __future__ import annotations

import csv
import io
import json

from wsdan.data.synthetic import ANNOTATION_COLUMNS

from ._common import (
    SPLITS,
    DatasetListing,
    ImageRecord,
    Problems,
    SourceTree,
    check_unique,
    parse_floats,
    parse_int,
)

NAME = "synthetic"
# The writer's columns, less the pretraining-only coarse label: one source of truth.
_REQUIRED = tuple(c for c in ANNOTATION_COLUMNS if c != "coarse_label")


def read_synthetic(tree: SourceTree) -> DatasetListing:
    for name in ("annotations.csv", "classes.txt"):
        tree.require([name], name)
    tree.require(
        ["dataset.json"], "dataset.json (written last by the generator; absent = incomplete)"
    )
    problems = Problems()
    spec = json.loads(tree.read_text("dataset.json")).get("spec")
    classes = [c.strip() for c in tree.read_text("classes.txt").splitlines() if c.strip()]

    where_file = tree.where("annotations.csv")
    reader = csv.DictReader(io.StringIO(tree.read_text("annotations.csv"), newline=""))
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        problems.add(f"{where_file}:1", f"header lacks the column(s) {missing}")
        problems.raise_if_any(NAME)
    records, seen = [], []
    for row in reader:
        where = f"{where_file}:{reader.line_num}"
        if None in row or any(row[c] is None for c in _REQUIRED):
            problems.add(where, f"expected {len(reader.fieldnames)} fields")
            continue
        label = parse_int(row["label"], where, problems, "label")
        obj = parse_floats(
            [row[f"obj_{k}"] for k in ("x0", "y0", "x1", "y1")], where, problems, "object box"
        )
        part = parse_floats(
            [row[f"part_{k}"] for k in ("x0", "y0", "x1", "y1")], where, problems, "part box"
        )
        if label is None or obj is None or part is None:
            continue
        if not 0 <= label < len(classes):
            problems.add(where, f"label {label} out of range 0..{len(classes) - 1}")
            continue
        if row["label_name"] != classes[label]:
            problems.add(
                where,
                f"label_name {row['label_name']!r} is not class {label} "
                f"({classes[label]!r}) of classes.txt",
            )
            continue
        if row["split"] not in SPLITS:
            problems.add(where, f"split {row['split']!r} is not one of {SPLITS}")
            continue
        if not tree.is_file(row["path"]):
            problems.add(where, f"image listed but absent: {tree.where(row['path'])}")
            continue
        seen.append((row["image_id"], where))
        records.append(
            ImageRecord(row["image_id"], row["path"], label, row["split"], tuple(obj), tuple(part))
        )
    check_unique(seen, problems)
    problems.raise_if_any(NAME)
    return DatasetListing(
        name=NAME,
        source_format="synthetic",
        tree=tree,
        classes=classes,
        records=records,
        info={
            "bbox_source": "object box; part_bbox: discriminative-part box",
            "synthetic_spec": spec,
        },
    )
