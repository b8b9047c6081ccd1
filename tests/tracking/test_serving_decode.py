"""Serving decodes like training: the pyfunc model's pre-processing of odd image files equals
the validation pre-processing (``wsdan.data.decode.decode_batch`` at resize_size, then
``wsdan.transforms.center_crop`` as in ``wsdan.engine.evaluate``), and so do its predictions.
Bad inputs are client errors that name the row. No services: the pyfunc model is loaded from a
spec and state dict in a temporary folder (the served path is in test_pyfunc.py)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from wsdan.config import TrainConfig
from wsdan.data.decode import decode_batch
from wsdan.inference import predict
from wsdan.model import build_model
from wsdan.tracking.pyfunc import (
    SPEC_ARTIFACT,
    STATE_DICT_ARTIFACT,
    WSDANPyfunc,
    decode_image,
    model_spec,
    preprocess,
)
from wsdan.transforms import center_crop

R, S = 36, 32  # resize_size, image_size: tiny, as the test wants speed
CLASS_NAMES = ["a", "b", "c"]
CFG = TrainConfig.from_dict({
    "model": {"backbone": "resnet18_layer3", "num_classes": 3, "num_attentions": 2},
    "data": {"image_size": S, "resize_size": R},
    "inference": {"refine_theta": 0.5, "refine_padding": 0.05},
})  # fmt: skip
ORIENTATION = 0x0112  # the EXIF tag


# -- the files -------------------------------------------------------------------------------


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """H×W×3 uint8 like a photo: smooth gradients, a soft blob and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-(((xx - 0.6 * w) / (0.25 * w)) ** 2 + ((yy - 0.4 * h) / (0.3 * h)) ** 2))
    a = np.stack([40 + 150 * xx / w + 60 * blob, 60 + 120 * yy / h, 180 - 120 * blob], -1)
    return np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    """Encoded images whose decoding differs from a plain ``convert("RGB")`` + torch resize."""
    rgba = np.dstack([_photo(48, 40, 1), np.zeros((48, 40), np.uint8)])
    rgba[:, 20:, 3] = 255  # left half transparent, right half opaque ...
    rgba[10:20, 25:35, 3] = 100  # ... with a half-transparent patch
    grey16 = (np.linspace(0, 1, 40 * 56).reshape(40, 56) ** 2 * 65535).astype(np.uint16)
    pal = Image.fromarray(_photo(44, 52, 2)).quantize(16)  # mode P
    pal.paste(0, (0, 0, 20, 44))  # the left stripe in colour 0, made transparent below
    cmyk = Image.fromarray(_photo(40, 48, 3)).convert("CMYK")
    rotated = Image.fromarray(_photo(40, 60, 4))  # landscape pixels, "portrait" per EXIF
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # rotate 90° clockwise to display
    files = {
        "rgba_png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "grey16_png": _save(Image.fromarray(grey16), "PNG"),
        "palette_gif": _save(pal, "GIF", transparency=0),
        "cmyk_jpeg": _save(cmyk, "JPEG", quality=90),
        # 80×72 >= 2×R: decode reads it at half scale (PIL draft), serving must too.
        "photo_jpeg": _save(Image.fromarray(_photo(72, 80, 5)), "JPEG", quality=85),
        "exif_jpeg": _save(rotated, "JPEG", quality=90, exif=exif.tobytes()),
    }
    modes = {"rgba_png": "RGBA", "grey16_png": "I;16", "palette_gif": "P",
             "cmyk_jpeg": "CMYK", "photo_jpeg": "RGB", "exif_jpeg": "RGB"}
    for name, data in files.items():  # the files are what the test means them to be
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == modes[name], name
            if name == "palette_gif":
                assert im.info.get("transparency") == 0
            if name == "exif_jpeg":
                assert im.getexif()[ORIENTATION] == 6
    return files


def _validation(files: list[bytes]) -> torch.Tensor:
    """What evaluation sees: the pipeline's decode_batch at resize_size, then center_crop."""
    table = pa.table({"image": pa.array(files, pa.binary()), "label": [0] * len(files),
                      "image_id": [str(i) for i in range(len(files))]})
    out = decode_batch(table, R)
    assert not out.skipped
    return center_crop(torch.from_numpy(out.columns["image"]), S)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny model, and the pyfunc model loaded from its spec and state dict (as
    ``load_context`` does in ``mlflow models serve``)."""
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=2).eval()
    with torch.no_grad():  # nearest-prototype classifier: the classes differ between images
        feats = model(_validation(list(_files().values())[:3])).features
        model.classifier.weight.copy_(feats / feats.norm(dim=1, keepdim=True))
    tmp = tmp_path_factory.mktemp("served")
    torch.save(model.state_dict(), tmp / "state_dict.pt")
    (tmp / "spec.json").write_text(json.dumps(model_spec(model, CFG, CLASS_NAMES)))
    pyfunc = WSDANPyfunc()
    pyfunc.load_context(SimpleNamespace(
        artifacts={STATE_DICT_ARTIFACT: str(tmp / "state_dict.pt"),
                   SPEC_ARTIFACT: str(Path(tmp / "spec.json"))},
        model_config={"device": "cpu"}))
    return SimpleNamespace(model=model, pyfunc=pyfunc)


# -- serving pre-processing = validation pre-processing --------------------------------------


@pytest.mark.parametrize("name", list(_files()))
def test_served_input_equals_validation_input(name: str) -> None:
    data = _files()[name]
    expected = _validation([data])
    assert expected.shape == (1, 3, S, S)
    as_text = base64.b64encode(data).decode("ascii")
    for value in (data, as_text):
        got = preprocess([value], resize_size=R, image_size=S)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the same code: identical
    if name != "photo_jpeg":  # decoded pixels as an array: the same conversion and resize
        got = preprocess([decode_image(data)], resize_size=R, image_size=S)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_conversions_are_the_documented_ones() -> None:
    """Alpha over white, 16-bit scaled (not clipped to white), EXIF orientation ignored."""
    files = _files()
    full = {name: decode_image(data) for name, data in files.items()}
    assert (full["rgba_png"][:, :20] == 255).all()  # fully transparent: white
    assert (full["palette_gif"][:, :20] == 255).all()  # the transparent palette colour
    grey = full["grey16_png"]
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[-1, -1].tolist() == [255, 255, 255]
    assert 40 < grey.mean() < 130  # a squared ramp: mostly dark, nowhere clipped
    assert full["exif_jpeg"].shape == (40, 60, 3)  # stored pixels, not turned to 60×40
    stripped = _save(Image.open(io.BytesIO(files["exif_jpeg"])), "PNG")  # no EXIF
    np.testing.assert_array_equal(full["exif_jpeg"], decode_image(stripped))


def test_served_predictions_equal_validation_predictions(served) -> None:
    files = list(_files().values())
    out = predict(served.model, _validation(files), theta=CFG.inference.refine_theta,
                  padding=CFG.inference.refine_padding)
    probs = torch.softmax(out.logits.double(), dim=1).numpy()
    got = served.pyfunc.predict(None, pd.DataFrame({"image": files}))
    np.testing.assert_array_equal(got["class_id"].to_numpy(), probs.argmax(axis=1))
    assert set(got["class_id"]) == {0, 1, 2}  # the prototypes make the classes differ
    np.testing.assert_allclose(np.stack(got["probabilities"].to_numpy()), probs,
                               atol=1e-6, rtol=0)
    boxes = got[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()
    np.testing.assert_array_equal(boxes, out.boxes.numpy().astype(np.int64))


# -- bad input: a client error naming the row -----------------------------------------------


def _client_error(pyfunc: WSDANPyfunc, model_input) -> str:
    with pytest.raises(MlflowException) as info:
        pyfunc.predict(None, model_input)
    assert info.value.get_http_status_code() == 400, info.value.error_code
    return info.value.message


def test_bad_rows_are_named(served) -> None:
    good = _files()["photo_jpeg"]
    message = _client_error(served.pyfunc, pd.DataFrame({"image": [good, good, b"not an image"]}))
    assert message.startswith("row 2: cannot decode image (12 bytes): "), message
    message = _client_error(served.pyfunc, pd.DataFrame(
        {"image": [b"\x89PNG truncated", good, None, np.zeros((4, 4), np.float32)]}))
    assert message.startswith("row 0: cannot decode image (14 bytes)"), message
    assert "row 2: no image" in message, message
    assert "row 3: image arrays must be uint8, got float32" in message, message
    assert "row 1" not in message
    message = _client_error(served.pyfunc, pd.DataFrame({"image": ["not base64 ü"]}))
    assert message.startswith("row 0: image text is not valid base64"), message
    # Rows are counted over the whole input, not within an internal batch.
    batch = served.pyfunc.batch_size
    message = _client_error(served.pyfunc, pd.DataFrame({"image": [good] * batch + [b"x"]}))
    assert message.startswith(f"row {batch}: "), message


def test_wrong_column_and_empty_batch(served) -> None:
    message = _client_error(served.pyfunc, pd.DataFrame({"picture": [b"x"]}))
    assert message == "input needs a column 'image' of images, got columns ['picture']"
    message = _client_error(served.pyfunc, pd.DataFrame({"image": []}))
    assert message == "empty batch: no rows in the 'image' column"
