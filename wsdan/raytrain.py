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

import copy
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import DataConfig

from wsdan import storage
from wsdan.accel import Accel
from wsdan.config import TrainConfig
from wsdan.engine import evaluate, train_one_epoch
from wsdan.local import format_epoch
from wsdan.model import build_model
from wsdan.optim import build_optimizer, scaled_lr
from wsdan.train_step import unwrap

CHECKPOINT_FILE = "state.pt"
FIGURE_EVERY = 2  # epochs between attention heat-map figures (and the last epoch)
FIGURE_IMAGES = 8  # val images in each attention figure


class ExactEvalDataConfig(DataConfig):
    """Split ``train`` equally across workers (DDP needs the same number of steps on every
    rank) and the evaluation datasets *without* dropping rows (``equal=False``), so that
    summed counts cover every validation image exactly once. Splits prefer the workers'
    own nodes (locality hints), as Train's default does.

    data_cpus caps the CPUs that each of the job's datasets may hold at once (Ray Data's
    ``resource_limits``): jobs sharing a cluster then leave each other's workers alone."""

    def __init__(self, exact: tuple[str, ...] = ("val", "test"), *,
                 data_cpus: float | None = None, **kwargs: Any) -> None:
        options = DataConfig.default_ingest_options()
        if data_cpus is not None:
            options.resource_limits = options.resource_limits.copy(cpu=data_cpus)
        super().__init__(execution_options=options, **kwargs)
        self._exact = set(exact)
        self._options = options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        exact = {k: v for k, v in datasets.items() if k in self._exact}
        rest = {k: v for k, v in datasets.items() if k not in self._exact}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        for name, ds in exact.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = copy.deepcopy(self._options)
            splits = ds.streaming_split(world_size, equal=False,
                                        locality_hints=worker_node_ids)
            for i, split in enumerate(splits):
                output[i][name] = split
        return output


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path/state.pt`` whole or not at all (``wsdan.storage.write_bytes``):
    a full disk raises ``StorageFullError`` naming the file, where ``torch.save`` to the
    path would leave a truncated file and an error that names neither."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(str(Path(path) / CHECKPOINT_FILE), buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state a checkpoint folder holds, read with ``torch.load(weights_only=True)``: a
    file holding other objects than tensors and plain containers (a pickle that could run
    code) is refused with a :class:`~wsdan.weights.WeightsError` naming the file."""
    from wsdan.weights import WeightsError

    file = Path(path) / CHECKPOINT_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError (foreign objects), RuntimeError (corrupt file)
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise WeightsError(f"checkpoint {file}: refused by torch.load(weights_only=True), "
                           f"which reads only tensors and plain containers: {first}") from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise WeightsError(f"checkpoint {file}: not a wsdan checkpoint (no 'model' state dict)")
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """``model.load_state_dict(state["model"])``, strictly; a checkpoint of another shape
    (other classes, attention maps or backbone) is a :class:`~wsdan.weights.WeightsError`
    naming the parameters that differ."""
    from wsdan.weights import WeightsError

    own = model.state_dict()
    theirs = state["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [f"{k} {tuple(theirs[k].shape)} (the model has {tuple(v.shape)})"
              for k, v in own.items() if k in theirs and hasattr(theirs[k], "shape")
              and tuple(theirs[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = ([f"shapes differ: {', '.join(shapes[:3])}"] if shapes else []) + (
            [f"missing: {', '.join(missing[:3])}"] if missing else []) + (
            [f"not in the model: {', '.join(unexpected[:3])}"] if unexpected else [])
        raise WeightsError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(theirs)


def _batches(shard, batch_size: int, *, train: bool, seed: int, epoch: int,
             pin_memory: bool = False):
    """Torch batches from a Ray Data shard, in the engine's batch format. Training drops the
    last partial batch, so that every rank takes the same number of DDP steps. On a GPU the
    batches come in pinned memory (asynchronous host-to-device copies)."""
    from wsdan.data.pipeline import iter_torch

    return iter_torch(shard, batch_size, shuffle_buffer=8 * batch_size if train else None,
                      seed=seed, epoch=epoch, drop_last=train, pin_memory=pin_memory)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop.

    ``config`` keys: ``train`` (a ``TrainConfig`` dict), ``num_train_rows`` (rows of the
    train split, for the schedule), ``class_names``, optional ``mlflow`` (``tracking_uri``,
    ``run_id``: rank 0 logs per-epoch metrics to that run) and ``figures`` (attention
    heat-maps of rank 0's first val images, default true).
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
    accel = Accel.from_config(m, device)  # precision, memory format, compile (wsdan.accel)
    accel.prepare(model)
    pin = device.type == "cuda"
    global_batch = cfg.optim.batch_size * world
    base_lr = scaled_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    gen = torch.Generator(device=device)
    start_epoch, best = 0, None

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d)
        load_model_state(model, state, ckpt.path)
        optimizer.load_state_dict(state["optimizer"])
        accel.load_state_dict(state.get("accel"))
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
    logger = None
    if rank == 0:
        from wsdan.tracking.sender import RankZeroLogger  # imports MLflow: rank 0 only

        logger = RankZeroLogger(config.get("mlflow"))
    board = config.get("progress")  # the driver's ProgressBoard (wsdan.progress), if any
    reporter = None
    if board is not None and rank == 0:
        from wsdan.progress import StepReporter

        reporter = StepReporter(board, world=world)
    if logger is not None and ckpt is not None:
        # The checkpointed epoch (the job may have stopped between storing its checkpoint
        # and logging it) and the epochs that were still buffered when it was written.
        unlogged = {int(e["epoch"]): e["metrics"] for e in state.get("unlogged_epochs") or []}
        unlogged[start_epoch] = state.get("metrics") or {}
        logger.ensure_logged(unlogged)
    figure_batch: dict[str, torch.Tensor] | None = None  # rank 0's first val images
    worker_nodes = _gather_object(ray.get_runtime_context().get_node_id(), world)
    if ckpt is not None and rank == 0:
        # Evidence that a resumed job continues from the checkpoint (centres restored, not
        # reset): the restored centres' norm, to compare with the epoch's logged one.
        restored = float(unwrap(model).feature_centers.norm())
        print(f"[wsdan] resumed at epoch {start_epoch}: centres restored "
              f"(norm {restored:.6g}) on nodes {sorted(set(worker_nodes))}", flush=True)
        if logger is not None:
            logger.log_value("resumed_center_norm", restored, start_epoch)

    for epoch in range(start_epoch, cfg.optim.epochs):
        t0 = time.perf_counter()
        metrics = train_one_epoch(
            model, optimizer,
            _batches(train_shard, cfg.optim.batch_size, train=True, seed=cfg.seed * 7919 + rank,
                     epoch=epoch, pin_memory=pin),
            cfg=cfg, epoch=epoch, steps_per_epoch=steps, base_lr=base_lr, generator=gen,
            device=device, accel=accel,
            progress=reporter.step if reporter is not None else None,
        )
        metrics = reduce_train_metrics(metrics, world, device)
        # Evaluate the plain module, not DDP: ranks hold different numbers of val batches
        # (nothing dropped), and DDP's per-forward buffer broadcast would then deadlock.
        # BN running statistics are made rank 0's first, so every rank scores one model.
        core = unwrap(model)
        _broadcast_buffers(core, world)
        val_batches = _batches(val_shard, 64, train=False, seed=0, epoch=0, pin_memory=pin)
        if (rank == 0 and figure_batch is None and config.get("figures", True)
                and logger is not None and logger.active):
            figure_batch = {}
            val_batches = _keep_first(val_batches, FIGURE_IMAGES, figure_batch)
        val = evaluate(core, val_batches, cfg=cfg, device=device, distributed=world > 1,
                       confusion=True, accel=accel)
        confusion = val.pop("confusion")  # K×K counts over the whole val split
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["epoch"] = epoch + 1
        metrics["epoch_time_s"] = time.perf_counter() - t0
        metrics["center_norm"] = float(core.feature_centers.norm())
        # Every rank must hold the same weights and centres (DDP averages gradients, the
        # centre update is all-reduced, BN buffers were just made rank 0's): checked.
        digests = _gather_object(replica_digest(core), world)
        if len(set(digests)) > 1:
            print(f"[wsdan] WARNING: ranks hold different models after epoch {epoch + 1} "
                  f"(digests {digests})", flush=True)
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
                    "accel": accel.state_dict(),  # the fp16 gradient scale, if any
                    "epoch": epoch + 1,
                    "best": best,
                    "rng": rng_states,
                    "config": cfg.to_dict(),
                    "class_names": config.get("class_names"),
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "confusion": confusion,
                    "worker_nodes": worker_nodes,  # node id of each rank
                    "replica_digests": digests,  # of each rank's weights and buffers
                    # Epochs whose metrics MLflow has not taken yet (its server is down): a
                    # resumed job sends them (RankZeroLogger.ensure_logged).
                    "unlogged_epochs": logger.unlogged() if logger is not None else [],
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                if reporter is None:  # no driver board: the line goes to the job's logs
                    print(f"[wsdan] {format_epoch(metrics)}", flush=True)
            ray.train.report(metrics, checkpoint=checkpoint)
            if reporter is not None:  # once the checkpoint is stored
                reporter.epoch(metrics, cfg.optim.epochs)
        # Logged once the epoch's checkpoint is stored: a job that dies before that redoes
        # the epoch and logs it then; one that dies right after logs it on resume
        # (ensure_logged). Either way every epoch is logged exactly once. The logger queues
        # and returns: an MLflow server that is down does not hold training up.
        if logger is not None:
            logger.log_epoch(metrics, epoch + 1)
            if figure_batch and (epoch % FIGURE_EVERY == 0 or epoch + 1 == cfg.optim.epochs):
                logger.log_attention(core, figure_batch, cfg, config.get("class_names") or [],
                                     epoch + 1)
    if logger is not None:
        logger.close()  # waits (bounded) until MLflow has every buffered epoch


_TRAIN_MEANS = ("loss", "loss_raw", "loss_crop", "loss_drop", "loss_center", "train_raw_top1",
                "data_wait_fraction")


def reduce_train_metrics(metrics: dict[str, float], world: int,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """The epoch's training metrics over all ranks, as one process that ran every step:
    means weighted by each rank's image count, images and images/s summed. One collective."""
    if world == 1 or not torch.distributed.is_initialized():
        return metrics
    n = float(metrics["train_images"])
    vals = [metrics[k] * n for k in _TRAIN_MEANS] + [n, metrics["images_per_s"]]
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    total = t.tolist()  # host sync, once per epoch
    out = dict(metrics)
    images = max(total[len(_TRAIN_MEANS)], 1.0)
    out.update({k: total[i] / images for i, k in enumerate(_TRAIN_MEANS)})
    out["train_images"] = total[len(_TRAIN_MEANS)]
    out["images_per_s"] = total[-1]
    return out


def _keep_first(batches, n: int, into: dict[str, torch.Tensor]):
    """Pass ``batches`` through, keeping (CPU copies of) the first ``n`` images, labels and
    boxes in ``into``: the fixed images of the attention figures, taken from this rank's
    own share of the distributed evaluation (the driver reads no data)."""
    for batch in batches:
        if not into:
            into.update({k: v[:n].cpu().clone() for k, v in batch.items()
                         if isinstance(v, torch.Tensor)})
        yield batch


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


def replica_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (weights, centres, BN buffers), bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather_object(obj: Any, world: int) -> list[Any]:
    if world == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _gather_rng(gen: torch.Generator, world: int) -> dict[str, torch.Tensor]:
    return {str(i): st for i, st in enumerate(_gather_object(gen.get_state(), world))}
