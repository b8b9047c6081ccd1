"""WS-DAN as an MLflow ``pyfunc`` model: refined prediction (docs/algorithm.md §4) from image bytes.

The logged model holds no pickled network. Its artifacts are

    state_dict.pt       ``model.state_dict()`` (CPU tensors), read with ``weights_only=True``
    wsdan_model.json    architecture, class names, eval transform sizes, refinement θ/padding

and ``load_context`` rebuilds the network from random init (never downloading weights), then
loads the state dict strictly. The ``wsdan`` package travels in the model's ``code/`` folder,
so a process without the project installed (``mlflow models serve``) can load it.

Input (parsed, checked and pre-processed by ``wsdan.tracking.inputs``): a DataFrame with a
column ``image`` of encoded image bytes (JPEG, PNG, GIF, ... any mode, up to ``wsdan.data.decode.MAX_IMAGE_PIXELS`` pixels), base64 strings of them, or H×W×3 uint8
arrays. They are pre-processed as validation in training is, by the same code: decoded and
resized to resize_size² by ``wsdan.data.decode`` (RGB conversion: alpha composited over white,
16-bit scaled, palettes and CMYK converted, an animated image's first frame; bilinear
antialiased resize, 1×1 and long strips too; EXIF orientation ignored, in training too; an
image whose header declares more pixels than the limit is refused before decoding, a
decompression bomb costs no memory), then centre-cropped to
image_size² (``wsdan.transforms.center_crop``, as ``wsdan.engine.evaluate``). (A plain list of
these works on the model itself, ``unwrap_python_model().predict(None, images)``; MLflow's
``PyFuncModel.predict`` checks the input against the signature and wants the DataFrame.)
Over ``mlflow models serve``, send base64 text in the ``image`` column of a
``dataframe_split`` or ``dataframe_records`` payload. A bad input is a client error
(``MlflowException`` with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP
400 and the message): no ``image`` column, an empty batch, or rows that are not images, each
named by its position counted from 0, e.g. ``row 2: cannot decode image (12 bytes): ...``,
and a request over the size limits (checked before any image is decoded): more than
``max_images`` images (default 256) or more than ``max_request_mb`` MB of encoded image
bytes in all (default 20), both read at load from the environment variables
``WSDAN_SERVE_MAX_IMAGES`` and ``WSDAN_SERVE_MAX_REQUEST_MB`` (``wsdan serve --max-images
--max-request-mb`` sets them; set them yourself for a plain ``mlflow models serve``).
Output: one row per image::

    class_id       int     argmax of the fused logits (raw + crop) / 2
    class_name     str
    probability    float   softmax probability of class_id
    probabilities  list    softmax over all K classes
    box_x0 .. y1   int     refinement box in *model-input pixels* (the image_size×image_size
                           centre crop of the image resized to resize_size), ends exclusive
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image
from torch import Tensor, nn

import wsdan
from wsdan.config import TrainConfig
from wsdan.inference import predict
from wsdan.model import WSDAN, build_model
from wsdan.serving import request_limits
from wsdan.tracking.inputs import (  # noqa: F401 - part of the model module's interface
    IMAGE_COLUMN,
    ImageInputError,
    bad_input,
    batch,
    check_request_size,
    decode_image,
    decode_resized,
    image_values,
    preprocess,
)
from wsdan.transforms import center_crop

FORMAT_VERSION = 1
STATE_DICT_ARTIFACT = "state_dict"
SPEC_ARTIFACT = "spec"
STATE_DICT_FILE = "state_dict.pt"
SPEC_FILE = "wsdan_model.json"
MODEL_CODE_FILE = "wsdan_pyfunc_model.py"
# "Models from code": MLflow runs this file at load to get the model, so nothing is pickled.
MODEL_CODE = """\
import mlflow.models

from wsdan.tracking.pyfunc import WSDANPyfunc

mlflow.models.set_model(WSDANPyfunc())
"""
# Images per forward pass: bounds memory for large requests (each image costs two passes).
DEFAULT_BATCH_SIZE = 32
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
# Packages the model needs at load time, pinned to the installed versions. pyarrow: the
# backbone module imports wsdan.storage; pyyaml: wsdan.config. MLflow adds mlflow itself.
REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "pyarrow", "pyyaml")



def model_signature() -> ModelSignature:
    """Input: one binary column ``image``. Over ``mlflow models serve`` a binary column is sent
    as base64 text and decoded by MLflow before ``predict``."""
    inputs = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
    outputs = Schema(
        [
            ColSpec(DataType.long, "class_id"),
            ColSpec(DataType.string, "class_name"),
            ColSpec(DataType.double, "probability"),
            ColSpec(Array(DataType.double), "probabilities"),
            *(ColSpec(DataType.long, name) for name in BOX_COLUMNS),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def model_spec(model: WSDAN, cfg: TrainConfig, class_names: Sequence[str]) -> dict[str, Any]:
    """What ``load_context`` needs to rebuild ``model`` and pre-process like evaluation."""
    if model.backbone.name != cfg.model.backbone:
        raise ValueError(
            f"model backbone {model.backbone.name!r} differs from cfg.model.backbone "
            f"{cfg.model.backbone!r}"
        )
    if len(class_names) != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.num_classes} classes"
        )
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            "backbone": model.backbone.name,
            "num_classes": model.num_classes,
            "num_attentions": model.num_attentions,
            "logit_scale": model.logit_scale,
            "sqrt_grad_eps": model.sqrt_grad_eps,
            # Non-persistent buffers (not in the state dict): a weights file may have set them.
            "input_mean": model.backbone.mean.tolist(),
            "input_std": model.backbone.std.tolist(),
        },
        "class_names": [str(name) for name in class_names],
        "transform": {"resize_size": cfg.data.resize_size, "image_size": cfg.data.image_size},
        "inference": {
            "refine_theta": cfg.inference.refine_theta,
            "refine_padding": cfg.inference.refine_padding,
        },
        "batch_size": DEFAULT_BATCH_SIZE,
    }


def build_from_spec(spec: dict[str, Any], state_dict_path: str | Path) -> WSDAN:
    """Rebuild the network of a saved ``model_spec`` and load its state dict strictly."""
    if spec.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported {SPEC_FILE} format_version {spec.get('format_version')!r}")
    m = spec["model"]
    model = build_model(
        m["backbone"],
        num_classes=m["num_classes"],
        num_attentions=m["num_attentions"],
        logit_scale=m["logit_scale"],
        sqrt_grad_eps=m["sqrt_grad_eps"],
    )  # random init: the state dict below replaces every parameter and buffer
    model.backbone.set_normalization(m["input_mean"], m["input_std"])
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- the pyfunc model ---------------------------------------------------------------------


class WSDANPyfunc(mlflow.pyfunc.PythonModel):
    """Refined WS-DAN prediction. ``model_config={"device": "cuda"}`` (or "cpu") at load
    overrides the default device (CUDA when available). The request limits
    (``check_request_size``) come from the environment at load (``request_limits``)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        model = build_from_spec(spec, context.artifacts[STATE_DICT_ARTIFACT])
        device = (context.model_config or {}).get("device") or (
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.class_names: list[str] = spec["class_names"]
        self.resize_size = int(spec["transform"]["resize_size"])
        self.image_size = int(spec["transform"]["image_size"])
        self.theta = float(spec["inference"]["refine_theta"])
        self.padding = float(spec["inference"]["refine_padding"])
        self.batch_size = int(spec.get("batch_size", DEFAULT_BATCH_SIZE))
        self.max_images, self.max_request_mb = request_limits()

    # MLflow reads the hint of model_input: pd.DataFrame is one it neither validates nor infers
    # a schema from (Any or none draw a warning). Lists of images are accepted too; the
    # logged signature describes the input.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        values = image_values(model_input)
        check_request_size(values, self.max_images, self.max_request_mb)
        rows: list[pd.DataFrame] = []
        for start in range(0, len(values), self.batch_size):
            images = batch(values[start : start + self.batch_size], self.resize_size, start)
            images = center_crop(images.to(self.device), self.image_size)  # as in evaluate
            out = predict(self.model, images, theta=self.theta, padding=self.padding)
            rows.append(self._rows(out.logits, out.boxes))
        return pd.concat(rows, ignore_index=True)

    def _rows(self, logits: Tensor, boxes: Tensor) -> pd.DataFrame:
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()  # B×K, one host copy
        class_id = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        boxes_np = boxes.cpu().numpy().astype(np.int64).reshape(-1, 4)
        frame = {
            "class_id": class_id.astype(np.int64),
            "class_name": [self.class_names[i] for i in class_id],
            "probability": probs[np.arange(len(probs)), class_id],
            "probabilities": list(probs),
        }
        for j, name in enumerate(BOX_COLUMNS):
            frame[name] = boxes_np[:, j]
        return pd.DataFrame(frame)


# -- logging ------------------------------------------------------------------------------


def pinned_requirements() -> list[str]:
    """``REQUIREMENTS`` pinned to the installed versions, without local tags (``+cu130``)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def example_input(image_size: int = 64) -> pd.DataFrame:
    """A one-row input of a grey PNG: the logged input example."""
    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()]})


def log_wsdan_model(
    model: nn.Module,
    cfg: TrainConfig,
    class_names: Sequence[str],
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    input_example: pd.DataFrame | Literal["auto"] | None = "auto",
    metrics: dict[str, float] | None = None,
) -> ModelInfo:
    """Log ``model`` (a WSDAN, or DDP around one) as a pyfunc model, in the active run if any.

    Without an active run MLflow 3 logs a model linked to no run (and starts none).
    input_example: "auto" logs a small PNG (MLflow then checks at log time that the model
    loads and predicts it); None logs none. registered_model_name also registers a version.
    metrics (needs an active run) are logged to the run and linked to the logged model.
    """
    net: Any = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not isinstance(net, WSDAN):
        raise TypeError(f"expected a WSDAN model, got {type(net).__name__}")
    if metrics and mlflow.active_run() is None:
        raise ValueError("metrics= needs an active run (mlflow.start_run()) to log them to")
    spec = model_spec(net, cfg, class_names)
    if isinstance(input_example, str):
        if input_example != "auto":
            raise ValueError(f"input_example must be a DataFrame, 'auto' or None: {input_example!r}")
        input_example = example_input(min(cfg.data.resize_size, 128))
    with tempfile.TemporaryDirectory(prefix="wsdan-model-") as tmp:
        state_path = Path(tmp) / STATE_DICT_FILE
        spec_path = Path(tmp) / SPEC_FILE
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, state_path)
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        code_path = Path(tmp) / MODEL_CODE_FILE
        code_path.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_path),
            artifacts={STATE_DICT_ARTIFACT: str(state_path), SPEC_ARTIFACT: str(spec_path)},
            signature=model_signature(),
            input_example=input_example,
            pip_requirements=pinned_requirements(),
            code_paths=[str(Path(wsdan.__file__).parent)],
            registered_model_name=registered_model_name,
            metadata={"wsdan_format_version": FORMAT_VERSION},
        )
    if metrics:
        mlflow.log_metrics(dict(metrics), run_id=info.run_id, model_id=info.model_id)
    return info
