"""Driver side of the distributed job: input checks, the TorchTrainer, the best checkpoint.

Everything that can be wrong with the inputs (config, data location, class counts, a
resumed job's class count) is checked here, before any cluster work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from wsdan import storage
from wsdan.config import ConfigError, TrainConfig
from wsdan.model import WSDAN, build_model

JOB_FILE = "wsdan_job.json"


@dataclass(frozen=True)
class JobSpec:
    name: str
    storage_path: str  # local path or s3:// URI
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 2
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be >= 1, got {self.num_workers}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty name without '/', got {self.name!r}")


def check_data(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """The data set must match the config: class count, non-empty train and val splits."""
    source = cfg.data.source
    n = int(manifest.get("num_classes", len(manifest.get("classes", []))))
    if n != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {cfg.model.num_classes} but the data set at {source} has "
            f"{n} classes (dataset.json)")
    counts = manifest.get("counts", {})
    for split in ("train", "val"):
        if not counts.get(split):
            raise ConfigError(f"data set at {source} has no {split!r} images (dataset.json counts:"
                              f" {counts})")


def _job_file(spec: JobSpec) -> str:
    return f"{spec.storage_path.rstrip('/')}/{spec.name}/{JOB_FILE}"


def check_resume(cfg: TrainConfig, spec: JobSpec) -> dict[str, Any] | None:
    """If a job of this name already ran under storage_path, it will be resumed: its class
    count and backbone must match. Records this job's identity on first run."""
    uri = _job_file(spec)
    if storage.exists(uri):
        previous = json.loads(storage.read_bytes(uri))
        for key in ("num_classes", "backbone", "num_attentions"):
            if previous.get(key) != getattr(cfg.model, key):
                raise ConfigError(
                    f"model.{key} is {getattr(cfg.model, key)!r} but job {spec.name!r} under "
                    f"{spec.storage_path} was started with {previous.get(key)!r}: resuming "
                    "it would load mismatched weights (use another --name)")
        return previous
    ident = {"num_classes": cfg.model.num_classes, "backbone": cfg.model.backbone,
             "num_attentions": cfg.model.num_attentions}
    storage.write_bytes(uri, json.dumps(ident).encode())
    return None


def build_trainer(
    cfg: TrainConfig,
    spec: JobSpec,
    *,
    datasets: dict[str, Any],
    num_train_rows: int,
    class_names: list[str],
    figure_batch: dict[str, Any] | None = None,
    mlflow_spec: dict[str, str] | None = None,
):
    """A TorchTrainer running ``wsdan.raytrain.train_loop_per_worker``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wsdan.raytrain import ExactEvalDataConfig, train_loop_per_worker

    if storage.is_remote(spec.storage_path):
        fs, path = storage.filesystem_and_path(spec.storage_path)
    else:
        import os

        fs, path = None, os.path.abspath(spec.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "num_train_rows": num_train_rows,
                           "class_names": class_names, "mlflow": mlflow_spec,
                           "figure_batch": figure_batch},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=RunConfig(
            name=spec.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.keep_checkpoints,
                checkpoint_score_attribute="val_fused_top1",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=ExactEvalDataConfig(),
    )


def best_checkpoint(result) -> Any:
    """The checkpoint with the highest val fused top-1 (falls back to the latest)."""
    best = getattr(result, "best_checkpoints", None) or []
    scored = [(m.get("val_fused_top1", float("-inf")), c) for c, m in best]
    if scored:
        return max(scored, key=lambda t: t[0])[1]
    return result.checkpoint


def model_from_checkpoint(checkpoint) -> tuple[WSDAN, dict[str, Any]]:
    """Rebuild the WS-DAN model (random backbone init, then the checkpoint, strictly)."""
    from wsdan.raytrain import load_checkpoint

    with checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    cfg = TrainConfig.from_dict(state["config"])
    m = cfg.model
    model = build_model(m.backbone, num_classes=m.num_classes, num_attentions=m.num_attentions,
                        logit_scale=m.logit_scale, sqrt_grad_eps=m.sqrt_grad_eps)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


def log_final_figures(model: WSDAN, cfg: TrainConfig, val_ds, class_names: list[str]) -> None:
    """Confusion matrix of the selected model on the whole val split, to the active run."""
    import torch

    from wsdan.data.pipeline import iter_torch
    from wsdan.inference import predict
    from wsdan.tracking.runs import confusion_figure, log_figure
    from wsdan.transforms import center_crop

    k = cfg.model.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long)
    for batch in iter_torch(val_ds, 64):
        out = predict(model, center_crop(batch["image"], cfg.data.image_size),
                      theta=cfg.inference.refine_theta, padding=cfg.inference.refine_padding)
        idx = batch["label"] * k + out.logits.argmax(1)
        confusion += torch.bincount(idx, minlength=k * k).view(k, k)
    log_figure(confusion_figure(confusion, class_names), "confusion_matrix.png")
