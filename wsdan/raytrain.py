"""Ray Train integration: the per-worker training loop, checkpoints and dataset sharding.

Every worker runs :func:`train_loop_per_worker` with the same plain-dict config (so Ray Tune
can produce it). The loop is the library's: ``wsdan.engine.train_one_epoch`` and
``evaluate`` over Ray Data shards, with the model wrapped in DDP by Ray Train. The feature
centres are all-reduced inside the training step (``wsdan.centers.update_centers_``), and
validation counts are summed over ranks before dividing.

Checkpoints hold the model (feature centres included), the optimiser, the epoch, the RNG
state of every rank and the config; the learning-rate schedule is a pure function of the
epoch, so a resumed job continues exactly where it stopped.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import DataConfig

from wsdan.config import TrainConfig
from wsdan.engine import evaluate, train_one_epoch
from wsdan.local import format_epoch
from wsdan.model import build_model
from wsdan.optim import build_optimizer, scaled_lr
from wsdan.train_step import unwrap

CHECKPOINT_FILE = "state.pt"
FIGURE_EVERY = 2  # epochs between attention heat-map figures (and the last epoch)


class ExactEvalDataConfig(DataConfig):
    """Split ``train`` equally across workers (DDP needs the same number of steps on every
    rank) and the evaluation datasets *without* dropping rows (``equal=False``), so that
    summed counts cover every validation image exactly once.

    data_cpus caps the CPUs that each of the job's datasets may hold at once (Ray Data's
    ``resource_limits``): jobs sharing a cluster then leave each other's workers alone."""

    def __init__(self, exact: tuple[str, ...] = ("val", "test"), *,
                 data_cpus: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._exact = set(exact)
        self._data_cpus = data_cpus

    def _resolve_execution_options(self, dataset_name: str):
        options = super()._resolve_execution_options(dataset_name)
        if self._data_cpus is not None:
            options.resource_limits = options.resource_limits.copy(cpu=self._data_cpus)
        return options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        exact = {k: v for k, v in datasets.items() if k in self._exact}
        rest = {k: v for k, v in datasets.items() if k not in self._exact}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in exact.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(path) / CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _batches(shard, batch_size: int, *, train: bool, seed: int, epoch: int):
    """Torch batches from a Ray Data shard, in the engine's batch format. Training drops the
    last partial batch, so that every rank takes the same number of DDP steps."""
    from wsdan.data.pipeline import iter_torch

    return iter_torch(shard, batch_size, shuffle_buffer=8 * batch_size if train else None,
                      seed=seed, epoch=epoch, drop_last=train)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop.

    ``config`` keys: ``train`` (a ``TrainConfig`` dict), ``num_train_rows`` (rows of the
    train split, for the schedule), ``class_names``, optional ``mlflow`` (``tracking_uri``,
    ``run_id``: rank 0 logs per-epoch metrics to that run).
    """
    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    m = cfg.model
    model = build_model(m.backbone, num_classes=m.num_classes, num_attentions=m.num_attentions,
                        logit_scale=m.logit_scale, pretrained=m.pretrained, weights=m.weights,
                        sqrt_grad_eps=m.sqrt_grad_eps)
    if m.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    global_batch = cfg.optim.batch_size * world
    base_lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    gen = torch.Generator(device=device)
    start_epoch, best = 0, None

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        best = state.get("best")
        rng = state.get("rng", {}).get(str(rank))
        if rng is not None:
            gen.set_state(rng)
        else:
            gen.manual_seed(cfg.seed * 1_000_003 + rank + start_epoch)
    else:
        gen.manual_seed(cfg.seed * 1_000_003 + rank)  # ranks draw different augmentations

    # No per-forward buffer broadcast: it would send the K×(M·C) centres (20 MB at the
    # paper's size) three times a step although they are already kept equal by the one
    # all-reduce of the centre update. BN statistics are made rank 0's before evaluating.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=no_buffer_sync())
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    steps = max(config["num_train_rows"] // global_batch, 1)
    logger = _RankZeroLogger(config.get("mlflow")) if rank == 0 else None

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        metrics = train_one_epoch(
            model, optimizer,
            _batches(train_shard, cfg.optim.batch_size, train=True, seed=cfg.seed * 7919 + rank,
                     epoch=epoch),
            cfg=cfg, epoch=epoch, steps_per_epoch=steps, base_lr=base_lr, generator=gen,
            device=device,
        )
        # Evaluate the plain module, not DDP: ranks hold different numbers of val batches
        # (nothing dropped), and DDP's per-forward buffer broadcast would then deadlock.
        # BN running statistics are made rank 0's first, so every rank scores one model.
        core = unwrap(model)
        _broadcast_buffers(core, world)
        val = evaluate(core, _batches(val_shard, 64, train=False, seed=0, epoch=0), cfg=cfg,
                       device=device, distributed=world > 1)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["images_per_s"] *= world  # every rank runs at about the same rate
        metrics["epoch"] = epoch + 1
        metrics["epoch_time_s"] = time.perf_counter() - t0
        score = metrics.get("val_fused_top1")
        if score is not None and (best is None or score > best):
            best = score
        metrics["best_val_fused_top1"] = best if best is not None else float("nan")
        # Every rank gathers its RNG state; rank 0 writes the checkpoint.
        rng_states = _gather_rng(gen, world)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "best": best,
                    "rng": rng_states,
                    "config": cfg.to_dict(),
                    "class_names": config.get("class_names"),
                    "metrics": {k: float(v) for k, v in metrics.items()},
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                print(f"[wsdan] {format_epoch(metrics)}", flush=True)  # in the job's logs
                if logger is not None:
                    logger.log_epoch(metrics, epoch + 1)
                    if config.get("figure_batch") is not None and (
                            epoch % FIGURE_EVERY == 0 or epoch + 1 == cfg.optim.epochs):
                        logger.log_attention(unwrap(model), config["figure_batch"], cfg,
                                             config.get("class_names") or [], epoch + 1)
            ray.train.report(metrics, checkpoint=checkpoint)


def no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in torch 2.14)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: False}


def _broadcast_buffers(module: torch.nn.Module, world: int) -> None:
    if world > 1 and torch.distributed.is_initialized():
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


def _gather_rng(gen: torch.Generator, world: int) -> dict[str, torch.Tensor]:
    state = gen.get_state()
    if world == 1 or not torch.distributed.is_initialized():
        return {"0": state}
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    return {str(i): s for i, s in enumerate(states)}


class _RankZeroLogger:
    """Per-epoch metrics to an existing MLflow run (created once by the driver)."""

    def __init__(self, spec: dict[str, str] | None) -> None:
        self.client = None
        if spec:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec["tracking_uri"])
            self.run_id = spec["run_id"]

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        self.client.log_batch(self.run_id, metrics=items)


    def log_attention(self, model, batch: dict[str, Any], cfg: TrainConfig,
                      class_names: list[str], epoch: int) -> None:
        """Heat-map overlays and refinement boxes for a fixed set of val images."""
        if self.client is None:
            return
        from wsdan.inference import predict
        from wsdan.tracking.runs import attention_figure
        from wsdan.transforms import center_crop

        was_training = model.training
        model.eval()
        images = center_crop(batch["image"], cfg.data.image_size).to(
            next(model.parameters()).device)
        out = predict(model, images, theta=cfg.inference.refine_theta,
                      padding=cfg.inference.refine_padding)
        model.train(was_training)
        names = class_names or [str(i) for i in range(cfg.model.num_classes)]
        fig = attention_figure(images.cpu(), out.attention_mean.cpu(), out.boxes.cpu(),
                               batch["label"], out.logits.argmax(1).cpu(), names)
        self.client.log_figure(self.run_id, fig, f"attention/epoch_{epoch:03d}.png")
