"""A sweep's results: one row per trial, the table as CSV and Markdown, and two figures.

Rows come from Ray Tune's results (every epoch each trial reported), so they hold the same
numbers as the trials' MLflow child runs, which rank 0 logged from the same metrics.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuning.space import METRIC, SweepConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # FINISHED, KILLED (stopped early), FAILED
    epochs: int  # epochs the trial ran
    final: float  # val_fused_top1 of its last epoch (nan if none)
    best: float  # best val_fused_top1 over its epochs
    best_epoch: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_fused_top1)
    best_checkpoint: str | None = None  # checkpoint path of its best epoch (storage fs)
    error: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.status == "KILLED"


def rows_from_results(grid: Any, sweep: SweepConfig) -> list[TrialRow]:
    """Rows of a Tune ``ResultGrid``, in trial-id order."""
    from tuning.trial import trial_outcome

    rows = []
    for result in grid:
        df = result.metrics_dataframe
        records = [] if df is None or df.empty else df.to_dict("records")
        by_epoch: dict[int, dict[str, Any]] = {}
        for rec in records:  # a restarted worker group may re-report an epoch: keep the last
            if rec.get("epoch") is not None and not _isnan(rec.get("epoch")):
                by_epoch[int(rec["epoch"])] = rec
        curve = [(e, float(by_epoch[e].get(METRIC, math.nan))) for e in sorted(by_epoch)]
        last = (result.metrics or {}) if records else {}
        trial_id = str(last.get("trial_id") or (records[-1].get("trial_id") if records else "")
                       or _trial_id_from_path(result.path))
        scored = [(v, e) for e, v in curve if not _isnan(v)]
        best, best_epoch = max(scored) if scored else (math.nan, 0)
        failed = result.error is not None
        rows.append(TrialRow(
            trial_id=trial_id,
            params={k: _plain(v) for k, v in (result.config or {}).items()
                    if k in sweep.space.domains},
            status=trial_outcome({"epoch": curve[-1][0]} if curve else None, sweep.epochs,
                                 failed=failed),
            epochs=curve[-1][0] if curve else 0,
            final=curve[-1][1] if curve else math.nan,
            best=best, best_epoch=best_epoch, curve=curve,
            best_checkpoint=by_epoch.get(best_epoch, {}).get("checkpoint_path"),
            error=f"{type(result.error).__name__}: {result.error}" if failed else None,
        ))
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    scored = [r for r in rows if not _isnan(r.best) and r.best_checkpoint]
    return max(scored, key=lambda r: (r.best, -r.epochs)) if scored else None


def compute_saved(rows: Sequence[TrialRow], epochs: int) -> dict[str, float]:
    """Epochs run against running every trial to the end."""
    run = sum(r.epochs for r in rows)
    full = epochs * len(rows)
    return {"epochs_run": run, "epochs_if_all_finished": full,
            "compute_saved_fraction": (1 - run / full) if full else 0.0,
            "trials_stopped_early": sum(r.stopped_early for r in rows),
            "trials_failed": sum(r.status == "FAILED" for r in rows)}


def _columns(rows: Sequence[TrialRow]) -> list[str]:
    keys = sorted({k for r in rows for k in r.params})
    return ["trial_id", *keys, f"final_{METRIC}", f"best_{METRIC}", "best_epoch", "epochs",
            "stopped_early", "status", "error"]


def _cells(r: TrialRow, keys: list[str]) -> list[Any]:
    return [r.trial_id, *[r.params.get(k, "") for k in keys], r.final, r.best, r.best_epoch,
            r.epochs, r.stopped_early, r.status, r.error or ""]


def table_csv(rows: Sequence[TrialRow]) -> str:
    cols = _columns(rows)
    keys = cols[1:-7]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([repr(c) if isinstance(c, float) else c for c in _cells(r, keys)])
    return buf.getvalue()


def table_markdown(rows: Sequence[TrialRow]) -> str:
    cols = _columns(rows)
    keys = cols[1:-7]

    def fmt(c: Any) -> str:
        if isinstance(c, float):
            return "–" if _isnan(c) else f"{c:.4g}"
        return str(c).replace("|", "\\|").replace("\n", " ")[:200]

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c) for c in _cells(r, keys)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def params_figure(rows: Sequence[TrialRow], sweep: SweepConfig) -> Figure:
    """Best val fused top-1 of each trial against each searched parameter."""
    from matplotlib.figure import Figure

    keys = list(sweep.space.domains)
    n = len(keys)
    cols = min(n, 3)
    fig = Figure(figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(n / cols), cols, i + 1)
        for status, marker in (("FINISHED", "o"), ("KILLED", "x")):
            pts = [(r.params[key], r.best) for r in rows
                   if r.status == status and key in r.params and not _isnan(r.best)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status.lower().replace(
                    "killed", "stopped early"))
        if sweep.space.domains[key].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {METRIC}")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")
    fig.suptitle(f"{len(rows)} trials: accuracy against each searched parameter")
    return fig


def curves_figure(rows: Sequence[TrialRow], sweep: SweepConfig) -> Figure:
    """val fused top-1 per epoch for every trial on one plot; ASHA rungs as dashed lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for rung in sweep.rungs():
        ax.axvline(rung, color="grey", linestyle="--", linewidth=0.8)
    for r in rows:
        if not r.curve:
            continue
        x, y = zip(*r.curve)
        ax.plot(x, y, marker="o", markersize=3, linestyle=":" if r.stopped_early else "-",
                label=f"{r.trial_id} ({r.status.lower()})")
    ax.set_xlabel("epoch (dashed: ASHA rungs)")
    ax.set_ylabel(METRIC)
    ax.set_xlim(0.5, sweep.epochs + 0.5)
    ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax.legend(fontsize="x-small", ncol=2)
    ax.set_title("accuracy per epoch, all trials (dotted: stopped early)")
    return fig


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _trial_id_from_path(path: str | None) -> str:
    """The trial id in a Tune trial folder name, "train_trial_<id>_<n>_<params>_<date>"
    (ids: "e3a9a23d" from a searcher, "5ef35_00000" from random search)."""
    import re

    name = (path or "").rstrip("/").rsplit("/", 1)[-1]
    m = re.match(r"^train_trial_([0-9a-f]+(?:_\d{5})?)_\d+_", name)
    return m.group(1) if m else name
