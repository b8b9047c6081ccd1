"""Tests for the data-set readers (wsdan/data/formats/): tiny copies of each published layout,
built here with PIL and scipy.io.savemat, listed and checked; bad copies raise with file:line.

The ``make_*`` builders are also used by tests/data/test_prepare.py.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from wsdan.data.formats import DatasetFormatError, crop_banner, read_dataset
from wsdan.data.synthetic import SyntheticSpec, write_synthetic_dataset

W, H = 48, 40  # size of most fixture images


def write_image(path: Path, colour: tuple[int, int, int], size=(W, H), fmt="JPEG") -> bytes:
    """A small image with a little structure (so JPEG has something to encode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 90, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _colour(k: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * k, 30 + 25 * i, 120)


# --- CUB-200-2011 ------------------------------------------------------------------------
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root: Path, per_class: int = 4) -> Path:
    """CUB_200_2011/ with 3 classes x ``per_class`` images; the last image of each class is
    test. Image id i has box x=i, y=2, w=10, h=20."""
    root = root / "CUB_200_2011"
    images, labels, split, boxes = [], [], [], []
    for k, name in enumerate(CUB_CLASSES):
        for j in range(per_class):
            i = k * per_class + j + 1
            rel = f"{name}/{name[4:]}_{i:04d}_{100 + i}.jpg"
            write_image(root / "images" / rel, _colour(k, j))
            images.append(f"{i} {rel}")
            labels.append(f"{i} {k + 1}")
            split.append(f"{i} {0 if j == per_class - 1 else 1}")
            boxes.append(f"{i} {float(i)} 2.0 10.0 20.0")
    for name, lines in {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "bounding_boxes.txt": boxes,
        "classes.txt": [f"{k + 1} {n}" for k, n in enumerate(CUB_CLASSES)],
    }.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


# --- FGVC-Aircraft -----------------------------------------------------------------------
AIRCRAFT_VARIANTS = ["707-320", "Boeing 717", "F/A-18"]
AW, AH = 64, 60  # aircraft images; the bottom 20 rows are the banner


def make_aircraft(root: Path, official: bool = True) -> Path:
    """fgvc-aircraft-2013b/data with 3 variants x 3 images (one per split). Image n has the
    1-based box (n, 3, 40, AH) and a white banner."""
    data = root / "fgvc-aircraft-2013b" / "data"
    per_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    boxes = []
    n = 0
    for k, variant in enumerate(AIRCRAFT_VARIANTS):
        for split in per_split:
            n += 1
            image_id = f"{1000000 + n:07d}"
            image = Image.new("RGB", (AW, AH), _colour(k, n))
            image.paste((255, 255, 255), (0, AH - 20, AW, AH))  # the copyright banner
            (data / "images").mkdir(parents=True, exist_ok=True)
            image.save(data / "images" / f"{image_id}.jpg", quality=90)
            per_split[split].append(f"{image_id} {variant}")
            boxes.append(f"{image_id} {n} 3 40 {AH}")
    (data / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    if official:
        for split, lines in per_split.items():
            (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    else:
        trainval = per_split["train"] + per_split["val"]
        (data / "images_variant_trainval.txt").write_text("\n".join(trainval) + "\n")
        (data / "images_variant_test.txt").write_text("\n".join(per_split["test"]) + "\n")
    return root / "fgvc-aircraft-2013b"


# --- Stanford Cars -----------------------------------------------------------------------
CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]


def _cars_annotations(rows: list[tuple[int, int, int, int, int, str]]) -> np.ndarray:
    """A 1 x N MATLAB struct array with the devkit's field names and value types."""
    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    out = np.empty((1, len(rows)), dtype=dtype)
    for i, (x1, y1, x2, y2, label, fname) in enumerate(rows):
        out[0, i] = (
            np.array([[x1]], np.uint8),
            np.array([[y1]], np.uint8),
            np.array([[x2]], np.uint16),
            np.array([[y2]], np.uint16),
            np.array([[label]], np.uint8),
            np.array([fname]),
        )
    return out


def make_cars(root: Path, train_per_class: int = 4, test_per_class: int = 1) -> Path:
    """Devkit layout; train and test reuse the file names 00001.jpg, ... Train image n has
    the 1-based box (n, 2, 30, 35)."""
    root = root / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CARS_CLASSES)), dtype=object)
    names[0, :] = CARS_CLASSES
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for folder, per_class, mat in (
        ("cars_train", train_per_class, root / "devkit" / "cars_train_annos.mat"),
        ("cars_test", test_per_class, root / "cars_test_annos_withlabels.mat"),
    ):
        rows = []
        for k in range(len(CARS_CLASSES)):
            for _ in range(per_class):
                n = len(rows) + 1
                write_image(root / folder / f"{n:05d}.jpg", _colour(k, n))
                rows.append((n, 2, 30, 35, k + 1, f"{n:05d}.jpg"))
        scipy.io.savemat(mat, {"annotations": _cars_annotations(rows)})
    return root


# --- Stanford Dogs -----------------------------------------------------------------------
DOGS_SYNSETS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02096051-Airedale"]


def _voc(stem: str, boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>dog</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in boxes
    )
    return (
        f"<annotation><folder>{stem.split('_')[0][1:]}</folder><filename>{stem}</filename>"
        f"<source><database>ImageNet database</database></source><size><width>{W}</width>"
        f"<height>{H}</height><depth>3</depth></size><segment>0</segment>{objects}</annotation>"
    )


def _cell(values: list[str]) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        out[i, 0] = np.array([v])
    return out


def make_dogs(root: Path, train_per_class: int = 4, lists_dir: str = "") -> Path:
    """Images/, Annotation/ and {train,test}_list.mat; one test image per breed. The first
    image of each breed has two dogs: boxes (2, 3, 10, 12) and (20, 5, 30, 25)."""
    root = root / "stanford_dogs"
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for k, synset in enumerate(DOGS_SYNSETS):
        for j in range(train_per_class + 1):
            stem = f"{synset.split('-')[0]}_{1000 + j}"
            write_image(root / "Images" / synset / f"{stem}.jpg", _colour(k, j))
            boxes = [(2, 3, 10, 12), (20, 5, 30, 25)] if j == 0 else [(j, j, 40, 30)]
            anno = root / "Annotation" / synset / stem
            anno.parent.mkdir(parents=True, exist_ok=True)
            anno.write_text(_voc(stem, boxes))
            split = "test" if j == train_per_class else "train"
            lists[split][0].append(f"{synset}/{stem}.jpg")
            lists[split][1].append(k + 1)
    (root / lists_dir).mkdir(parents=True, exist_ok=True)
    for split, (files, labels) in lists.items():
        scipy.io.savemat(
            root / lists_dir / f"{split}_list.mat",
            {
                "file_list": _cell(files),
                "annotation_list": _cell([f[: -len(".jpg")] for f in files]),
                "labels": np.array(labels, dtype=np.float64)[:, None],
            },
        )
    return root


# --- class folders and the generated set -------------------------------------------------
def make_folder(root: Path, split_folders: bool = False) -> Path:
    """Classes "beetle", "moth" and "wasp" (JPEG, PNG and webp files), 4 images each, plus a
    non-image file; with ``split_folders``: train/ (3 each) and test/ (1 each)."""
    root = root / "insects"
    for k, name in enumerate(("beetle", "moth", "wasp")):
        for j in range(4):
            split = ("test" if j == 3 else "train") if split_folders else ""
            ext, fmt = [(".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP")][k]
            write_image(root / split / name / f"img{j}{ext}", _colour(k, j), fmt=fmt)
    (root / "README.txt").write_text("not an image\n")
    return root


def make_synthetic(root: Path) -> Path:
    spec = SyntheticSpec(num_classes=3, image_size=32, seed=1)
    return write_synthetic_dataset(
        root / "synthetic", spec=spec, n_train=6, n_val=3, n_test=3, progress=False
    )


# --- readers ------------------------------------------------------------------------------
def test_cub_listing(tmp_path):
    listing = read_dataset("cub", str(make_cub(tmp_path)))
    assert listing.classes == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    by_id = {r.image_id: r for r in listing.records}
    assert len(by_id) == 12 and listing.records[0].image_id == "1"
    assert [r.image_id for r in listing.records] == sorted(by_id)  # sorted as strings
    r = by_id["6"]  # class 2, second image, train
    assert (r.label, r.split, r.bbox) == (1, "train", (6.0, 2.0, 16.0, 22.0))
    assert r.path.startswith("images/002.Laysan_Albatross/")
    assert [by_id[i].split for i in ("4", "8", "12")] == ["test"] * 3
    assert sum(r.split == "train" for r in listing.records) == 9
    # --src may be the folder's parent too
    parent = read_dataset("cub", str(tmp_path))
    assert len(parent.records) == 12 and parent.records[0].path.startswith("CUB_200_2011/images/")


def test_aircraft_official_split_and_one_based_boxes(tmp_path):
    listing = read_dataset("aircraft", str(make_aircraft(tmp_path)))
    assert listing.classes == AIRCRAFT_VARIANTS  # names with spaces and slashes
    assert [r.split for r in listing.records] == ["train", "val", "test"] * 3
    assert [r.label for r in listing.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    r = listing.records[4]  # image n = 5: 1-based box (5, 3, 40, 60)
    assert (r.image_id, r.bbox) == ("1000005", (4.0, 2.0, 40.0, 60.0))
    assert listing.info["banner_cropped"] and listing.info["official_val_split"]


def test_aircraft_trainval_layout_has_no_val(tmp_path):
    listing = read_dataset("aircraft", str(make_aircraft(tmp_path, official=False)))
    assert sorted({r.split for r in listing.records}) == ["test", "train"]
    assert not listing.info["official_val_split"]


def test_crop_banner_removes_20_rows_and_keeps_the_quantiser(tmp_path):
    root = make_aircraft(tmp_path)
    data = (root / "data" / "images" / "1000001.jpg").read_bytes()
    cropped = crop_banner(data)
    with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(cropped)) as b:
        assert (a.format, b.format) == ("JPEG", "JPEG")
        assert b.size == (AW, AH - 20)
        assert a.quantization == b.quantization
        pixels = np.asarray(b.convert("RGB"), dtype=int)
        top = np.asarray(a.convert("RGB"), dtype=int)[: AH - 20]
    assert np.abs(pixels - top).mean() < 2.0  # the same picture, one more JPEG rounding
    assert pixels[-1].mean() < 200  # no white banner row left
    assert crop_banner(data) == cropped  # deterministic


def test_cars_listing(tmp_path):
    listing = read_dataset("cars", str(make_cars(tmp_path)))
    assert listing.classes == CARS_CLASSES
    ids = [r.image_id for r in listing.records]
    assert "cars_train/00001" in ids and "cars_test/00001" in ids and len(set(ids)) == 15
    by_id = {r.image_id: r for r in listing.records}
    r = by_id["cars_train/00006"]  # second class, 1-based box (6, 2, 30, 35)
    assert (r.label, r.split, r.path, r.bbox) == (
        1,
        "train",
        "cars_train/00006.jpg",
        (5.0, 1.0, 30.0, 35.0),
    )
    assert by_id["cars_test/00003"].label == 2 and by_id["cars_test/00003"].split == "test"


def test_dogs_listing_and_union_of_boxes(tmp_path):
    listing = read_dataset("dogs", str(make_dogs(tmp_path, lists_dir="lists")))
    assert listing.classes == ["Chihuahua", "Japanese_spaniel", "Airedale"]
    by_id = {r.image_id: r for r in listing.records}
    two_dogs = by_id["n02085782_1000"]
    assert two_dogs.label == 1 and two_dogs.split == "train"
    assert two_dogs.bbox == (1.0, 2.0, 30.0, 25.0)  # union of (2,3,10,12) and (20,5,30,25)
    assert by_id["n02096051_1002"].bbox == (1.0, 1.0, 40.0, 30.0)
    assert [by_id[f"{s.split('-')[0]}_1004"].split for s in DOGS_SYNSETS] == ["test"] * 3
    assert "union" in listing.info["bbox_source"]


@pytest.mark.parametrize("split_folders", [False, True])
def test_folder_listing(tmp_path, split_folders):
    listing = read_dataset("folder", str(make_folder(tmp_path, split_folders)))
    assert listing.classes == ["beetle", "moth", "wasp"]
    assert len(listing.records) == 12 and listing.info["ignored_files"] == 1
    assert all(r.bbox is None for r in listing.records)
    r = next(r for r in listing.records if r.image_id.endswith("wasp/img3.webp"))
    assert r.label == 2
    assert r.split == ("test" if split_folders else "train")
    assert r.image_id == ("test/wasp/img3.webp" if split_folders else "wasp/img3.webp")


def test_synthetic_listing_keeps_split_and_both_boxes(tmp_path):
    import csv

    root = make_synthetic(tmp_path)
    listing = read_dataset("synthetic", str(root))
    assert listing.classes == (root / "classes.txt").read_text().split()
    with open(root / "annotations.csv", newline="") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    assert len(listing.records) == 12
    for r in listing.records:
        row = rows[r.image_id]
        assert (r.label, r.split) == (int(row["label"]), row["split"])
        assert r.bbox == tuple(float(row[f"obj_{k}"]) for k in ("x0", "y0", "x1", "y1"))
        assert r.part_bbox == tuple(float(row[f"part_{k}"]) for k in ("x0", "y0", "x1", "y1"))
    assert listing.info["synthetic_spec"]["num_classes"] == 3


# --- bad input: every problem names its file and line ------------------------------------
def _edit(path: Path, line: int, new: str | None) -> None:
    """Replace 1-based ``line`` of ``path`` (None: append ``new`` as a new last line)."""
    lines = path.read_text().splitlines()
    if line == 0:
        lines.append(new)
    else:
        lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")


def _raises(fmt: str, src: Path, *fragments: str) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as info:
        read_dataset(fmt, str(src))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def test_cub_missing_annotation_file_is_named(tmp_path):
    root = make_cub(tmp_path)
    (root / "bounding_boxes.txt").unlink()
    _raises(
        "cub", root, "missing annotation file bounding_boxes.txt", str(root / "bounding_boxes.txt")
    )


@pytest.mark.parametrize(
    "file, line, text, expected",
    [
        (
            "image_class_labels.txt",
            3,
            "3 4",
            "image_class_labels.txt:3: class id 4 out of range 1..3",
        ),
        (
            "images.txt",
            0,
            "5 001.Black_footed_Albatross/x.jpg",
            "images.txt:13: duplicate image id '5'",
        ),
        ("bounding_boxes.txt", 4, "4 1.0 2.0 3.0", "bounding_boxes.txt:4: expected 5 fields"),
        ("bounding_boxes.txt", 2, "2 1.0 2.0 abc 3.0", "bounding_boxes.txt:2: box is not numeric"),
        (
            "train_test_split.txt",
            7,
            "7 2",
            "train_test_split.txt:7: is_training_image must be 0 or 1",
        ),
        ("classes.txt", 2, "5 002.Laysan_Albatross", "classes.txt:2: class ids must run"),
    ],
)
def test_cub_bad_lines(tmp_path, file, line, text, expected):
    root = make_cub(tmp_path)
    _edit(root / file, line, text)
    _raises("cub", root, expected)


def test_cub_image_listed_but_absent_and_all_problems_reported(tmp_path):
    root = make_cub(tmp_path)
    (root / "images" / "001.Black_footed_Albatross").joinpath(
        "Black_footed_Albatross_0002_102.jpg"
    ).unlink()
    _edit(root / "image_class_labels.txt", 9, "9 0")
    error = _raises(
        "cub",
        root,
        f"{root / 'images.txt'}:2: image listed but absent",
        "image_class_labels.txt:9: class id 0 out of range",
        "2 problems",
    )
    assert len(error.problems) == 2 and isinstance(error, ValueError)


def test_aircraft_bad_inputs(tmp_path):
    root = make_aircraft(tmp_path)
    data = root / "data"
    _edit(data / "images_variant_val.txt", 2, "1000005 Boeing 747")
    _raises(
        "aircraft", root, "images_variant_val.txt:2: variant 'Boeing 747' is not in variants.txt"
    )
    _edit(data / "images_variant_val.txt", 2, "1000005 Boeing 717")
    _edit(data / "images_variant_test.txt", 0, "1000001 707-320")  # also in train
    _raises("aircraft", root, "images_variant_test.txt:4: duplicate image id '1000001'")
    _edit(data / "images_variant_test.txt", 4, "")
    _edit(data / "images_box.txt", 3, "1000003 1 2 3")
    _raises("aircraft", root, "images_box.txt:3: expected 5 fields")
    (data / "variants.txt").unlink()
    _raises("aircraft", root, "missing annotation file variants.txt")


def test_aircraft_without_split_files_names_them(tmp_path):
    root = make_aircraft(tmp_path)
    (root / "data" / "images_variant_val.txt").unlink()
    _raises("aircraft", root, "images_variant_trainval.txt")


def test_cars_bad_inputs(tmp_path):
    root = make_cars(tmp_path)
    mat = root / "devkit" / "cars_train_annos.mat"
    annos = scipy.io.loadmat(mat)["annotations"]
    annos[0, 1]["class"] = np.array([[9]], np.uint8)
    annos[0, 4]["fname"] = np.array(["99999.jpg"])
    scipy.io.savemat(mat, {"annotations": annos})
    _raises(
        "cars",
        root,
        "cars_train_annos.mat: annotations(2) fname '00002.jpg': class 9 out of range 1..3",
        "annotations(5) fname '99999.jpg': image listed but absent",
    )
    (root / "cars_test_annos_withlabels.mat").unlink()
    _raises("cars", root, "missing annotation file cars_test_annos_withlabels.mat")


def test_cars_test_file_without_labels_is_explained(tmp_path):
    root = make_cars(tmp_path)
    annos = scipy.io.loadmat(root / "cars_test_annos_withlabels.mat")["annotations"]
    fields = [f for f in annos.dtype.names if f != "class"]
    unlabelled = np.empty(annos.shape, dtype=[(f, "O") for f in fields])
    for f in fields:
        unlabelled[f] = annos[f]
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": unlabelled})
    _raises("cars", root, "lack the field(s) ['class']", "use cars_test_annos_withlabels.mat")


def test_dogs_bad_inputs(tmp_path):
    root = make_dogs(tmp_path)
    mat = scipy.io.loadmat(root / "train_list.mat")
    mat["labels"][2, 0] = 2.0  # a Chihuahua labelled as the second breed
    mat["labels"][5, 0] = 7.0
    scipy.io.savemat(
        root / "train_list.mat", {k: v for k, v in mat.items() if not k.startswith("__")}
    )
    _raises(
        "dogs",
        root,
        "train_list.mat: entry 3 ('n02085620-Chihuahua/n02085620_1002.jpg'): label 2 is breed",
        "entry 6 ('n02085782-Japanese_spaniel/n02085782_1001.jpg'): label 7.0 out of range 1..3",
    )


def test_dogs_malformed_xml_names_file_and_line(tmp_path):
    root = make_dogs(tmp_path)
    anno = root / "Annotation" / "n02096051-Airedale" / "n02096051_1001"
    anno.write_text("<annotation>\n<object>\n<bndbox><xmin>1</xmin>\n</annotation>\n")
    _raises("dogs", root, f"{anno}:4: malformed XML")
    anno.unlink()
    _raises("dogs", root, "annotation listed but absent", str(anno))
    (root / "test_list.mat").unlink()
    _raises("dogs", root, "missing annotation file test_list.mat")


def test_synthetic_bad_inputs(tmp_path):
    root = make_synthetic(tmp_path)
    csv_path = root / "annotations.csv"
    original = csv_path.read_text().splitlines()
    fields = original[2].split(",")
    fields[2] = "7"
    _edit(csv_path, 3, ",".join(fields))
    _raises("synthetic", root, "annotations.csv:3: label 7 out of range 0..2")
    _edit(csv_path, 3, original[2])
    _edit(csv_path, 0, original[4])
    _raises("synthetic", root, "annotations.csv:14: duplicate image id", "annotations.csv:5")
    (root / "dataset.json").unlink()
    _raises("synthetic", root, "missing annotation file dataset.json")


def test_folder_without_class_folders_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.jpg", (1, 2, 3))
    _raises("folder", tmp_path / "flat", "no images in class folders")
    shutil.rmtree(tmp_path / "flat")
    _raises("folder", tmp_path / "flat", "source folder not found")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'imagenet'"):
        read_dataset("imagenet", ".")
