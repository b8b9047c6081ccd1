"""wsdan.tracking.pyfunc: a tiny WS-DAN logged to a real MLflow server (artifacts in the S3
bucket), registered, aliased, loaded by ``models:/NAME@champion`` and served over HTTP; its
predictions must equal direct ``wsdan.inference.predict`` on the images pre-processed as
validation does (``wsdan.data.decode`` at resize_size, then centre crop), and bad requests
must get HTTP 400 naming the problem."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from tests.tracking.test_serving_decode import _files
from wsdan.config import TrainConfig
from wsdan.data.decode import decode_batch
from wsdan.inference import predict
from wsdan.model import build_model
from wsdan.services import find_free_port
from wsdan.tracking import (
    attention_figure,
    log_config,
    log_figure,
    log_wsdan_model,
    register_if_better,
)
from wsdan.tracking.pyfunc import decode_image, preprocess
from wsdan.transforms import center_crop

pytestmark = pytest.mark.slow

NAME = "wsdan-pyfunc-test"
CLASS_NAMES = ["alpha", "beta", "gamma"]
# θ = 0.5 rather than the paper's 0.1: a random network's mean attention covers the whole
# image at 0.1, and the test wants boxes that differ between images.
CFG = TrainConfig.from_dict({
    "model": {"backbone": "resnet18_layer3", "num_classes": 3, "num_attentions": 2},
    "data": {"image_size": 64, "resize_size": 72},
    "inference": {"refine_theta": 0.5, "refine_padding": 0.05},
})  # fmt: skip


# -- test images: mixed sizes, modes and formats -------------------------------------------


def _pattern(kind: int, h: int, w: int, seed: int) -> np.ndarray:
    """H×W×3 uint8: a gradient, a checkerboard, noise, or a noisy patch on a dark ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        a = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 80)], axis=-1)
    elif kind == 1:
        a = ((xx // 6 + yy // 6) % 2 * 255)[..., None].repeat(3, axis=-1)
    elif kind == 2:
        a = rng.integers(0, 256, (h, w, 3))
    else:
        a = np.full((h, w, 3), 30)
        a[h // 4 : h // 2, w // 2 : 3 * w // 4] = rng.integers(0, 256, (h // 2 - h // 4, w // 4, 3))
    return a.astype(np.uint8)


def _encode(arr: np.ndarray, mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _images() -> list[bytes]:
    """Five encoded images: RGB PNG, grayscale PNG, RGBA PNG, JPEG, palette PNG; sizes vary."""
    return [
        _encode(_pattern(0, 64, 64, 0), "RGB", "PNG"),
        _encode(_pattern(1, 50, 90, 1), "L", "PNG"),
        _encode(_pattern(2, 96, 72, 2), "RGBA", "PNG"),
        _encode(_pattern(3, 80, 80, 3), "RGB", "JPEG"),
        _encode(_pattern(0, 120, 100, 4), "P", "PNG"),
    ]


def _reference_inputs(encoded: list[bytes]) -> torch.Tensor:
    """The eval transform as training runs it, independently of the pyfunc module: the data
    pipeline's decode_batch at resize_size, then the centre crop of ``wsdan.engine.evaluate``."""
    table = pa.table({"image": pa.array(encoded, pa.binary()), "label": [0] * len(encoded),
                      "image_id": [str(i) for i in range(len(encoded))]})
    out = decode_batch(table, CFG.data.resize_size)
    assert not out.skipped
    return center_crop(torch.from_numpy(out.columns["image"]), CFG.data.image_size)


def _tiny_model() -> torch.nn.Module:
    """A random tiny WS-DAN whose classifier rows are the part features of three distinct
    images (a nearest-prototype classifier), so predictions differ between images."""
    torch.manual_seed(0)
    model = build_model("resnet18_layer3", num_classes=3, num_attentions=2).eval()
    protos = _reference_inputs(_images()[:3])
    with torch.no_grad():
        feats = model(protos).features  # 3×(M·C)
        model.classifier.weight.copy_(feats / feats.norm(dim=1, keepdim=True))
    return model


def _direct(model: torch.nn.Module, encoded: list[bytes]) -> dict[str, Any]:
    out = predict(model, _reference_inputs(encoded), theta=CFG.inference.refine_theta,
                  padding=CFG.inference.refine_padding)
    probs = torch.softmax(out.logits.double(), dim=1).numpy()
    return {"class_id": probs.argmax(axis=1), "probabilities": probs,
            "boxes": out.boxes.numpy(), "out": out}


def _assert_matches(result: pd.DataFrame, expected: dict[str, Any]) -> None:
    assert list(result.columns) == [
        "class_id", "class_name", "probability", "probabilities",
        "box_x0", "box_y0", "box_x1", "box_y1",
    ]  # fmt: skip
    np.testing.assert_array_equal(result["class_id"].to_numpy(), expected["class_id"])
    assert list(result["class_name"]) == [CLASS_NAMES[i] for i in expected["class_id"]]
    probs = np.stack(result["probabilities"].to_numpy())
    np.testing.assert_allclose(probs, expected["probabilities"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(result["probability"], expected["probabilities"].max(axis=1),
                               atol=1e-5, rtol=0)
    boxes = result[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()
    np.testing.assert_array_equal(boxes, expected["boxes"])


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(mlflow_server: Any) -> Iterator[dict[str, Any]]:
    """Log, register and alias the tiny model once per module (inside one run, as a job does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(mlflow_server.tracking_uri)
        try:
            model = _tiny_model()
            client = MlflowClient()
            experiment_id = client.create_experiment("wsdan-pyfunc-test")
            direct = _direct(model, _images())
            started = time.monotonic()
            with mlflow.start_run(experiment_id=experiment_id) as run:
                params = log_config(CFG)
                fig = attention_figure(_reference_inputs(_images()), direct["out"].attention_mean,
                                       direct["out"].boxes, [0, 1, 2, 0, 1],
                                       direct["class_id"], CLASS_NAMES)
                log_figure(fig, "attention/val.png")
                info = log_wsdan_model(model, CFG, CLASS_NAMES, registered_model_name=NAME,
                                       metrics={"val_fused_top1": 0.75})
            log_seconds = time.monotonic() - started
            result = register_if_better(info, NAME, "val_fused_top1", 0.75)
            yield {"model": model, "info": info, "run_id": run.info.run_id, "params": params,
                   "registration": result, "log_seconds": log_seconds, "client": client}
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def loaded(logged: dict[str, Any]) -> Any:
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


# -- tests ----------------------------------------------------------------------------------


def test_registration_reuses_the_version_made_at_log_time(logged):
    info, result = logged["info"], logged["registration"]
    assert str(info.registered_model_version) == "1"
    assert result.version == "1"  # not a second version of the same model
    assert result.became_champion and result.previous_champion_version is None
    client = logged["client"]
    assert [v.version for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "1"
    assert champion.source == f"models:/{info.model_id}"
    assert champion.tags["val_fused_top1"] == "0.75"


def test_run_has_params_metrics_and_figure(logged):
    client = logged["client"]
    run = client.get_run(logged["run_id"])
    assert run.data.params["model.backbone"] == "resnet18_layer3"
    assert run.data.params["inference.refine_theta"] == "0.5"
    assert run.data.params == logged["params"]
    assert run.data.metrics["val_fused_top1"] == 0.75
    assert [a.path for a in client.list_artifacts(logged["run_id"], "attention")] == [
        "attention/val.png"
    ]
    model = client.get_logged_model(logged["info"].model_id)
    assert model.source_run_id == logged["run_id"]
    assert {m.key: m.value for m in model.metrics} == {"val_fused_top1": 0.75}


@pytest.mark.parametrize("batch", [1, 5])
def test_champion_predicts_like_direct_inference(logged, loaded, batch):
    encoded = _images()[:batch]
    result = loaded.predict(pd.DataFrame({"image": encoded}))
    expected = _direct(logged["model"], encoded)
    _assert_matches(result, expected)
    if batch == 5:  # the prototypes make the classes differ, the θ=0.5 boxes too
        assert set(result["class_id"]) == {0, 1, 2}
        assert len({tuple(b) for b in expected["boxes"]}) > 1


def test_inputs_as_base64_and_arrays_predict_the_same(logged, loaded):
    encoded = _images()
    expected = _direct(logged["model"], encoded)
    as_text = [base64.b64encode(b).decode("ascii") for b in encoded]
    _assert_matches(loaded.predict(pd.DataFrame({"image": as_text})), expected)
    # Arrays: the decoded RGB pixels give the same result as the bytes they came from.
    arrays = [decode_image(b) for b in encoded]
    _assert_matches(loaded.predict(pd.DataFrame({"image": arrays})), expected)
    # A plain list fails MLflow's schema check in PyFuncModel.predict; the model itself
    # takes it (as ``predict`` of the unwrapped PythonModel).
    _assert_matches(loaded.unwrap_python_model().predict(None, arrays), expected)


def test_more_images_than_the_internal_batch(logged, loaded):
    encoded = _images() * 7  # 35 > 32: two internal batches
    result = loaded.predict(pd.DataFrame({"image": encoded}))
    # Direct inference on the same two batches: CPU convolutions round differently for other
    # batch sizes (logits differ by ~5e-5 between a batch of 5 and one of 32).
    parts = [_direct(logged["model"], encoded[:32]), _direct(logged["model"], encoded[32:])]
    np.testing.assert_array_equal(result["class_id"].to_numpy(),
                                  np.tile(_direct(logged["model"], _images())["class_id"], 7))
    probs = np.stack(result["probabilities"].to_numpy())
    np.testing.assert_allclose(probs, np.concatenate([p["probabilities"] for p in parts]),
                               atol=1e-5, rtol=0)


def test_bad_input_names_the_problem(loaded):
    with pytest.raises(Exception, match="cannot decode image"):
        loaded.predict(pd.DataFrame({"image": [b"\x89PNG but not really"]}))
    with pytest.raises(Exception, match="image"):
        loaded.predict(pd.DataFrame({"picture": [b"x"]}))


def test_artifacts_are_in_the_bucket(logged, s3_server):
    keys = []
    for page in s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket="wsdan-mlflow", Prefix="artifacts/"
    ):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    model_id = logged["info"].model_id
    # MLflow 3 keeps logged models under the experiment, not under the run.
    model_keys = {k.split(f"/models/{model_id}/artifacts/", 1)[1] for k in keys
                  if f"/models/{model_id}/artifacts/" in k}
    for needed in ("MLmodel", "artifacts/state_dict.pt", "artifacts/wsdan_model.json",
                   "wsdan_pyfunc_model.py", "code/wsdan/inference.py", "requirements.txt",
                   "serving_input_example.json"):
        assert needed in model_keys, needed
    assert any(k.endswith(f"{logged['run_id']}/artifacts/attention/val.png") for k in keys)
    assert not any(".pyc" in k for k in model_keys)  # no stale bytecode shipped
    spec = json.loads(s3_server.client().get_object(
        Bucket="wsdan-mlflow",
        Key=next(k for k in keys if k.endswith(f"{model_id}/artifacts/artifacts/wsdan_model.json")),
    )["Body"].read())
    assert spec["class_names"] == CLASS_NAMES
    assert spec["transform"] == {"resize_size": 72, "image_size": 64}
    assert spec["model"]["backbone"] == "resnet18_layer3"


def test_requirements_are_pinned(logged):
    path = mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@champion")
    reqs = Path(path).read_text().split()
    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert f"torch=={torch_version}" in reqs
    assert any(r.startswith("mlflow==") for r in reqs)
    assert {r.split("==")[0] for r in reqs} >= {"torch", "torchvision", "pillow", "numpy",
                                                "pandas", "pyarrow", "mlflow"}


def test_preprocess_is_the_eval_transform():
    encoded = _images()
    arrays = [decode_image(b) for b in encoded]
    x = preprocess(arrays, resize_size=72, image_size=64)
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, _reference_inputs(encoded), atol=0, rtol=0)


# -- mlflow models serve --------------------------------------------------------------------

# Runs in the served process before anything else: it removes the editable install's import
# hook, so ``wsdan`` can only come from the model's own code/ folder.
_HIDE_PROJECT = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable___wsdan")]
"""


def _request(url: str, payload: dict[str, Any]) -> tuple[int, Any]:
    """POST ``payload`` as JSON: the status and the decoded JSON answer, errors included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, body


def _post(url: str, payload: dict[str, Any]) -> Any:
    status, answer = _request(url, payload)
    assert status == 200, f"{status}: {answer}"
    return answer


def _wait_ping(url: str, proc: subprocess.Popen[bytes], log_path: Any, timeout: float) -> float:
    started = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with opener.open(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"no /ping after {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served_url(logged, mlflow_server, tmp_path_factory) -> Iterator[str]:
    """``mlflow models serve`` of the champion on loopback, once per module, in a process that
    has neither the project installed nor S3 keys: the model must carry its code."""
    tmp_path = tmp_path_factory.mktemp("serve")
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE_PROJECT)
    # serve runs `bash -c "exec uvicorn ..."`: the environment's bin/ must be on PATH, as in
    # an activated venv.
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
           "PYTHONPATH": str(hide), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    check = subprocess.run([sys.executable, "-c", "import wsdan"], env=env, cwd=tmp_path,
                           capture_output=True)
    assert check.returncode != 0 and b"No module named 'wsdan'" in check.stderr

    port = find_free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        ready = _wait_ping(url, proc, log_path, timeout=120)
        print(f"mlflow models serve: /ping after {ready:.1f} s")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # serve and its uvicorn worker
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_champion_answers_like_direct_inference(logged, served_url):
    # The training-set-like images, and files whose decoding is easy to get different from
    # training's (alpha, 16-bit, palette GIF, CMYK, a large JPEG, EXIF orientation).
    encoded = _images() + list(_files().values())
    expected = _direct(logged["model"], encoded)
    as_text = [base64.b64encode(b).decode("ascii") for b in encoded]
    split = _post(f"{served_url}/invocations", {
        "dataframe_split": {"columns": ["image"], "data": [[t] for t in as_text]}})
    records = _post(f"{served_url}/invocations",
                    {"dataframe_records": [{"image": t} for t in as_text]})
    for answer in (split, records):
        rows = answer["predictions"]
        assert [r["class_id"] for r in rows] == expected["class_id"].tolist()
        np.testing.assert_allclose([r["probabilities"] for r in rows],
                                   expected["probabilities"], atol=1e-5, rtol=0)
        assert [[r[k] for k in ("box_x0", "box_y0", "box_x1", "box_y1")] for r in rows] == \
            expected["boxes"].tolist()


def test_served_bad_requests_get_400_naming_the_problem(served_url):
    url = f"{served_url}/invocations"
    good = base64.b64encode(_images()[0]).decode("ascii")
    bad = base64.b64encode(b"not an image").decode("ascii")  # 12 bytes

    def error(payload: dict[str, Any]) -> str:
        status, answer = _request(url, payload)
        assert status == 400, f"{status}: {answer}"
        assert isinstance(answer, dict) and "stack_trace" not in answer, answer
        assert "unexpected error" not in answer["message"], answer
        return answer["message"]

    message = error({"dataframe_split": {"columns": ["image"], "data": [[good], [good], [bad]]}})
    assert "row 2: cannot decode image (12 bytes): not an image in a format PIL reads" in message
    assert "row 0" not in message and "row 1" not in message
    message = error({"dataframe_records": [{"picture": good}]})
    assert "missing inputs ['image']" in message, message  # MLflow's schema check
    message = error({"dataframe_split": {"columns": ["image"], "data": []}})
    assert "empty batch: no rows in the 'image' column" in message, message
    message = error({"dataframe_records": [{"image": good}, {"image": None}]})
    assert "column image" in message, message  # MLflow's base64 decoding of the column
    assert _post(url, {"dataframe_records": [{"image": good}]})["predictions"]  # still serving


def test_served_hostile_images(served_url):
    """The hostile image matrix (tests/hostile_images.py) over HTTP, on the server above: odd but
    readable images are answered; a decompression bomb and an empty file get a 400 naming
    their rows (the bomb refused from its header); the server keeps serving."""
    from tests import hostile_images as hostile

    url = f"{served_url}/invocations"
    cases = hostile.by_name()

    def rows(*names: str) -> dict[str, Any]:
        return {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(cases[n].data).decode("ascii")] for n in names]}}

    odd = ("cmyk", "animated", "palette_alpha", "grey16", "strip_wide", "one_by_one")
    assert len(_post(url, rows(*odd))["predictions"]) == len(odd)
    status, answer = _request(url, rows("cmyk", "bomb_50000", "zero_byte"))
    assert status == 400, f"{status}: {answer}"
    message = answer["message"]
    bomb = len(cases["bomb_50000"].data)
    assert f"row 1: cannot decode image ({bomb} bytes): image of 2,500,000,000 pixels" in message
    assert "refused from its header before decoding" in message, message
    assert "row 2: cannot decode image (0 bytes): empty" in message, message
    assert "row 0" not in message, message
    assert _post(url, rows("photo_control"))["predictions"]  # still serving
