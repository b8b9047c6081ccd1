"""Rank 0's MLflow logging during training, off the training thread.

A Ray Train job's run is created by the driver; rank 0 logs each epoch's metrics and the
attention figures to it through :class:`RankZeroLogger`, whose one sender thread delivers
what is queued in order and keeps it while the tracking server cannot take it (down,
restarting, 5xx, throttled). Training never waits for MLflow, and nothing logged is
dropped silently: what is still undelivered is stored in each checkpoint and sent by the
resumed job.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from wsdan.config import TrainConfig

# MLflow's own HTTP retries (7, backoff factor 2: ~4 min for one call against a server that
# is down) would hold each buffered item for minutes after the server is back; the sender
# below retries by itself, so rank 0's process gives each call one short retry. Set only
# where the job's runtime_env does not set them.
MLFLOW_WORKER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
FLUSH_TIMEOUT_S = 300.0  # the end of training waits this long for MLflow to take the rest
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 15.0  # the sender's backoff while MLflow is down


def is_permanent(error: BaseException) -> bool:
    """An MLflow error that retrying cannot fix: a 4xx answer (bad request, no such run,
    permission) other than 429, or not an I/O or MLflow error at all (a bug). Connection
    errors, time-outs, 5xx and 429 are transient. Decided by type and error code."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    else:  # requests.HTTPError (artifact uploads) carries its response
        status = getattr(getattr(error, "response", None), "status_code", None)
        if not isinstance(status, int):
            return not isinstance(error, OSError)  # requests' errors are OSErrors too
    return 400 <= status < 500 and status != 429


@dataclasses.dataclass
class _Item:
    what: str  # for messages: "metrics of epoch 3"
    send: Callable[[Any], None]  # called with the MlflowClient
    epochs: tuple[int, ...] = ()  # the epochs whose metrics it delivers


class RankZeroLogger:
    """Rank 0's MLflow logging to the job's run (created once by the driver), off the
    training thread.

    Each call queues what it logs and returns at once; one sender thread delivers the queue
    in order. When the tracking server does not answer (down, restarting, 5xx, throttled),
    the sender keeps the item and tries again (backoff from 1 s to 15 s) until it is taken:
    training goes on, and what was logged meanwhile is sent once the server is back, with
    the step and timestamp it had (a repeated delivery is the same metric, not a new one).
    An error that retrying cannot fix (a 4xx such as a deleted run) is printed and that item
    dropped. The epochs not yet delivered are kept in every checkpoint (:meth:`unlogged`),
    and a resumed job delivers those its run lacks (:meth:`ensure_logged`). :meth:`close`
    (the end of training) waits up to ``flush_timeout_s`` for the queue to empty and says
    what was not delivered.
    """

    def __init__(self, spec: dict[str, str] | None, *,
                 flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        self.client = None
        self.flush_timeout_s = flush_timeout_s
        self.delivered = 0  # items MLflow took
        self.failures = 0  # delivery attempts that failed (and were retried)
        self.dropped: list[str] = []  # items refused for good
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._unlogged: dict[int, dict[str, float]] = {}
        self._thread: threading.Thread | None = None
        if spec:
            from mlflow.tracking import MlflowClient

            for name, value in MLFLOW_WORKER_ENV.items():
                os.environ.setdefault(name, value)
            self.client = MlflowClient(tracking_uri=spec["tracking_uri"])
            self.run_id = spec["run_id"]
            self.tracking_uri = spec["tracking_uri"]
            self._thread = threading.Thread(target=self._send_loop, daemon=True,
                                            name="wsdan-mlflow-sender")
            self._thread.start()

    @property
    def active(self) -> bool:
        return self.client is not None

    # -- what the training loop calls (never blocks on MLflow) ----------------------------

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v}
        now = int(time.time() * 1000)
        self._put(_Item(f"metrics of epoch {step}",
                        functools.partial(self._log_metrics, clean, step, now), (step,)),
                  {step: clean})

    def log_value(self, key: str, value: float, step: int) -> None:
        if self.client is not None:
            now = int(time.time() * 1000)
            self._put(_Item(f"{key} at step {step}", functools.partial(
                self._log_metrics, {key: float(value)}, step, now)))

    def ensure_logged(self, epochs: dict[int, dict[str, float]]) -> None:
        """On resume: log the metrics of each of ``epochs`` (epoch -> metrics) that the run
        lacks (the job stopped before MLflow took them); the others are not repeated."""
        epochs = {int(e): dict(m) for e, m in epochs.items() if int(e) >= 1 and m}
        if self.client is None or not epochs:
            return
        self._put(_Item(f"metrics of epoch(s) {sorted(epochs)} (resumed job)",
                        functools.partial(self._log_missing, epochs), tuple(sorted(epochs))),
                  epochs)

    def unlogged(self) -> list[dict[str, Any]]:
        """The epochs whose metrics MLflow has not taken yet: ``[{"epoch", "metrics"}]``."""
        with self._cond:
            return [{"epoch": e, "metrics": dict(m)} for e, m in sorted(self._unlogged.items())]

    def close(self, timeout_s: float | None = None) -> bool:
        """Wait until the queue is delivered, up to ``timeout_s`` (default flush_timeout_s).
        True when everything was taken; otherwise print what was not (the job's last
        checkpoint keeps those epochs, and rerunning the job sends them)."""
        if self.client is None:
            return True
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            left = [item.what for item in self._queue]
            epochs = sorted(self._unlogged)
        if left:
            print(f"[wsdan] WARNING: the MLflow server at {self._where()} did not take "
                  f"{len(left)} item(s) before the end of training ({'; '.join(left)}): "
                  f"epoch(s) {epochs} are kept in the job's last checkpoint and are logged "
                  "to the run when the job is rerun (same --name and --storage-path)",
                  flush=True)
        return not left

    # -- the sender thread ------------------------------------------------------------------

    def _put(self, item: _Item, epochs: dict[int, dict[str, float]] | None = None) -> None:
        with self._cond:
            self._unlogged.update(epochs or {})
            self._queue.append(item)
            self._cond.notify_all()

    def _send_loop(self) -> None:
        delay, down_since = _RETRY_FIRST_S, None
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue[0]
            try:
                item.send(self.client)
            except Exception as e:  # noqa: BLE001 - classified below, never lost silently
                if is_permanent(e):
                    self.dropped.append(item.what)
                    print(f"[wsdan] WARNING: MLflow refused the {item.what} for run "
                          f"{self.run_id}, not retried: {self._error(e)}", flush=True)
                    self._done(item)
                    continue
                self.failures += 1
                if down_since is None:
                    down_since = time.monotonic()
                    print(f"[wsdan] the MLflow server at {self._where()} cannot take what "
                          f"rank 0 logs ({self._error(e)}): training goes on, and what it "
                          "logs is kept and sent when the server takes it again", flush=True)
                time.sleep(delay)
                delay = min(2 * delay, _RETRY_MAX_S)
                continue
            self._done(item)
            if down_since is not None:
                with self._cond:
                    waiting = len(self._queue)
                print(f"[wsdan] the MLflow server takes it again after "
                      f"{time.monotonic() - down_since:.0f} s: sending what was kept "
                      f"({waiting + 1} item(s))", flush=True)
                delay, down_since = _RETRY_FIRST_S, None

    def _done(self, item: _Item) -> None:
        with self._cond:
            self._queue.popleft()
            for epoch in item.epochs:
                self._unlogged.pop(epoch, None)
            self.delivered += 1
            self._cond.notify_all()

    def _log_metrics(self, metrics: dict[str, float], step: int, timestamp: int,
                     client: Any) -> None:
        from mlflow.entities import Metric

        client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp, step)
                                               for k, v in metrics.items()])

    def _log_missing(self, epochs: dict[int, dict[str, float]], client: Any) -> None:
        logged = {m.step for m in client.get_metric_history(self.run_id, "epoch")}
        now = int(time.time() * 1000)
        for epoch, metrics in sorted(epochs.items()):
            if epoch not in logged:
                self._log_metrics(metrics, epoch, now, client)

    def _where(self) -> str:
        from wsdan.tracking.runs import redact

        return str(redact("tracking_uri", self.tracking_uri))

    @staticmethod
    def _error(error: BaseException) -> str:
        from wsdan.tracking.runs import redact

        text = " ".join(str(error).split())
        return str(redact("error", f"{type(error).__name__}: {text[:300]}"))

    def log_attention(self, model, batch: dict[str, Any], cfg: TrainConfig,
                      class_names: list[str], epoch: int) -> None:
        """Heat-map overlays and refinement boxes for a fixed set of val images (computed
        here, uploaded by the sender)."""
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
        path = f"attention/epoch_{epoch:03d}.png"
        self._put(_Item(f"attention figure of epoch {epoch}",
                        lambda client: client.log_figure(self.run_id, fig, path)))
