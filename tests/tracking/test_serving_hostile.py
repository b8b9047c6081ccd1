"""The served model on the hostile image matrix (tests/hostile_images.py): the pyfunc model's
predict answers the converted images as validation would see them, and each refused one with a
client error (HTTP 400 when served) naming its row and the reason, never another exception,
and the model keeps answering afterwards. No services: the pyfunc model is loaded from a spec
and state dict in a temporary folder, as ``load_context`` does in ``mlflow models serve``
(the served HTTP path: tests/tracking/test_pyfunc.py).
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow.exceptions import MlflowException

from tests import hostile_images as hostile
from wsdan.config import TrainConfig
from wsdan.data.decode import decode_batch
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

R, S = 36, 32  # resize_size, image_size: tiny
CFG = TrainConfig.from_dict({
    "model": {"backbone": "resnet18_layer3", "num_classes": 3, "num_attentions": 2},
    "data": {"image_size": S, "resize_size": R},
})  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory: pytest.TempPathFactory) -> WSDANPyfunc:
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=2).eval()
    tmp = tmp_path_factory.mktemp("hostile-served")
    torch.save(model.state_dict(), tmp / "state_dict.pt")
    (tmp / "spec.json").write_text(json.dumps(model_spec(model, CFG, ["a", "b", "c"])))
    out = WSDANPyfunc()
    out.load_context(SimpleNamespace(
        artifacts={STATE_DICT_ARTIFACT: str(tmp / "state_dict.pt"),
                   SPEC_ARTIFACT: str(tmp / "spec.json")},
        model_config={"device": "cpu"}))
    return out


def _client_error(model: WSDANPyfunc, images: list) -> str:
    with pytest.raises(MlflowException) as info:
        model.predict(None, pd.DataFrame({"image": images}))
    assert info.value.get_http_status_code() == 400, info.value.error_code
    return info.value.message


def test_converted_images_are_answered_as_validation_sees_them(pyfunc) -> None:
    good = hostile.converted()
    data = [c.data for c in good]
    # What evaluation sees of the same bytes: the pipeline's decode_batch, then center_crop.
    table = pa.table({"image": pa.array(data, pa.binary()), "label": [0] * len(data),
                      "image_id": [c.name for c in good]})
    validation = center_crop(torch.from_numpy(decode_batch(table, R).columns["image"]), S)
    assert validation.shape == (len(good), 3, S, S)
    for value in (data, [base64.b64encode(d).decode("ascii") for d in data]):
        torch.testing.assert_close(preprocess(value, resize_size=R, image_size=S), validation,
                                   atol=0, rtol=0)
    out = pyfunc.predict(None, pd.DataFrame({"image": data}))
    assert len(out) == len(good)
    probs = np.stack(out["probabilities"].to_numpy())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert ((out[["box_x0", "box_y0"]].to_numpy() >= 0).all()
            and (out[["box_x1", "box_y1"]].to_numpy() <= S).all())
    for case in good:  # the full-size decode keeps the stored size (EXIF orientation ignored)
        assert decode_image(case.data).shape == (case.size[1], case.size[0], 3), case.name
    # Decoded pixels sent as arrays: a 1×1 and a 20000×20 strip are resized like the files.
    arrays = [decode_image(hostile.by_name()[n].data) for n in ("one_by_one", "strip_wide")]
    by_array = pyfunc.predict(None, pd.DataFrame({"image": arrays}))
    by_file = pyfunc.predict(None, pd.DataFrame(
        {"image": [hostile.by_name()[n].data for n in ("one_by_one", "strip_wide")]}))
    np.testing.assert_allclose(np.stack(by_array["probabilities"].to_numpy()),
                               np.stack(by_file["probabilities"].to_numpy()), atol=1e-6)


def test_refused_images_are_client_errors_naming_the_row(pyfunc) -> None:
    good = hostile.by_name()["photo_control"].data
    for case in hostile.refused():
        for value in (case.data, base64.b64encode(case.data).decode("ascii")):
            message = _client_error(pyfunc, [good, value])
            assert message.startswith(f"row 1: cannot decode image ({len(case.data)} bytes): "), (
                case.name, message)
            case.assert_reason(message)
            assert "row 0" not in message
    # The whole matrix in one request: the refused rows, and only they, named by position
    # (five at most, then counted).
    cases = hostile.cases()
    message = _client_error(pyfunc, [c.data for c in cases])
    bad_rows = [i for i, c in enumerate(cases) if not c.converted]
    named = [i for i, c in enumerate(cases) if f"row {i}: " in message]
    assert named == bad_rows[:5], message
    assert message.endswith(f"; and {len(bad_rows) - 5} more bad rows"), message
    # And the model still answers: nothing was left half-done by the errors.
    out = pyfunc.predict(None, pd.DataFrame({"image": [good]}))
    assert len(out) == 1 and 0 <= int(out["class_id"][0]) < 3
