"""Feature-centre loss and update: mean of duplicates, and distributed == single process."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from wsdan.centers import center_loss, update_centers_


def slow_update(centers, feats, labels, beta):
    """Independent reference: per class, average the deltas of its samples."""
    new = centers.clone()
    for k in set(labels.tolist()):
        rows = [i for i, y in enumerate(labels.tolist()) if y == k]
        c = centers[k]
        target = c / c.norm() if c.norm() > 0 else c
        delta = sum(feats[i] - target for i in rows) / len(rows)
        new[k] = c + beta * delta
    return new


def test_center_loss_value():
    centers = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # targets: (0.6, 0.8), (0.6, 0.8), (0, 0)
    expected = ((0.4**2 + 0.8**2) + (0.6**2 + 0.2**2) + 2.0) / 3
    assert abs(center_loss(feats, centers, labels).item() - expected) < 1e-6


def test_update_averages_duplicates_and_leaves_absent_classes():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 6, generator=gen)
    centers[3] = 0.0
    feats = F.normalize(torch.randn(7, 6, generator=gen), dim=1)
    labels = torch.tensor([0, 0, 0, 3, 3, 1, 0])
    ref = slow_update(centers, feats, labels, 0.05)
    before = centers.clone()
    update_centers_(centers, feats, labels, 0.05)
    torch.testing.assert_close(centers, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(centers[[2, 4]], before[[2, 4]])
    # Duplicating the whole batch changes nothing (mean, not sum, not last-write-wins).
    c2 = before.clone()
    update_centers_(c2, torch.cat([feats, feats]), torch.cat([labels, labels]), 0.05)
    torch.testing.assert_close(c2, centers, atol=1e-6, rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, feats, labels, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        centers = torch.zeros(6, 8)
        per = feats.shape[1] // world
        for s in range(steps):
            sl = slice(rank * per, (rank + 1) * per)
            update_centers_(centers, feats[s, sl], labels[s, sl], 0.05)
        out[rank] = centers
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process():
    gen = torch.Generator().manual_seed(1)
    steps, batch = 4, 10  # global batch 10 → 5 per rank
    feats = F.normalize(torch.randn(steps, batch, 8, generator=gen), dim=2)
    labels = torch.randint(0, 6, (steps, batch), generator=gen)
    labels[0, :3] = 2  # duplicates that straddle the two ranks
    labels[0, 5:7] = 2
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(
        _worker, args=(2, _free_port(), feats, labels, steps, out), nprocs=2, join=True, start_method="spawn"
    )
    single = torch.zeros(6, 8)
    for s in range(steps):
        update_centers_(single, feats[s], labels[s], 0.05)
    assert torch.equal(out[0], out[1]), "ranks must hold bitwise-identical centres"
    torch.testing.assert_close(out[0], single, atol=1e-6, rtol=0)
    assert out[0].abs().sum() > 0
