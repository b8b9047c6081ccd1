"""Tests for the generated fine-grained data set (wsdan/data/synthetic.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsdan.data.synthetic import (
    VOCABULARY_SIZE,
    SyntheticSpec,
    class_names,
    coarse_class_names,
    generate_arrays,
    load_synthetic_split,
    render_sample,
    sample_label,
    write_synthetic_dataset,
)

SIZE = 64


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    """700 samples at 64 px, K = 10, shared by the geometry and classifier tests."""
    return generate_arrays(SyntheticSpec(image_size=SIZE, seed=3), range(700))


def test_same_seed_and_index_give_identical_images():
    spec = SyntheticSpec(image_size=SIZE, seed=7)
    a, b = render_sample(spec, 12), render_sample(spec, 12)
    assert a.image.dtype == np.uint8 and a.image.shape == (SIZE, SIZE, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.label, a.coarse_label, a.object_box, a.part_box) == (
        b.label,
        b.coarse_label,
        b.object_box,
        b.part_box,
    )
    # Sample i does not depend on which other samples were rendered, nor in what order.
    batch = generate_arrays(spec, [30, 12, 5])
    assert batch["images"][1].tobytes() == a.image.tobytes()
    other_seed = render_sample(SyntheticSpec(image_size=SIZE, seed=8), 12)
    other_index = render_sample(spec, 13)
    assert np.abs(other_seed.image.astype(int) - a.image).mean() > 20
    assert np.abs(other_index.image.astype(int) - a.image).mean() > 20


def test_boxes_lie_in_the_image_and_the_part_in_the_object(arrays):
    obj, part = arrays["object_boxes"], arrays["part_boxes"]  # (N, 4) each
    for boxes in (obj, part):
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (part[:, :2] >= obj[:, :2] - 0.5).all() and (part[:, 2:] <= obj[:, 2:] + 0.5).all()
    part_frac = (part[:, 2] - part[:, 0]) * (part[:, 3] - part[:, 1]) / SIZE**2
    assert part_frac.min() > 0.015 and part_frac.max() < 0.06
    assert 0.025 < part_frac.mean() < 0.045
    obj_frac = (obj[:, 2] - obj[:, 0]) * (obj[:, 3] - obj[:, 1]) / SIZE**2
    assert 0.1 < obj_frac.mean() < 0.6


def test_part_box_holds_the_part_colour():
    """The box is where the glyph was drawn: its class colour dominates the box's centre."""
    from wsdan.data.synthetic import COLOURS

    spec = SyntheticSpec(image_size=128, seed=1, noise_std_range=(0.0, 0.0))
    checked = 0
    for index in range(30):
        s = render_sample(spec, index)
        if not s.label_name.endswith("-solid"):
            continue
        x0, y0, x1, y1 = s.part_box
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        centre = s.image[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).astype(int)
        want = np.array(COLOURS[s.label_name.split("-")[0]])
        assert np.abs(centre - want).max() <= 2, (index, s.label_name)
        checked += 1
    assert checked == 6  # classes 0 and 5 are the solid ones, once per block of 10


def test_labels_are_balanced_and_coarse_labels_independent(arrays):
    labels, coarse = arrays["labels"], arrays["coarse_labels"]
    assert np.bincount(labels[:400], minlength=10).tolist() == [40] * 10
    assert all(sample_label(SyntheticSpec(num_classes=7), i) in range(7) for i in range(20))
    # The coarse label (body family x wing-glyph shape) says nothing about the fine label:
    # all 12 coarse classes occur and each fine class meets most of them.
    assert set(coarse.tolist()) == set(range(len(coarse_class_names())))
    assert len(coarse_class_names()) == 12
    for k in range(10):
        assert len(set(coarse[labels == k].tolist())) >= 9


def test_class_vocabulary():
    names = class_names(200)
    assert len(set(names)) == 200 and VOCABULARY_SIZE >= 200
    assert names[:3] == ["red-circle-solid", "orange-square-stripes", "yellow-triangle-dot"]
    assert class_names(10) == names[:10]
    # The first K classes are spread out: for K = 7 no colour or shape repeats.
    first = [n.split("-") for n in class_names(7)]
    assert len({c for c, _, _ in first}) == 7 and len({s for _, s, _ in first}) == 6
    spec = SyntheticSpec(num_classes=200, image_size=SIZE)
    s = render_sample(spec, 123)
    assert 0 <= s.label < 200 and s.label_name == names[s.label]
    for bad in (1, 0, VOCABULARY_SIZE + 1):
        with pytest.raises(ValueError, match="num_classes"):
            SyntheticSpec(num_classes=bad)
        with pytest.raises(ValueError, match="num_classes"):
            class_names(bad)


def test_spec_dict_round_trip():
    spec = SyntheticSpec(num_classes=20, image_size=96, seed=5, part_area_range=(0.04, 0.05))
    d = json.loads(json.dumps(spec.to_dict()))
    assert SyntheticSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="colour_depth"):
        SyntheticSpec.from_dict({**d, "colour_depth": 8})


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_write_and_load_round_trip(tmp_path):
    spec = SyntheticSpec(num_classes=5, image_size=SIZE, seed=2)
    kwargs = dict(spec=spec, n_train=23, n_val=7, n_test=9, progress=False)
    root = write_synthetic_dataset(tmp_path / "a", **kwargs)
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["counts"] == {"train": 23, "val": 7, "test": 9}
    assert SyntheticSpec.from_dict(manifest["spec"]) == spec
    assert (root / "classes.txt").read_text().splitlines() == class_names(5)
    assert (root / "coarse_classes.txt").read_text().splitlines() == coarse_class_names()
    header = (root / "annotations.csv").read_text().splitlines()[0]
    assert header == (
        "image_id,path,label,label_name,coarse_label,split,obj_x0,obj_y0,obj_x1,"
        "obj_y1,part_x0,part_y0,part_x1,part_y1"
    )
    assert len(list((root / "images").rglob("*.jpg"))) == 39

    starts = {"train": 0, "val": 23, "test": 30}
    for split, n in manifest["counts"].items():
        loaded = load_synthetic_split(root, split)
        expected = generate_arrays(spec, range(starts[split], starts[split] + n))
        assert loaded.keys() == expected.keys()
        assert loaded["images"].shape == (n, SIZE, SIZE, 3)
        for key in ("labels", "coarse_labels", "object_boxes", "part_boxes"):
            np.testing.assert_array_equal(loaded[key], expected[key])
        # JPEG at quality 95 is lossy but close.
        assert np.abs(loaded["images"].astype(int) - expected["images"]).mean() < 4

    # Idempotent: a second run into the same folder changes nothing, and a run into a
    # fresh folder writes byte-identical files.
    before = _tree_hashes(root)
    write_synthetic_dataset(root, **kwargs)
    assert _tree_hashes(root) == before
    assert _tree_hashes(write_synthetic_dataset(tmp_path / "b", **kwargs)) == before
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(root, **{**kwargs, "n_test": 10})
    with pytest.raises(ValueError, match="split"):
        load_synthetic_split(root, "validation")


def _colour_histograms(images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Normalised 4x4x4 RGB histograms, (N, 64)."""
    out = []
    for im in images:
        q = im.reshape(-1, 3).astype(np.int64) // 64
        h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64)
        out.append(h / h.sum())
    return np.stack(out).astype(np.float32)


def _part_crops(images: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    crops = []
    for im, (x0, y0, x1, y1) in zip(images, boxes):
        crops.append(im[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))])
    return crops


def _softmax_regression_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Standardised features, multinomial logistic regression with a little L2, full-batch
    L-BFGS to convergence; accuracy on the held-out set."""
    torch.manual_seed(0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.from_numpy((x_train - mean) / std)
    xte = torch.from_numpy((x_test - mean) / std)
    ytr = torch.from_numpy(y_train)
    linear = torch.nn.Linear(xtr.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xtr), ytr)
        loss = loss + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(xte).argmax(1) == torch.from_numpy(y_test)).float().mean())


def test_class_information_is_only_in_the_part(arrays):
    """The key property: global colour statistics do not solve the task, the part does."""
    train, test = slice(0, 400), slice(400, 700)
    images, labels, parts = arrays["images"], arrays["labels"], arrays["part_boxes"]
    chance = 1.0 / 10
    whole = _colour_histograms(images)
    acc_whole = _softmax_regression_accuracy(whole[train], labels[train], whole[test], labels[test])
    crops = _colour_histograms(_part_crops(images, parts))
    acc_part = _softmax_regression_accuracy(crops[train], labels[train], crops[test], labels[test])
    print(f"colour-histogram classifier: whole image {acc_whole:.3f}, part box {acc_part:.3f}")
    assert acc_whole < chance + 0.15
    assert acc_part > 0.6
