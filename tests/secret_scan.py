"""Where, if anywhere, secret values ended up: a job's output, log folders, MLflow runs (params,
tags, every artifact) and a prepared data set (dataset.json and every shard's bytes, the
Parquet key-value metadata included). Used by the tests that run a whole job."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def _hits(data: bytes, secrets: list[bytes]) -> bool:
    return any(s in data for s in secrets)


def _scan_dir(root: Path, secrets: list[bytes]) -> tuple[list[str], int]:
    found, files = [], 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if not path.is_file() or path.is_symlink():  # sockets, fifos, links out
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            files += 1
            if _hits(data, secrets):
                found.append(str(path))
    return found, files


def find_secrets(secrets: Iterable[str], *, texts: Mapping[str, str] = {},
                 dirs: Iterable[str | os.PathLike[str]] = (), tracking_uri: str | None = None,
                 run_ids: Iterable[str] = (), datasets: Iterable[str] = ()) -> dict:
    """``{"found": [where...], "checked": {what: count}}``: every place a secret was found
    (empty when none) and how much was looked at, so a test can assert the scan saw
    something. ``datasets`` are prepared data sets (local or s3:// roots; S3 is read with
    this process's AWS settings)."""
    needles = [s.encode() for s in secrets if s]
    assert needles, "nothing to look for"
    found: list[str] = []
    checked = {"texts": 0, "files": 0, "params": 0, "tags": 0, "artifacts": 0, "objects": 0}
    for name, text in texts.items():
        checked["texts"] += 1
        if _hits(text.encode(), needles):
            found.append(f"text {name}")
    for root in dirs:
        hits, n = _scan_dir(Path(root), needles)
        found += hits
        checked["files"] += n
    if run_ids:
        import mlflow
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for run_id in run_ids:
            run = client.get_run(run_id)
            for kind, items in (("params", run.data.params), ("tags", run.data.tags)):
                for key, value in items.items():
                    checked[kind] += 1
                    if _hits(f"{key}={value}".encode(), needles):
                        found.append(f"run {run_id} {kind[:-1]} {key}")
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=tmp,
                                                            tracking_uri=tracking_uri)
                hits, n = _scan_dir(Path(local), needles)
                found += [f"run {run_id} artifact {h}" for h in hits]
                checked["artifacts"] += n
    for root in datasets:
        import pyarrow.fs as pafs

        from wsdan import storage

        fs, base = storage.filesystem_and_path(root)
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            with fs.open_input_stream(info.path) as f:
                data = f.read()
            checked["objects"] += 1
            if _hits(data, needles):
                found.append(f"data set object {info.path}")
    return {"found": found, "checked": checked}
