"""The pipeline's two small cluster-wide actors: the corrupt-image tally and the epoch clock.

:class:`SkipLog` keeps the distinct ids of the images that failed to decode, per source
(``"<uri>#<split>"``); the decode tasks report to it only when an image fails, so healthy
data costs nothing. :class:`EpochClock` holds the epoch each shuffled dataset's consumers
announced last, which the read plan of ``wsdan.data.pipeline.EpochShuffle`` reads, so an
epoch's order depends on ``(seed, epoch)`` alone, also after a resume. Both are named
actors without CPU, started on first use.
"""

from __future__ import annotations

from typing import Any

import ray
import ray.data
from ray.data import DataContext

__all__ = [
    "EPOCH_CLOCK_NAME",
    "EPOCH_KEY_CONFIG",
    "SKIP_LOG_NAME",
    "EpochClock",
    "SkipLog",
    "announce_epoch",
    "epoch_clock",
    "skip_log",
    "skip_report",
    "skipped_images",
    "source_key",
]

SKIP_LOG_NAME = "wsdan-skipped-images"
EPOCH_CLOCK_NAME = "wsdan-epoch-clock"
EPOCH_KEY_CONFIG = "wsdan.epoch_key"  # DataContext config: the dataset's key in the clock


# -- corrupt-image accounting --------------------------------------------------------------


@ray.remote(num_cpus=0)
class SkipLog:
    """Distinct images that failed to decode, per source (``"<uri>#<split>"``).

    Distinct ids, not events: the same broken image seen again next epoch, or by a
    retried task, counts once. ``events`` counts every time one was dropped.
    """

    def __init__(self) -> None:
        self._ids: dict[str, dict[str, str]] = {}
        self._events: dict[str, int] = {}

    def add(self, source: str, skipped: list[tuple[str, str]]) -> None:
        ids = self._ids.setdefault(source, {})
        for image_id, reason in skipped:
            ids.setdefault(image_id, reason)
        self._events[source] = self._events.get(source, 0) + len(skipped)

    def report(self, source: str | None = None) -> dict[str, dict[str, Any]]:
        keys = [source] if source is not None else sorted(self._ids)
        return {k: {"images": len(self._ids.get(k, {})), "events": self._events.get(k, 0),
                    "examples": dict(list(self._ids.get(k, {}).items())[:20])} for k in keys}


def source_key(uri: str, split: str) -> str:
    return f"{uri.rstrip('/')}#{split}"


def skip_log(create: bool) -> Any:
    if create:
        return SkipLog.options(name=SKIP_LOG_NAME, get_if_exists=True,
                               scheduling_strategy="DEFAULT").remote()  # see epoch_clock
    try:
        return ray.get_actor(SKIP_LOG_NAME)
    except ValueError:
        return None


def skip_report(root_uri: str | None = None, split: str | None = None) -> dict[str, Any]:
    """``{"<uri>#<split>": {"images": n, "events": m, "examples": {id: reason}}}``."""
    actor = skip_log(create=False) if ray.is_initialized() else None
    if actor is None:
        return {}
    source = source_key(root_uri, split or "") if root_uri is not None else None
    return ray.get(actor.report.remote(source))


def skipped_images(root_uri: str, split: str) -> int:
    """Distinct images of ``split`` skipped as corrupt so far (log it as ``skipped_images``)."""
    return int(skip_report(root_uri, split).get(source_key(root_uri, split), {}).get("images", 0))


# -- per-epoch order -----------------------------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EpochClock:
    """The epoch that the consumers of each shuffled dataset announced last, by dataset key.

    Ray plans a dataset's read tasks anew at every execution (every epoch), in the process
    that executes it: the driver, or the ``streaming_split`` coordinator actor behind Ray
    Train's dataset shards. Ray's own ``FileShuffleConfig(reseed_after_execution=True)``
    seeds that plan with the number of executions so far, which starts again at 0 in a new
    coordinator, i.e. after a job or its worker group resumes from a checkpoint. So the
    consumer announces the epoch it is about to read (:func:`iter_torch` with ``epoch``,
    before it asks for the first batch) and the plan reads it from here (`EpochShuffle`).

    One detached actor per cluster (namespace ``wsdan``, no CPU), keyed by a random id per
    dataset: it must outlive whichever process created it (a Tune trial stopped early,
    while other trials train). Should it be lost with its node, it restarts empty, and
    the next epoch's announcement fills it again.
    """

    def __init__(self) -> None:
        self._epochs: dict[str, int] = {}

    def announce(self, key: str, epoch: int) -> None:
        self._epochs[key] = epoch

    def epoch(self, key: str) -> int | None:
        return self._epochs.get(key)


def epoch_clock() -> Any:
    # scheduling_strategy="DEFAULT": outside the caller's placement group. Created from a
    # Train worker it would otherwise be captured by that run's group, die with it, and
    # (max_restarts=-1) wait forever to restart in a group that no longer exists: the next
    # trial of a sweep then hung in announce_epoch.
    return EpochClock.options(name=EPOCH_CLOCK_NAME, namespace="wsdan", lifetime="detached",
                              get_if_exists=True, scheduling_strategy="DEFAULT").remote()


def _dataset_context(data: ray.data.Dataset | ray.data.DataIterator) -> DataContext | None:
    if isinstance(data, ray.data.Dataset):
        return data.context
    return data.get_context()  # a shard: one call to its coordinator


def announce_epoch(data: ray.data.Dataset | ray.data.DataIterator, epoch: int) -> None:
    """Tell a shuffled dataset (built by :func:`build_dataset` / :func:`build_folder_dataset`)
    which epoch its next execution is, before iterating it: its read order is then a
    function of ``(seed, epoch)`` alone. Every consumer of a split (every Train worker)
    announces the same epoch; a dataset that was not shuffled ignores it."""
    ctx = _dataset_context(data)
    key = ctx.get_config(EPOCH_KEY_CONFIG) if ctx is not None else None
    if key is not None:
        ray.get(epoch_clock().announce.remote(key, int(epoch)))
