"""A disk that fills up while shards or checkpoints are written.

Small tmpfs mounts in a private mount namespace (``unshare -m``: needs root or user
namespaces; skipped otherwise) play the full disk. A child process (this module run as a
script) works on them and copies what they hold afterwards to the test's own folder, where
the assertions read it:

* ``wsdan data prepare`` to a device too small for the data set is refused before anything
  is written (one ``error:`` line, exit 2); the data set prepared there before stays whole;
* a device that fills up part-way (another writer takes the space after the second shard):
  one line naming the shard being written, exit 2; the shards written before are whole,
  readable Parquet, no temporary or partial file is left and no manifest claims the set;
* a checkpoint (``save_backbone_weights``, Ray Train's per-epoch ``save_checkpoint``) that
  does not fit: ``StorageFullError`` naming the file; the previous checkpoint still loads
  with ``torch.load(weights_only=True)``; no temporary file is left;
* Ray Train's checkpoint snapshot, which it rewrites in place and a full local disk left
  empty (Ray Train then refused to resume): rebuilt by the job from the whole checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARD_MB = "0.02"  # ~20 KB shards: a few per split, so a device can fill between two


def _unshare_or_skip() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs in a private namespace")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k wsdan-probe /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs root or "
                    f"user namespaces): {probe.stderr.strip()}")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_full_disk_names_the_path_and_keeps_what_was_written(tmp_path):
    _unshare_or_skip()
    import pyarrow.parquet as pq
    import torch

    from wsdan.data.shards import SCHEMA
    from wsdan.data.synthetic import SyntheticSpec, write_synthetic_dataset

    spec = SyntheticSpec(num_classes=3, image_size=64, seed=0)
    small, big = tmp_path / "small", tmp_path / "big"
    write_synthetic_dataset(small, spec=spec, n_train=12, n_val=3, n_test=3, progress=False)
    write_synthetic_dataset(big, spec=spec, n_train=60, n_val=6, n_test=6, progress=False)
    mnt, report = tmp_path / "mnt", tmp_path / "report"
    mnt.mkdir()
    report.mkdir()
    # a: 256 KiB (the small set fits, the big one does not); b and c: 1 MiB.
    script = (f"for d in a b c; do mkdir -p {mnt}/$d; done && "
              f"mount -t tmpfs -o size=256k wsdan-a {mnt}/a && "
              f"mount -t tmpfs -o size=1m wsdan-b {mnt}/b && "
              f"mount -t tmpfs -o size=1m wsdan-c {mnt}/c && "
              f"exec {sys.executable} -m tests.test_disk_full {mnt} {report} {small} {big}")
    child = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]
    results = json.loads((report / "results.json").read_text())

    # 1. The small set fits; the big one is refused before anything is written, the set
    #    there is untouched (manifest and shards, byte for byte).
    assert results["fits"]["rc"] == 0, results["fits"]
    refused = results["refused"]
    assert refused["rc"] == 2 and len(refused["stderr"].splitlines()) == 1, refused
    assert refused["stderr"].startswith(f"error: not enough space at {mnt}/a/data: the data "
                                        "set needs about "), refused
    assert "nothing was written" in refused["stderr"]
    before = _hashes(report / "a1")
    assert "data/dataset.json" in before and len(before) >= 4
    assert _hashes(report / "a2") == before

    # 2. Filled part-way: the error names the shard being written; the two written before
    #    are whole Parquet files; nothing partial or temporary, no manifest.
    filled = results["filled"]
    assert filled["rc"] == 2 and len(filled["stderr"].splitlines()) == 1, filled
    assert filled["stderr"].startswith(
        f"error: no space left on device writing {mnt}/b/data/train/part-00002.parquet ("), filled
    assert "dataset.json was not written" in filled["stderr"]
    files = sorted(str(p.relative_to(report / "b")) for p in (report / "b").rglob("*")
                   if p.is_file())
    assert files == ["data/train/part-00000.parquet", "data/train/part-00001.parquet"], files
    rows = 0
    for name in files:
        table = pq.read_table(report / "b" / name)
        assert table.schema.equals(SCHEMA) and table.num_rows > 0
        rows += table.num_rows
    assert rows < 60  # the rest of train was never written

    # 3. Checkpoints: the error names the file; the previous checkpoint loads as it was.
    for key, path in (("weights", f"{mnt}/c/weights.pt"),
                      ("ray_checkpoint", f"{mnt}/c/epoch2/state.pt")):
        err = results[key]
        assert err["type"] == "StorageFullError" and err["oserror"] and err["errno"] == 28, err
        assert err["filename"] == path, err
        assert err["message"].startswith(f"no space left on device writing {path} (2.0 MiB): "), err
    small_state = torch.load(report / "small.pt", weights_only=True)
    kept = torch.load(report / "c" / "weights.pt", weights_only=True)
    assert kept.keys() == small_state.keys()
    assert all(torch.equal(kept[k], small_state[k]) for k in kept)
    epoch1 = torch.load(report / "c" / "epoch1" / "state.pt", weights_only=True)
    assert epoch1["epoch"] == 1 and torch.equal(epoch1["model"]["weight"], small_state["weight"])
    left = sorted(str(p.relative_to(report / "c")) for p in (report / "c").rglob("*")
                  if p.is_file())
    assert left == ["epoch1/state.pt", "weights.pt"], left  # no temporary file, no partial one


def _fill(path: str) -> None:
    """Another writer takes every byte left on the device."""
    import errno

    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    with open(path, "ab", buffering=0) as f:  # and the last partial page
        try:
            while True:
                f.write(b"\0")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def _child(mnt: str, report: str, small: str, big: str) -> None:
    """Runs inside the namespace, on the tmpfs mounts; writes results.json and copies of
    the mounts' contents to ``report``."""
    import contextlib
    import io

    import torch

    from jobs import prepare_data
    from wsdan.cli import run_main
    from wsdan.data import shards
    from wsdan.local import save_backbone_weights
    from wsdan.raytrain import save_checkpoint

    results: dict = {}

    def prepare(key: str, src: str, dest: str) -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = run_main(prepare_data.main, prepare_data.get_args_parser(),
                          ["--format", "synthetic", "--src", src, "--dest", dest,
                           "--shard-mb", SHARD_MB, "--no-progress"])
        results[key] = {"rc": rc, "stderr": err.getvalue()}

    prepare("fits", small, f"{mnt}/a/data")
    shutil.copytree(f"{mnt}/a", f"{report}/a1")
    prepare("refused", big, f"{mnt}/a/data")
    shutil.copytree(f"{mnt}/a", f"{report}/a2")

    write = shards.write_bytes

    def write_then_fill(uri: str, data: bytes) -> None:
        write(uri, data)
        if uri.endswith("train/part-00001.parquet"):
            _fill(f"{mnt}/b/filler")

    shards.write_bytes = write_then_fill
    try:
        prepare("filled", big, f"{mnt}/b/data")
    finally:
        shards.write_bytes = write
    shutil.copytree(f"{mnt}/b/data", f"{report}/b/data")

    def error(fn) -> dict:
        try:
            fn()
        except Exception as e:
            return {"type": type(e).__name__, "message": str(e), "oserror": isinstance(e, OSError),
                    "errno": getattr(e, "errno", None), "filename": getattr(e, "filename", None)}
        return {"type": None}

    torch.manual_seed(0)
    small_model, big_model = torch.nn.Linear(16, 16), torch.nn.Linear(1024, 512)  # 2 MiB
    torch.save(small_model.state_dict(), f"{report}/small.pt")
    save_backbone_weights(small_model, f"{mnt}/c/weights.pt")
    results["weights"] = error(lambda: save_backbone_weights(big_model, f"{mnt}/c/weights.pt"))
    # Ray Train's per-epoch checkpoint: each epoch in a folder of its own.
    save_checkpoint(f"{mnt}/c/epoch1", {"model": small_model.state_dict(), "epoch": 1})
    results["ray_checkpoint"] = error(lambda: save_checkpoint(
        f"{mnt}/c/epoch2", {"model": big_model.state_dict(), "epoch": 2}))
    shutil.copytree(f"{mnt}/c", f"{report}/c")
    Path(report, "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _child(*sys.argv[1:5])


def test_an_emptied_ray_train_snapshot_is_rebuilt_from_the_whole_checkpoints(tmp_path):
    """Ray Train rewrites its checkpoint snapshot in place: on a local storage path that
    filled up it was left empty (0 bytes, seen with the tmpfs above and a real TorchTrainer)
    and Ray Train refused to resume. The job rebuilds it from the checkpoints that load."""
    import torch
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    from wsdan.launcher import RAY_SNAPSHOT, JobSpec, repair_snapshot, resume_epoch
    from wsdan.raytrain import save_checkpoint

    spec = JobSpec(name="job", storage_path=str(tmp_path / "runs"))
    job = tmp_path / "runs" / "job"
    for epoch, name in ((1, "checkpoint_2026-11-30_10-00-00.000001"),
                        (2, "checkpoint_2026-11-30_10-05-00.000001")):
        save_checkpoint(job / name, {"model": {"w": torch.full((4,), float(epoch))},
                                     "epoch": epoch, "metrics": {"epoch": epoch,
                                                                 "val_fused_top1": 0.5}})
    later = job / "checkpoint_2026-11-30_10-05-00.000001" / "state.pt"
    later.write_bytes(later.read_bytes()[:100])  # epoch 2's upload cut short by the full disk
    assert repair_snapshot(spec) is None  # no snapshot: a new job, nothing to repair
    (job / RAY_SNAPSHOT).write_bytes(b"")
    line = repair_snapshot(spec)
    assert line is not None and "rebuilt from 1 whole checkpoint(s) of 2, resuming from " \
        "epoch 1" in line, line
    assert (job / f"{RAY_SNAPSHOT}.broken").read_bytes() == b""
    state = _CheckpointManagerState.parse_obj(json.loads((job / RAY_SNAPSHOT).read_text()))
    assert state.latest_checkpoint_result.checkpoint_dir_name == \
        "checkpoint_2026-11-30_10-00-00.000001"
    assert [r.metrics["epoch"] for r in state.checkpoint_results] == [1]
    assert resume_epoch(spec) == 1 and repair_snapshot(spec) is None  # once, then readable
