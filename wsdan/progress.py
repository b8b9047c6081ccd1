"""What the person who started a job sees: the project's own progress, not Ray's logs.

The driver creates a :class:`ProgressBoard` (a small actor, no CPU) and hands it to the
workers. Rank 0 posts a step event at most every ``interval_s`` seconds (epoch, step,
images so far; no host sync: these are counts the loop has anyway) and one epoch event with
the epoch's metrics once its checkpoint is stored. A thread in the driver
(:class:`DriverProgress`) turns them into one progress bar per epoch (images/s over all
ranks, ETA) and one line per epoch, printed once. Ray's own output (worker logs, Ray Data's
progress bars, its INFO lines) stays in Ray's log files unless the job runs ``--verbose``
(:func:`wsdan.cluster.connect` with ``quiet``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Events from the workers, taken by the driver in order."""

        def __init__(self) -> None:
            self._events: list[dict[str, Any]] = []

        def put(self, event: dict[str, Any]) -> None:
            self._events.append(event)

        def take(self) -> list[dict[str, Any]]:
            events, self._events = self._events, []
            return events

    return ProgressBoard


def create_board() -> Any:
    """A board for this driver's job (outside any placement group: it must not take a
    worker's place, nor die with one)."""
    return _board_class().options(scheduling_strategy="DEFAULT").remote()


class StepReporter:
    """The worker side: ``step(...)`` from the training loop, throttled; ``epoch(metrics)``
    once per epoch. Posting is fire-and-forget: a slow driver never slows training."""

    def __init__(self, board: Any, *, world: int, interval_s: float = 2.0) -> None:
        self.board, self.world, self.interval_s = board, world, interval_s
        self._last = 0.0

    def step(self, epoch: int, step: int, steps: int, images: int, elapsed_s: float) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and step < steps:
            return
        self._last = now
        self.board.put.remote({"kind": "step", "epoch": epoch, "step": step, "steps": steps,
                               "images": images * self.world, "elapsed_s": elapsed_s})

    def epoch(self, metrics: dict[str, Any], epochs: int) -> None:
        self.board.put.remote({"kind": "epoch", "metrics": dict(metrics), "epochs": epochs})


class DriverProgress:
    """The driver side: polls the board in a thread while ``trainer.fit()`` runs and draws
    a bar per epoch and the epoch lines. Use as a context manager."""

    def __init__(self, board: Any, *, epochs: int, out: Any = None, poll_s: float = 1.0,
                 line: Callable[[dict[str, Any]], str] | None = None) -> None:
        from wsdan.local import format_epoch

        self.board, self.epochs, self.poll_s = board, epochs, poll_s
        self.out = out or sys.stdout
        self.line = line or format_epoch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wsdan-progress", daemon=True)
        self._bar: Any = None
        self._bar_epoch: int | None = None
        self.epoch_lines: list[str] = []
        self._seen: set[Any] = set()

    def __enter__(self) -> DriverProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()  # what arrived after the last poll
        self._close_bar()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.board.take.remote(), timeout=30)
        except Exception:  # the board is gone (job over) or slow: nothing to draw now
            return
        for event in events:
            if event["kind"] == "step":
                self._step(event)
            else:
                self._epoch(event)

    def _step(self, e: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self._bar_epoch != e["epoch"]:
            self._close_bar()
            tty = getattr(self.out, "isatty", lambda: False)()
            self._bar = tqdm(total=e["steps"], desc=f"epoch {e['epoch'] + 1}/{self.epochs}",
                             unit="step", file=self.out, dynamic_ncols=tty, leave=False,
                             mininterval=0.5 if tty else 15.0, ascii=not tty)
            self._bar_epoch = e["epoch"]
        rate = e["images"] / e["elapsed_s"] if e["elapsed_s"] > 0 else 0.0
        self._bar.set_postfix_str(f"{rate:.1f} img/s", refresh=False)
        self._bar.update(max(e["step"] - self._bar.n, 0))

    def _epoch(self, e: dict[str, Any]) -> None:
        self._close_bar()
        m = e["metrics"]
        k = m.get("epoch")
        # An epoch seen before was redone: its workers failed before Ray Train took in
        # its checkpoint, so the job restarted from the one before.
        again = " (again, after a restart)" if k in self._seen else ""
        self._seen.add(k)
        line = self.line(m).replace(f"epoch {k}", f"epoch {k}/{e['epochs']}{again}", 1)
        text = f"[wsdan] {line} | {m.get('epoch_time_s', 0):.0f}s"
        self.epoch_lines.append(text)
        print(text, file=self.out, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_epoch = None, None
