"""Evaluation counts: accuracy of the raw, crop and fused logits, and localisation.

Counts (not per-batch averages) are accumulated in one float64 tensor, so a distributed
evaluation sums them over ranks with a single ``all_reduce`` and then divides: the result
equals one process that saw every image.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from wsdan.inference import InferenceOutput, attention_peaks, box_iou, points_in_boxes

_FIELDS = (
    "n",
    "raw_top1", "crop_top1", "fused_top1",
    "raw_top5", "crop_top5", "fused_top5",
    "n_obj", "box_iou_sum", "peak_in_object",
    "n_part", "peak_in_part",
)


def _topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


class EvalCounts:
    """Running sums for evaluation; ``metrics()`` turns them into rates.

    With ``num_classes``, also the K×K confusion counts of the fused prediction (rows: true
    class, columns: predicted), summed over ranks in the same collective as the rest."""

    def __init__(self, device: torch.device | str = "cpu", *,
                 num_classes: int | None = None) -> None:
        self.counts = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)
        self.num_classes = num_classes
        self._confusion = (torch.zeros(num_classes * num_classes, dtype=torch.float64,
                                       device=device) if num_classes else None)

    def update(
        self,
        out: InferenceOutput,
        labels: Tensor,
        object_boxes: Tensor | None = None,
        part_boxes: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        """Add one batch. Boxes: B×4 float (x0, y0, x1, y1) in *input* pixels; rows with
        NaN (no box known) are left out of the localisation counts."""
        vals = [
            labels.numel(),
            _topk_correct(out.logits_raw, labels, 1),
            _topk_correct(out.logits_crop, labels, 1),
            _topk_correct(out.logits, labels, 1),
            _topk_correct(out.logits_raw, labels, 5),
            _topk_correct(out.logits_crop, labels, 5),
            _topk_correct(out.logits, labels, 5),
        ]
        zero = torch.zeros((), device=labels.device)
        obj = [zero, zero, zero]
        part = [zero, zero]
        if object_boxes is not None or part_boxes is not None:
            if image_size is None:
                raise ValueError("image_size is needed to locate attention peaks")
            peaks = attention_peaks(out.attention_mean, image_size)
        if object_boxes is not None:
            ok = ~torch.isnan(object_boxes).any(dim=1)
            obj = [
                ok.sum(),
                torch.where(ok, box_iou(out.boxes, object_boxes.nan_to_num()), 0.0).sum(),
                (points_in_boxes(peaks, object_boxes.nan_to_num()) & ok).sum(),
            ]
        if part_boxes is not None:
            ok = ~torch.isnan(part_boxes).any(dim=1)
            part = [ok.sum(), (points_in_boxes(peaks, part_boxes.nan_to_num()) & ok).sum()]
        stacked = torch.stack([torch.as_tensor(v, device=labels.device).to(torch.float64)
                               for v in vals + obj + part])
        self.counts += stacked.to(self.counts.device)
        if self._confusion is not None:
            k = self.num_classes
            idx = labels.to(self._confusion.device) * k + out.logits.argmax(1).to(
                self._confusion.device)
            self._confusion += torch.bincount(idx, minlength=k * k).to(torch.float64)

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (no-op without a process group): one collective."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._confusion is None:
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
            return
        buf = torch.cat([self.counts, self._confusion])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.counts, self._confusion = buf[: len(_FIELDS)], buf[len(_FIELDS):]

    def confusion(self) -> Tensor:
        """K×K long counts on the CPU (needs ``num_classes``)."""
        if self._confusion is None:
            raise ValueError("EvalCounts was made without num_classes: no confusion counts")
        k = self.num_classes
        return self._confusion.round().long().cpu().view(k, k)

    def metrics(self) -> dict[str, float]:
        c = dict(zip(_FIELDS, self.counts.tolist()))  # host sync, once per evaluation
        n = max(c["n"], 1.0)
        out = {k: c[k] / n for k in _FIELDS[1:7]}
        out["n"] = c["n"]
        if c["n_obj"] > 0:
            out["box_iou"] = c["box_iou_sum"] / c["n_obj"]
            out["attention_hit_rate"] = c["peak_in_object"] / c["n_obj"]
        if c["n_part"] > 0:
            out["part_hit_rate"] = c["peak_in_part"] / c["n_part"]
        return out
