"""Small helpers for MLflow runs: where to track, configs as params, and figures.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (e.g. the stack's ``http://127.0.0.1:5000``),
else an embedded sqlite store under the project's ``.wsdan/`` (no server needed), with
artifacts under ``.wsdan/mlartifacts``.

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot: no global figure
registry to leak into and no GUI backend, so they work in Ray workers and threads (saving
goes through the Agg canvas).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from wsdan.augment import upsample_maps
from wsdan.config import TrainConfig, flatten

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_STATE_DIR = ".wsdan"
REDACTED = "***"
# Keys whose values are secrets whatever they look like.
_SECRET_KEY = re.compile(
    r"secret|passw(or)?d|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|signature",
    re.IGNORECASE,
)
# scheme://user:password@host → the userinfo part.
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# ?X-Amz-Signature=...&token=... in pre-signed URLs.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&][^=&#\s]*(?:signature|token|secret|password|credential)[^=&#\s]*=)[^&#\s]*",
    re.IGNORECASE,
)


# -- where to track -----------------------------------------------------------------------


def state_dir(path: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> Path:
    """The project-local state directory, absolute (relative paths from the cwd)."""
    return Path(path).expanduser().resolve()


def local_tracking_uri(root: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> str:
    """``sqlite:///<abs root>/mlflow.db``: the embedded default store."""
    return f"sqlite:///{state_dir(root) / 'mlflow.db'}"


def local_artifact_root(root: str | os.PathLike[str] = DEFAULT_STATE_DIR) -> Path:
    """Where experiments created on the embedded store keep their artifacts."""
    return state_dir(root) / "mlartifacts"


def resolve_tracking_uri(
    root: str | os.PathLike[str] = DEFAULT_STATE_DIR, environ: Mapping[str, str] | None = None
) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else :func:`local_tracking_uri` (its directory is
    created)."""
    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    state_dir(root).mkdir(parents=True, exist_ok=True)
    return local_tracking_uri(root)


def setup_experiment(
    name: str,
    *,
    tracking_uri: str | None = None,
    root: str | os.PathLike[str] = DEFAULT_STATE_DIR,
) -> str:
    """Point MLflow at ``tracking_uri`` (default :func:`resolve_tracking_uri`) and make ``name``
    the active experiment, creating it if needed. Returns its id.

    On the embedded sqlite default, a new experiment keeps its artifacts under
    ``.wsdan/mlartifacts/<name>`` (MLflow's own default would be ``./mlruns`` of whatever the
    cwd is); on a server, the server decides (``--artifacts-destination``).
    """
    uri = tracking_uri or resolve_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri == local_tracking_uri(root):
            folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
            location = (local_artifact_root(root) / folder).as_uri()
        client.create_experiment(name, artifact_location=location)
    return mlflow.set_experiment(name).experiment_id


# -- configs as params --------------------------------------------------------------------


def redact(key: str, value: Any) -> Any:
    """``value`` with secrets hidden: everything under a secret-looking key, the userinfo of
    URIs (``s3://KEY:SECRET@bucket``) and secret query parameters of pre-signed URLs."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if _SECRET_KEY.search(key):
        return REDACTED
    text = str(value)
    text = _URI_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group('key')}{REDACTED}", text)


def config_params(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, str]:
    """Flat ``{dotted.key: str(value)}`` of a config, redacted and cut to MLflow's length limit
    (values longer than the limit end in "...")."""
    flat = cfg.flat() if isinstance(cfg, TrainConfig) else flatten(dict(cfg))
    out = {}
    for key, value in flat.items():
        text = str(redact(key, value))
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        out[key] = text
    return out


def log_config(
    cfg: TrainConfig | Mapping[str, Any], *, run_id: str | None = None
) -> dict[str, str]:
    """Log a config as run params (see :func:`config_params`); returns what was logged.

    run_id: log to that run (e.g. from a Ray worker); None: the active run.
    """
    params = config_params(cfg)
    if run_id is None:
        mlflow.log_params(params)
    else:
        MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return params


# -- figures ------------------------------------------------------------------------------


def log_figure(fig: Figure, path: str, *, run_id: str | None = None) -> None:
    """Save ``fig`` as artifact ``path`` (e.g. ``attention/epoch_003.png``) of the active run
    or of ``run_id``, then release it if pyplot tracks it."""
    if run_id is None:
        mlflow.log_figure(fig, path)
    else:
        MlflowClient().log_figure(run_id, fig, path)
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure would otherwise stay open
        sys.modules["matplotlib.pyplot"].close(fig)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _hwc_float(images: Any) -> np.ndarray:
    """B×3×H×W (float in [0, 1] or uint8) → B×H×W×3 float in [0, 1]."""
    arr = _numpy(images)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return np.clip(arr.transpose(0, 2, 3, 1), 0.0, 1.0)


def _upsample(maps: Any, size: tuple[int, int]) -> np.ndarray:
    """B×h×w maps → B×H×W, bilinear (as the refinement does), each scaled to [0, 1]."""
    t = torch.as_tensor(_numpy(maps), dtype=torch.float32)
    up = upsample_maps(t, size).numpy()
    peak = up.reshape(len(up), -1).max(axis=1).clip(min=1e-12)
    return up / peak[:, None, None]


def attention_figure(
    images: Any,
    attention_mean: Any,
    boxes: Any,
    labels: Sequence[int] | Any | None,
    preds: Sequence[int] | Any,
    class_names: Sequence[str],
    *,
    max_images: int = 8,
    columns: int = 4,
) -> Figure:
    """A grid of the first ``max_images`` images: on top the image with its refinement box,
    below it the upsampled mean attention as a heat map over the image, with the same box.

    images: B×3×H×W in [0, 1] (or uint8); attention_mean: B×h×w (``InferenceOutput``);
    boxes: B×4 (x0, y0, x1, y1) in image pixels, ends exclusive; labels (or None) and preds:
    B class ids. Titles are green when the prediction is right, red when wrong.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    imgs = _hwc_float(images)[:max_images]
    n = len(imgs)
    if n == 0:
        raise ValueError("attention_figure needs at least one image")
    h, w = imgs.shape[1:3]
    heat = _upsample(_numpy(attention_mean)[:n], (h, w))
    box = _numpy(boxes)[:n].astype(np.float64)
    pred = _numpy(preds)[:n].astype(np.int64)
    label = None if labels is None else _numpy(labels)[:n].astype(np.int64)

    cols = min(columns, n)
    grid_rows = -(-n // cols)  # ceil
    fig = Figure(figsize=(2.4 * cols, 4.8 * grid_rows), layout="constrained")
    axes = fig.subplots(2 * grid_rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        name = class_names[pred[i]] if 0 <= pred[i] < len(class_names) else str(pred[i])
        if label is None:
            title, colour = f"pred {name}", "black"
        else:
            true = class_names[label[i]] if 0 <= label[i] < len(class_names) else str(label[i])
            title = f"true {true}\npred {name}"
            colour = "green" if label[i] == pred[i] else "red"
        for row, overlay in ((r, False), (r + 1, True)):
            ax = axes[row, c]
            ax.imshow(imgs[i], extent=(0, w, h, 0))
            if overlay:
                ax.imshow(heat[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=(0, w, h, 0))
            x0, y0, x1, y1 = box[i]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow",
                                   linewidth=1.5))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
        axes[r, c].set_title(title, fontsize=8, color=colour)
    return fig


def confusion_figure(
    confusion: Any, class_names: Sequence[str], *, normalize: bool = True
) -> Figure:
    """K×K confusion matrix (rows: true class, columns: predicted) as a heat map.

    normalize: colour by the fraction of each true class (row); counts are written in the
    cells while K ≤ 20, class names on the axes while K ≤ 40.
    """
    from matplotlib.figure import Figure

    cm = _numpy(confusion).astype(np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion must be K×K with K={len(class_names)} classes, got "
                         f"{cm.shape}")
    shown = cm / cm.sum(axis=1, keepdims=True).clip(min=1) if normalize else cm
    side = min(max(4.0, 0.35 * k + 2.0), 20.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "count")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 40:
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=7)
    if k <= 20:
        top = shown.max() if shown.size else 0.0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * top else "black")
    return fig
