"""Feature centres and the attention regularisation loss (docs/algorithm.md §2).

The centres are a K×(M·C) buffer of the model (``WSDAN.feature_centers``), so ``state_dict``
carries them into checkpoints. They change only through :func:`update_centers_`, which is
the same in one process and under ``torch.distributed``: every rank contributes per-class
delta sums and counts, one ``all_reduce`` adds them up, and every rank applies the same
update. No rank keeps private centres.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def normalized_targets(centers: Tensor, labels: Tensor) -> Tensor:
    """ĉ_i = normalize(c[y_i]) (L2; a zero row stays zero). Shape B×(M·C)."""
    return F.normalize(centers[labels], p=2.0, dim=1)


def center_loss(features: Tensor, centers: Tensor, labels: Tensor) -> Tensor:
    """L_A = (1/B) Σ_i ||P_i − ĉ_i||² with the pre-update centres (docs/algorithm.md §2).

    Args:
        features: P, B×(M·C) part features (with grad).
        centers: K×(M·C) feature centres (no grad).
        labels: B class indices.
    """
    target = normalized_targets(centers, labels).detach()
    return (features - target).pow(2).sum(dim=1).mean()


def center_delta_sums(
    features: Tensor, centers: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-class sums of (P_i − ĉ_i) and per-class counts for one (local) batch.

    Returns:
        sums K×(M·C) and counts K (float, same dtype as the centres).
    """
    with torch.no_grad():
        delta = features.detach().to(centers.dtype) - normalized_targets(centers, labels)
        sums = torch.zeros_like(centers).index_add_(0, labels, delta)
        counts = torch.zeros(centers.shape[0], dtype=centers.dtype, device=centers.device)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=centers.dtype))
    return sums, counts


def update_centers_(
    centers: Tensor,
    features: Tensor,
    labels: Tensor,
    beta: float,
    *,
    group: dist.ProcessGroup | None = None,
    sync: bool = True,
) -> None:
    """In place: c[k] += β · mean_{i: y_i = k} (P_i − ĉ_i) over the *global* batch.

    Duplicate labels are averaged (not last-write-wins, not summed), so the step does not
    grow with the batch size or the number of workers. When ``torch.distributed`` is
    initialised, sums and counts of all ranks are added with a single ``all_reduce`` (the
    counts ride along as one extra column), so every rank applies the identical update.

    Args:
        centers: K×(M·C) buffer, updated in place.
        features: P, B×(M·C) local part features (detached here).
        labels: B local class indices.
        beta: centre learning rate β (docs/algorithm.md §2: 0.05).
        group: process group; default the world group when distributed is initialised.
        sync: False skips the collective (ranks then diverge: for measurements only).
    """
    sums, counts = center_delta_sums(features, centers, labels)
    if sync and dist.is_available() and dist.is_initialized():
        # One collective per step: counts appended as the last column of the sums.
        packed = torch.cat([sums, counts[:, None]], dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        sums, counts = packed[:, :-1], packed[:, -1]
    with torch.no_grad():
        # Classes absent from the global batch have sums = 0 and stay unchanged.
        centers.add_(sums / counts.clamp(min=1.0)[:, None], alpha=beta)
