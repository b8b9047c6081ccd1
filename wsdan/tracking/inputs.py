"""A served request's images → the model's input batch, or a client error naming the row.

What ``WSDANPyfunc.predict`` (``wsdan.tracking.pyfunc``) does before the network runs: find the
images of the input (:func:`image_values`), check the request against the size limits before
decoding anything (:func:`check_request_size`), then decode, resize and centre-crop them as
validation in training does (:func:`preprocess`, :func:`batch`). Every problem is an
``MlflowException`` with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400
and the message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from torch import Tensor

from wsdan.data.decode import DecodeError, decode, decode_array, decode_rgb
from wsdan.transforms import center_crop

__all__ = [
    "IMAGE_COLUMN",
    "ImageInputError",
    "bad_input",
    "batch",
    "check_request_size",
    "decode_image",
    "decode_resized",
    "image_values",
    "preprocess",
]

IMAGE_COLUMN = "image"
# First bytes of the encoded formats PIL reads that we expect; anything else in a bytes cell
# is tried as base64 text (what a binary column looks like when no schema decoded it).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


# -- decoding and pre-processing ----------------------------------------------------------
#
# One implementation with training: encoded images go through ``wsdan.data.decode.decode`` at
# resize_size (what the data pipeline runs for validation batches), arrays through its
# ``decode_array``; then ``center_crop`` as in ``wsdan.engine.evaluate``. EXIF orientation is
# ignored in both, as the training data's boxes are in stored-pixel coordinates.


class ImageInputError(ValueError):
    """One input value that is not an image the model can read."""


def _b64decode(data: bytes | str) -> bytes:
    try:
        if isinstance(data, str):
            data = data.encode("ascii")
        # MLflow's own encoder emits MIME-style base64 with newlines: drop whitespace first.
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInputError(f"image text is not valid base64: {err}") from None


def _encoded(value: Any) -> bytes | np.ndarray:
    """An input value → encoded image bytes, or the pixel array it is."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str):
        return _b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data.startswith(_IMAGE_MAGIC):
            with contextlib.suppress(ImageInputError):  # not base64 either: PIL names the problem
                data = _b64decode(data)
        return data
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        raise ImageInputError("no image (the value is empty)")
    raise ImageInputError(
        f"an image must be encoded bytes, base64 text or an H×W×3 uint8 array, got "
        f"{type(value).__name__}"
    )


def _decode_error(data: bytes | np.ndarray, err: DecodeError) -> ImageInputError:
    if isinstance(data, np.ndarray):
        return ImageInputError(str(err))
    return ImageInputError(f"cannot decode image ({len(data)} bytes): {err}")


def decode_image(value: Any) -> np.ndarray:
    """One image → its full-size H×W×3 uint8 RGB array (``wsdan.data.decode.decode_rgb``).

    Accepts encoded bytes (any format and mode PIL reads: grayscale, 16-bit, RGBA, palette,
    CMYK...), base64 text or bytes of them, or an H×W×3 (or H×W grayscale) uint8 array.
    Raises :class:`ImageInputError` naming the problem.
    """
    data = _encoded(value)
    try:
        if isinstance(data, np.ndarray):
            return decode_array(data, None)
        return decode_rgb(data)
    except DecodeError as err:
        raise _decode_error(data, err) from None


def decode_resized(value: Any, size: int) -> np.ndarray:
    """One image → ``size``×``size``×3 uint8, decoded and resized exactly as the data pipeline
    does (``wsdan.data.decode.decode``; arrays: ``decode_array``). Raises
    :class:`ImageInputError` naming the problem."""
    data = _encoded(value)
    try:
        if isinstance(data, np.ndarray):
            return decode_array(data, size)
        return decode(data, size).image
    except DecodeError as err:
        raise _decode_error(data, err) from None


def bad_input(message: str) -> MlflowException:
    """A client error: ``mlflow models serve`` answers it with HTTP 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def batch(values: Sequence[Any], size: int, first_row: int = 0) -> Tensor:
    """Values → B×3×size×size uint8 (the validation batch layout), or an
    :class:`MlflowException` (400 when served) naming every bad row (counted from 0)."""
    images = np.empty((len(values), 3, size, size), np.uint8)
    errors = []
    for i, value in enumerate(values):
        try:
            images[i] = decode_resized(value, size).transpose(2, 0, 1)
        except ImageInputError as err:
            errors.append(f"row {first_row + i}: {err}")
    if errors:
        more = f"; and {len(errors) - 5} more bad rows" if len(errors) > 5 else ""
        raise bad_input("; ".join(errors[:5]) + more)
    return torch.from_numpy(images)


def preprocess(images: Sequence[Any], *, resize_size: int, image_size: int) -> Tensor:
    """The evaluation transform: images → B×3×S×S float in [0, 1].

    Each image (encoded bytes, base64 text or a uint8 array, see `decode_image`) is decoded and
    resized to resize_size² by ``wsdan.data.decode`` as the data pipeline does, then the batch is
    centre-cropped to image_size² by ``wsdan.transforms.center_crop`` as in
    ``wsdan.engine.evaluate``.
    """
    return center_crop(batch(list(images), resize_size), image_size)


def image_values(model_input: Any) -> list[Any]:
    """The images of an input, in row order; an empty input or one without an ``image``
    column is a client error (:class:`MlflowException`, HTTP 400 when served)."""
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        model_input = model_input[IMAGE_COLUMN]
        if not isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
            model_input = [model_input]  # one image (not the characters of its text)
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise bad_input(
                f"input needs a column {IMAGE_COLUMN!r} of images, got columns "
                f"{[str(c) for c in model_input.columns]}"
            )
        column = model_input[IMAGE_COLUMN]
        if isinstance(column, pd.DataFrame):  # else list() would give the column labels
            raise bad_input(f"input has {column.shape[1]} columns named {IMAGE_COLUMN!r}")
        values = list(column)
    elif isinstance(model_input, pd.Series):
        values = list(model_input)
    elif isinstance(model_input, np.ndarray) and (model_input.ndim == 0 or (
        model_input.dtype == np.uint8 and model_input.ndim in (2, 3)
    )):
        values = [model_input]  # a single image (a 0-d array cannot be iterated)
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = list(model_input)  # N×H×W×3 uint8 arrays split into images
    else:
        raise bad_input(
            f"expected a DataFrame with an {IMAGE_COLUMN!r} column or a list of images, got "
            f"{type(model_input).__name__}"
        )
    if not values:
        raise bad_input(f"empty batch: no rows in the {IMAGE_COLUMN!r} column")
    return values


def _encoded_size(value: Any) -> int:
    """Bytes an input value holds before decoding (base64 text: the bytes it decodes to)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return len(value) * 3 // 4
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return 0


def check_request_size(values: Sequence[Any], max_images: int, max_request_mb: float) -> None:
    """A client error (:class:`MlflowException`, HTTP 400 when served) naming the limit when
    a request holds more than ``max_images`` images or more than ``max_request_mb`` MB of
    encoded images; checked before decoding anything."""
    if len(values) > max_images:
        raise bad_input(
            f"request too large: {len(values)} images, over the limit of {max_images} per "
            "request (max_images): send them in several requests"
        )
    total = sum(_encoded_size(v) for v in values)
    if total > max_request_mb * 1e6:
        raise bad_input(
            f"request too large: {total / 1e6:.1f} MB of images, over the limit of "
            f"{max_request_mb:g} MB per request (max_request_mb): send fewer or smaller images"
        )
