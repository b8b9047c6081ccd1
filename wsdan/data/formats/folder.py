"""A class-folder tree, the layout most users' own data comes in::

    src/<class>/**/<file>.{jpg,jpeg,png,bmp,gif,tif,tiff,webp}    one split (train)
    src/{train,val,test}/<class>/**/<file>.{jpg,...}              when the top level holds
                                                                   only split folders

Classes are the class folders holding at least one image, in sorted order (the union over
the split folders). ``image_id`` is the path relative to ``src``. Files with other
extensions, hidden files and images outside a class folder are ignored and counted in the
manifest (``ignored_files``). No boxes. Without a ``val`` folder, validation is carved
from train; a test split exists only if a ``test`` folder does.
"""

from __future__ import annotations

import posixpath

from ._common import SPLITS, DatasetFormatError, DatasetListing, ImageRecord, SourceTree

# The extensions the raw-folder pipeline reads too (wsdan.data.pipeline.IMAGE_EXTENSIONS):
# what it decodes, prepare stores (an animated GIF gives its first frame, at decode).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_image(path: str) -> bool:
    parts = path.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def read_folder(tree: SourceTree) -> DatasetListing:
    files = sorted(tree.files())
    images = [p for p in files if _is_image(p)]
    tops = {p.split("/")[0] for p in images if "/" in p}
    split_layout = "train" in tops and tops <= set(SPLITS)
    depth = 2 if split_layout else 1  # folders above the class folder's contents
    found = []  # (split, class, path)
    for path in images:
        parts = path.split("/")
        if len(parts) <= depth:
            continue  # an image outside any class folder
        split = parts[0] if split_layout else "train"
        found.append((split, parts[depth - 1], path))
    if not found:
        layout = "src/<class>/<image> or src/{train,val,test}/<class>/<image>"
        raise DatasetFormatError(
            f"no images in class folders under {tree.uri} (expected {layout}, "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted({c for _, c, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(path, path, index[c], split) for split, c, path in found]
    return DatasetListing(
        name=posixpath.basename(tree.uri.rstrip("/")) or "folder",
        source_format="folder",
        tree=tree,
        classes=classes,
        records=records,
        info={"split_folders": split_layout, "ignored_files": len(files) - len(found)},
    )
