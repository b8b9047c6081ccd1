"""Stanford Dogs (Khosla et al. 2011), from ``images.tar``, ``annotation.tar`` and ``lists.tar``::

    Images/<synset>-<breed>/<synset>_<n>.jpg       e.g. Images/n02085620-Chihuahua/n02085620_10074.jpg
    Annotation/<synset>-<breed>/<synset>_<n>       PASCAL VOC XML, no extension
    train_list.mat, test_list.mat                  (or lists/train_list.mat ...): file_list and
                                                   annotation_list (N x 1 cells of paths relative
                                                   to Images/ and Annotation/), labels (N x 1, 1-based)

Classes are the folders of ``Images/`` in sorted order (label k is the k-th synset, which is
how the lists number them; a list entry whose folder disagrees with its label is an error),
named without the synset prefix ("Chihuahua"). ``image_id`` is the file stem, e.g.
``n02085620_10074``.

Boxes: an annotation may hold several ``<object>``s (several dogs, always of the image's
breed). We store the *union* of all of them, the smallest box holding every dog, because
the box is used as "where the object is" (crops, the pointing game) and the first object
alone would cut the other dogs out. VOC boxes are 1-based inclusive, so ``(xmin - 1,
ymin - 1, xmax, ymax)``. Dogs has no validation split: one is carved from train.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET

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
)

NAME = "Stanford Dogs"


def parse_voc_union(data: bytes, where: str, problems: Problems):
    """The union of all ``<object><bndbox>`` boxes of a VOC XML file, or None if it has none."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        line, _ = e.position
        problems.add(f"{where}:{line}", f"malformed XML ({e})")
        return None
    boxes = []
    for i, bndbox in enumerate(root.iter("bndbox"), 1):
        texts = [bndbox.findtext(k, "") for k in ("xmin", "ymin", "xmax", "ymax")]
        values = parse_floats(texts, f"{where}: object {i}", problems, "bndbox")
        box = box_from_one_based(values, f"{where}: object {i}", problems) if values else None
        if box is None:
            return None
        boxes.append(box)
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def read_dogs(tree: SourceTree) -> DatasetListing:
    images = next((d for d in ("Images", "images") if tree.is_dir(d)), None)
    if images is None:
        raise DatasetFormatError(f"no image folder: looked for {tree.where('Images')}/<breed>/")
    notes = next((d for d in ("Annotation", "annotations/Annotation") if tree.is_dir(d)), None)
    if notes is None:
        raise DatasetFormatError(
            f"missing annotation folder Annotation: looked for {tree.where('Annotation')}/<breed>/"
        )
    lists = {
        split: tree.require([f"{split}_list.mat", f"lists/{split}_list.mat"], f"{split}_list.mat")
        for split in ("train", "test")
    }
    synsets = tree.subdirs(images)
    classes = [s.split("-", 1)[1] if "-" in s else s for s in synsets]
    problems = Problems()

    entries = []  # (where, split, image path, annotation path, label)
    for split, rel in lists.items():
        mat = load_mat(tree, rel)
        where_file = tree.where(rel)
        files = mat_field(mat, "file_list", where_file)
        labels = mat_field(mat, "labels", where_file)
        annos = mat_field(mat, "annotation_list", where_file) if "annotation_list" in mat else None
        if len(labels) != len(files) or (annos is not None and len(annos) != len(files)):
            problems.add(where_file, "file_list, annotation_list and labels differ in length")
            continue
        for i, (file, label) in enumerate(zip(files, labels)):
            file = str(file)
            where = f"{where_file}: entry {i + 1} ({file!r})"
            value = float(label)
            if not value.is_integer() or not 1 <= value <= len(synsets):
                problems.add(where, f"label {label} out of range 1..{len(synsets)}")
                continue
            label = int(value)
            folder = posixpath.dirname(file)
            if folder != synsets[label - 1]:
                problems.add(
                    where, f"label {label} is breed {synsets[label - 1]!r}, not {folder!r}"
                )
                continue
            path = f"{images}/{file}"
            if not tree.is_file(path):
                problems.add(where, f"image listed but absent: {tree.where(path)}")
                continue
            anno = f"{notes}/{annos[i] if annos is not None else posixpath.splitext(file)[0]}"
            if not tree.is_file(anno):
                problems.add(where, f"annotation listed but absent: {tree.where(anno)}")
                continue
            entries.append((where, split, path, anno, label - 1))
    check_unique(
        ((posixpath.splitext(posixpath.basename(e[2]))[0], e[0]) for e in entries), problems
    )
    problems.raise_if_any(NAME)

    records = []
    for (_, split, path, anno, label), data in zip(entries, tree.read_many(e[3] for e in entries)):
        box = parse_voc_union(data, tree.where(anno), problems)
        image_id = posixpath.splitext(posixpath.basename(path))[0]
        records.append(ImageRecord(image_id, path, label, split, box))
    problems.raise_if_any(NAME)
    return DatasetListing(
        name=NAME,
        source_format="dogs",
        tree=tree,
        classes=classes,
        records=records,
        info={
            "bbox_source": "Annotation/ VOC XML, union of all objects, 1-based inclusive: "
            "(xmin-1, ymin-1, xmax, ymax)"
        },
    )
