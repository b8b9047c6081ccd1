"""Model cards: what a registered model version says about itself, and what its run records.

A version registered by a job or a sweep carries:

- a description (Markdown, shown on the version's page in the MLflow UI): the data set
  (source URI, manifest digest, class count and names, images per split), the backbone and
  M, the training settings that matter, val (and, where measured, test) accuracy, the git
  commit of the code and whether its tree had uncommitted changes, the date, and the run;
- tags to filter and compare versions by: ``data.source``, ``data.digest``,
  ``data.num_classes``, ``model.backbone``, ``model.num_attentions``, ``git.commit``,
  ``git.dirty`` and the metric values.

The run itself records the git commit (MLflow's own ``mlflow.source.git.commit`` tag, plus
``wsdan.git.dirty``) and its train and val splits as MLflow dataset inputs (source URI and
the manifest's digest), so the run page lists the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from wsdan.config import TrainConfig

#: Metrics copied onto the card when the run has them (val from the job, test where a
#: ``wsdan evaluate`` run measured it).
CARD_METRICS = ("val_fused_top1", "val_raw_top1", "val_crop_top1", "val_fused_top5",
                "test_fused_top1", "test_fused_top5", "val_box_iou")
_ROOT = Path(__file__).resolve().parents[2]


def source_info(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the code that runs.

    From git in ``root`` (the project's checkout, which ``ray job submit --working-dir``
    uploads with its ``.git``), else from ``WSDAN_GIT_COMMIT`` / ``WSDAN_GIT_DIRTY`` (set them
    where the code travels without git, e.g. in an image build)."""
    root = Path(root) if root is not None else _ROOT

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}
    dirty = os.environ.get("WSDAN_GIT_DIRTY")
    return {"commit": os.environ.get("WSDAN_GIT_COMMIT", "unknown"),
            "dirty": None if dirty is None else dirty.lower() in ("1", "true", "yes")}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A short, stable digest of a data set's manifest (its classes, counts and shard list:
    a re-prepared or changed data set gets another one)."""
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def log_run_provenance(source_uri: str, manifest: Mapping[str, Any],
                       splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """In the active run: the git commit (tags) and the splits as dataset inputs."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    src = source_info()
    tags = {"mlflow.source.git.commit": src["commit"]}
    if src["dirty"] is not None:
        tags["wsdan.git.dirty"] = str(src["dirty"]).lower()
    mlflow.set_tags(tags)
    digest = manifest_digest(manifest)
    source = resolve_dataset_source(source_uri.rstrip("/"))
    name = str(manifest.get("name") or Path(source_uri.rstrip("/")).name)
    for split in splits:
        if not (manifest.get("counts") or {}).get(split):
            continue
        mlflow.log_input(MetaDataset(source, name=f"{name}/{split}", digest=digest),
                         context="training" if split == "train" else split,
                         tags={"split": split, "images": str(manifest["counts"][split])})
    return {**src, "digest": digest}


def model_card(cfg: TrainConfig, manifest: Mapping[str, Any], metrics: Mapping[str, float],
               *, run_id: str, source: Mapping[str, Any] | None = None,
               extra: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(Markdown description, tags) of a model version trained with ``cfg`` on the data set
    of ``manifest`` (whose source is ``cfg.data.source``), with the run's ``metrics``."""
    source = dict(source or source_info())
    classes = list(manifest.get("classes") or [])
    counts = manifest.get("counts") or {}
    digest = manifest_digest(manifest)
    m, o, d = cfg.model, cfg.optim, cfg.data
    shown = {k: float(metrics[k]) for k in CARD_METRICS if k in metrics}
    names = ", ".join(classes[:10]) + (f", … ({len(classes)} in all)" if len(classes) > 10 else "")
    dirty = {True: " (with uncommitted changes)", False: "", None: " (tree state unknown)"}
    lines = [
        f"WS-DAN ({m.backbone}, M={m.num_attentions}) fine-grained classifier, "
        f"{len(classes)} classes.",
        "",
        f"- **Data**: `{d.source}` (manifest digest `{digest}`); "
        + ", ".join(f"{s} {n}" for s, n in counts.items() if n) + " images",
        f"- **Classes**: {names}",
        f"- **Training**: {o.epochs} epochs, batch {o.batch_size} per worker, lr {o.lr:g} "
        f"({o.lr_scaling} scaling), β {o.center_beta:g}, input {d.image_size} px "
        f"(resized to {d.resize_size}), precision {m.precision}, weights "
        f"`{m.weights or ('torchvision' if m.pretrained else 'none')}`",
        "- **Accuracy**: " + (", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                              or "not measured"),
        f"- **Code**: git commit `{source.get('commit', 'unknown')}`"
        f"{dirty[source.get('dirty')]}",
        f"- **Run**: `{run_id}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    tags = {
        "data.source": d.source, "data.digest": digest, "data.num_classes": str(len(classes)),
        "model.backbone": m.backbone, "model.num_attentions": str(m.num_attentions),
        "git.commit": str(source.get("commit", "unknown")),
        "git.dirty": str(source.get("dirty")).lower(),
        **{k: repr(v) for k, v in shown.items()},
        **dict(extra or {}),
    }
    return "\n".join(lines), tags


def apply_card(name: str, version: str | int, description: str, tags: Mapping[str, str],
               client: MlflowClient | None = None) -> None:
    """Write the card onto registered model version ``name``/``version``."""
    client = client or MlflowClient()
    client.update_model_version(name, str(version), description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
