"""Ray Tune sweeps end to end on the real services (slow): Ray, the MLflow server, S3.

The data set is three colour classes (noisy red / green / blue images in class folders,
prepared into the SeaweedFS bucket), which a small random-init backbone learns within an
epoch at a good learning rate and not at all at a tiny one: trials then differ clearly,
and ASHA has something to stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import prepare_data
from tuning import sweep as sweep_job

pytestmark = pytest.mark.slow

BUCKET = "wsdan-sweeps"
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
TINY = {
    "model.backbone": "resnet18_layer3", "model.num_classes": 3, "model.weights": None,
    "optim.batch_size": 8, "optim.base_batch_size": 8, "optim.warmup_epochs": 0.0,
    "optim.head_lr_mult": 0.1, "optim.epochs": 3, "data.image_size": 40,
    "data.resize_size": 48,
}
# Seeded TPE (seed 5) draws lr 0.05, 1e-5, 1e-5, 0.05 for the four trials (asserted below):
# run one at a time, the first sets the bar and ASHA stops a 1e-5 trial at a rung.
SPACE = {
    "optim.lr": {"choice": [1.0e-5, 0.05]},
    "model.num_attentions": {"choice": [2, 4]},
    "optim.center_beta": {"loguniform": [0.01, 0.5]},
    "augment.crop_theta": {"center": {"uniform": [0.4, 0.6]},
                           "half_width": {"uniform": [0.0, 0.1]}},
}


@pytest.fixture(scope="module")
def colours(s3_server, tmp_path_factory):
    """3 colour classes × (32 train + 8 val) images, 48 px, in s3://wsdan-sweeps/data."""
    from PIL import Image

    s3_server.ensure_bucket(BUCKET)
    src = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (src / name).mkdir()
        for i in range(40):
            arr = np.clip(np.array(rgb) + rng.normal(0, 30, (48, 48, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(src / name / f"{name}_{i:02d}.jpg")
    saved = dict(os.environ)
    os.environ.update(s3_server.aws_env())
    try:
        prepare_data.main(prepare_data.get_args_parser().parse_args(
            ["--format", "folder", "--src", str(src), "--dest", f"s3://{BUCKET}/data",
             "--val-fraction", "0.2", "--no-progress"]))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return f"s3://{BUCKET}/data"


def _sweep_file(tmp_path: Path, data: str, **extra) -> Path:
    d = {"base": str(Path("jobs/configs/synthetic_cpu.yaml").resolve()),
         "overrides": {**TINY, "data.source": data}, "trials": 4, "seed": 5,
         "resources": {"num_workers": 1, "cpus_per_worker": 1, "data_cpus": 1,
                       "max_concurrent": 1},
         "scheduler": {"grace_period": 1, "reduction_factor": 2}, "space": SPACE, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _args(*argv: str):
    return sweep_job.get_args_parser().parse_args(list(argv))


def _children(client, parent_run_id: str):
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_small_sweep_stops_early_logs_children_and_registers(
        colours, ray_cluster, s3_env, mlflow_env, tmp_path):
    import mlflow
    import pandas as pd
    import ray
    from mlflow import MlflowClient

    path = _sweep_file(tmp_path, colours)
    out = sweep_job.main(_args("--config", str(path), "--name", "sweep-a",
                               "--storage-path", f"s3://{BUCKET}/sweeps",
                               "--register-as", "wsdan-sweep-test"))
    assert out["trials"] == 4
    assert out["trials_stopped_early"] >= 1, out
    assert out["trials_failed"] == 0, out
    assert out["epochs_run"] < 4 * 3
    client = MlflowClient()
    children = _children(client, out["parent_run_id"])
    assert len(children) == 4
    by_trial = {c.data.tags["wsdan.trial_id"]: c for c in children}
    assert set(by_trial) == set(out["statuses"])
    lrs = set()
    for trial_id, child in by_trial.items():
        assert child.info.status == out["statuses"][trial_id]
        assert child.info.status in ("FINISHED", "KILLED")
        history = client.get_metric_history(child.info.run_id, "val_fused_top1")
        epochs = [m.step for m in history]
        assert epochs == list(range(1, len(epochs) + 1))
        assert (len(epochs) == 3) == (child.info.status == "FINISHED")
        # The trial's parameters, searched and resolved.
        p = child.data.params
        lrs.add(float(p["optim.lr"]))
        assert p["search.optim.lr"] == p["optim.lr"]
        c, h = float(p["search.augment.crop_theta.center"]), float(
            p["search.augment.crop_theta.half_width"])
        assert float(p["augment.crop_theta_low"]) == pytest.approx(c - h)
        assert float(p["augment.crop_theta_high"]) == pytest.approx(c + h)
    assert lrs == {1e-5, 0.05}  # the test relies on both being drawn
    # The results table equals the child runs' metrics.
    parent = out["parent_run_id"]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent,
                                                            artifact_path="results.csv"))
    assert len(table) == 4
    for row in table.to_dict("records"):
        child = by_trial[row["trial_id"]]
        history = [m.value for m in client.get_metric_history(child.info.run_id,
                                                              "val_fused_top1")]
        assert row["final_val_fused_top1"] == pytest.approx(history[-1], abs=1e-12)
        assert row["best_val_fused_top1"] == pytest.approx(max(history), abs=1e-12)
        assert row["epochs"] == len(history)
        assert bool(row["stopped_early"]) == (child.info.status == "KILLED")
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"results.csv", "results.md", "accuracy_vs_params.png", "accuracy_per_epoch.png",
            "sweep.yaml", "search_space.json", "best_config.yaml"} <= names
    assert client.get_run(parent).info.status == "FINISHED"
    # The best trial's model is registered, and predicts.
    assert out["registered_version"] == 1 and out["champion"] is True
    assert out["best_val_fused_top1"] == pytest.approx(table["best_val_fused_top1"].max())
    # Its model card: the data set, the sweep and trial, the code's commit; the parent run
    # lists the data it was trained on.
    mv = client.get_model_version("wsdan-sweep-test", "1")
    assert mv.tags["wsdan.sweep"] == "sweep-a" and mv.tags["wsdan.best_trial"] == out["best_trial"]
    assert mv.tags["data.digest"] in mv.description and mv.tags["git.commit"] in mv.description
    assert float(mv.tags["val_fused_top1"]) == pytest.approx(out["best_val_fused_top1"])
    inputs = client.get_run(parent).inputs.dataset_inputs
    assert {d.dataset.digest for d in inputs} == {mv.tags["data.digest"]}
    assert len(inputs) == 2  # train and val
    model = mlflow.pyfunc.load_model("models:/wsdan-sweep-test@champion")
    from io import BytesIO

    from PIL import Image

    def png(rgb):
        buf = BytesIO()
        Image.new("RGB", (48, 48), rgb).save(buf, format="PNG")
        return buf.getvalue()

    pred = model.predict(pd.DataFrame({"image": [png(c) for c in COLOURS.values()]}))
    assert len(pred) == 3
    if out["best_val_fused_top1"] == 1.0:
        assert list(pred["class_id"]) == [2, 1, 0]  # classes sorted: blue, green, red
    # Nothing leaked: every CPU is free again once the trials' actors have gone.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"):
            break
        time.sleep(1)
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")
    from ray.util import placement_group_table

    live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []


@pytest.mark.parametrize("space, match", [
    ({"optim.lr": {"uniform": [0.1, 0.1]}}, r"space\.optim\.lr: uniform range .* is empty"),
    ({"optim.lr": {"loguniform": [0.1, 0.01]}}, r"space\.optim\.lr: loguniform low 0\.1 > high"),
    ({"optim.learning_rate": {"choice": [0.1]}}, r"space\.optim\.learning_rate: unknown config"),
    ({"model.num_attentions": {"choice": [4, 0]}},
     r"space\.model\.num_attentions: value 0 is rejected"),
    ({"augment.crop_theta": {"center": {"uniform": [0.3, 0.9]},
                             "half_width": {"uniform": [0, 0.2]}}},
     r"space\.augment\.crop_theta: center 0\.9 ± half_width 0\.2"),
    ({"augment.drop_theta_low": {"uniform": [0.1, 0.3]}},
     r"space\.augment\.drop_theta_low: search the range as augment\.drop_theta"),
])
def test_bad_sweep_configs_exit_2_naming_the_key(space, match, tmp_path):
    path = _sweep_file(tmp_path, "s3://unused/data", space=space)
    done = subprocess.run([sys.executable, "-m", "tuning.sweep", "--config", str(path),
                           "--storage-path", str(tmp_path / "sweeps")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: ")
    import re

    assert re.search(match, done.stderr), done.stderr
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_zero_trials_is_an_error(tmp_path):
    from tuning.space import load_sweep
    from wsdan.config import ConfigError

    with pytest.raises(ConfigError, match=r"trials: must be an integer >= 1, got 0"):
        load_sweep(_sweep_file(tmp_path, "s3://unused/data", trials=0))


def _experiment_states(s3_server, prefix: str) -> list[dict]:
    client = s3_server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])
            if o["Key"].rsplit("/", 1)[-1].startswith("experiment_state")]
    return [json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys]


def _terminated_trials(state: dict) -> set[str]:
    done = set()
    for trial_json, _ in state.get("trial_data", []):
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            done.add(trial.get("trial_id"))
    return done


@pytest.mark.faults
def test_resume_after_the_driver_dies(colours, ray_cluster, s3_env, mlflow_env, s3_server,
                                      tmp_path):
    """The sweep driver is SIGKILLed once the first trial has finished; --resume finishes
    the sweep without rerunning that trial."""
    from mlflow import MlflowClient

    path = _sweep_file(tmp_path, colours, trials=3,
                       overrides={**TINY, "data.source": colours, "optim.epochs": 2},
                       resources={"num_workers": 1, "data_cpus": 1, "max_concurrent": 2})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs_address"]}
    argv = [sys.executable, "-m", "tuning.sweep", "--storage-path", f"s3://{BUCKET}/sweeps",
            "--sync-period", "2"]
    log = tmp_path / "driver.log"  # a file, not a pipe nobody reads while it runs
    with open(log, "w") as sink:
        proc = subprocess.Popen([*argv, "--config", str(path), "--name", "sweep-resume"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    first: set[str] = set()
    deadline = time.monotonic() + 400
    while not first and time.monotonic() < deadline and proc.poll() is None:
        for state in _experiment_states(s3_server, "sweeps/sweep-resume/"):
            first |= _terminated_trials(state)
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    out = log.read_text()
    assert first, out[-3000:]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    # What the person who started it saw: the sweep's own lines (a line per trial epoch, a
    # line per ended trial), not Tune's status tables (those need --verbose).
    lines = out.splitlines()
    assert any(ln.startswith("[wsdan] trial ") and " epoch 1/2 | val fused top-1 " in ln
               for ln in lines), out[-3000:]
    assert any(ln.startswith(tuple(f"[wsdan] trial {t} " for t in first)) and "trials ended" in ln
               for ln in lines), out[-3000:]
    assert "Trial status" not in out, out[-3000:]

    summary_path = tmp_path / "summary.json"
    done = subprocess.run([*argv, "--resume", "sweep-resume", "--summary-json",
                           str(summary_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["trials"] == 3 and summary["trials_failed"] == 0
    assert first <= set(summary["statuses"])
    # The finished trial was not rerun: its child run has each epoch once, and it was
    # closed before the driver died.
    client = MlflowClient()
    children = {c.data.tags["wsdan.trial_id"]: c
                for c in _children(client, summary["parent_run_id"])}
    assert len(children) == 3
    for trial_id in first:
        steps = [m.step for m in client.get_metric_history(children[trial_id].info.run_id,
                                                            "val_fused_top1")]
        assert steps == sorted(set(steps)), steps
        assert children[trial_id].info.status in ("FINISHED", "KILLED")
    assert client.get_run(summary["parent_run_id"]).data.tags.get("wsdan.resumed") == "true"


def test_sweep_submitted_with_ray_job_submit(colours, ray_head_node, job_runtime_env,
                                             s3_server, tmp_path):
    """A sweep as a `ray job submit` job on a `ray start --head` cluster on loopback (its
    own temp dir and ports): the job SUCCEEDS and the sweep's summary is in its logs. The
    node knows nothing of S3 or MLflow: the job's runtime_env brings the endpoint, a
    reference to the keys and the tracking URI; no key appears anywhere the job left
    something. One of its two trials fails (its weights file does not exist): that trial is
    FAILED, with the error, in the table and in its child run, and the sweep goes on."""
    import re

    import pandas as pd

    from wsdan.services.ray_head import ray_env

    # Small: what is tested here is the submission (runtime_env, logs, no secrets) and a
    # failing trial; the search itself is tested above. Two one-epoch trials: seeded TPE
    # (seed 0) draws the missing weights file first, then no weights.
    missing = f"s3://{BUCKET}/no-such-weights.pt"
    path = _sweep_file(tmp_path, colours, trials=2, seed=0,
                       overrides={**TINY, "data.source": colours, "optim.epochs": 1},
                       space={"model.weights": {"choice": [None, missing]}})
    ray_bin = str(Path(sys.executable).with_name("ray"))
    address = ["--address", ray_head_node.config.dashboard_url]
    # The job names its cluster: the test session runs a second Ray on this machine, and
    # Train's placement-group cleaner (State API) refuses to guess between two.
    env_vars = {"env_vars": {**job_runtime_env["env_vars"],
                             "RAY_ADDRESS": ray_head_node.config.address}}
    submit = [ray_bin, "job", "submit", *address, "--working-dir", ".", "--no-wait",
              "--runtime-env-json", json.dumps(env_vars), "--",
              "python", "-m", "tuning.sweep", "--config", str(path), "--name",
              "sweep-submitted", "--storage-path", f"s3://{BUCKET}/sweeps", "--max-failures",
              "0"]
    done = subprocess.run(submit, env=ray_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    job_id = re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)
    # What a user does next: follow the logs until the job ends, then ask its status.
    logs = subprocess.run([ray_bin, "job", "logs", *address, "--follow", job_id],
                          env=ray_env(), capture_output=True, text=True, timeout=840).stdout
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(ray_head_node.config.dashboard_url).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    summary = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"sweep"')][-1])
    assert summary["trials"] == 2 and summary["trials_failed"] == 1
    assert sorted(summary["statuses"].values()) == ["FAILED", "FINISHED"]
    assert "| trial_id |" in logs  # the results table is printed for the user
    assert any(ln.startswith("[wsdan] trial ") and " failed: " in ln for ln in logs.splitlines())
    # The sweep's own output, not MLflow's: no run links written to stdout when the parent
    # run ends, no artifact download bars (wsdan.cluster.connect, quiet).
    assert "View run" not in logs and "Downloading artifacts" not in logs, logs[-4000:]
    # No secret anywhere the job left something: its output, the job's runtime_env as the
    # cluster holds it, the head's folder (Ray's session logs), every param, tag and
    # artifact of the sweep's runs, the data set's objects (tests/secret_scan.py).
    from mlflow import MlflowClient

    from tests.helpers import aws_environ
    from tests.secret_scan import find_secrets

    uri = job_runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    runs = [summary["parent_run_id"], *(c.info.run_id for c in _children(
        MlflowClient(uri), summary["parent_run_id"]))]
    info = JobSubmissionClient(ray_head_node.config.dashboard_url).get_job_info(job_id)
    with aws_environ(s3_server):
        scan = find_secrets([s3_server.config.secret_key], tracking_uri=uri, run_ids=runs,
                            texts={"submit": done.stdout + done.stderr, "logs": logs,
                                   "runtime_env": json.dumps(info.runtime_env)},
                            dirs=[ray_head_node.config.temp_dir], datasets=[colours])
    assert scan["found"] == [], scan
    assert len(runs) == 3 and min(scan["checked"].values()) > 0, scan["checked"]
    # The failed trial, in its child run and in the results table.
    import mlflow

    client = MlflowClient(uri)
    failed = [c for c in _children(client, summary["parent_run_id"])
              if c.info.status == "FAILED"]
    assert len(failed) == 1 and "no-such-weights.pt" in failed[0].data.tags["wsdan.error"]
    assert failed[0].data.params["model.weights"] == missing
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=summary["parent_run_id"], artifact_path="results.csv", tracking_uri=uri,
        dst_path=str(tmp_path / "results")))
    row = table[table["status"] == "FAILED"].iloc[0]
    assert "no-such-weights.pt" in row["error"] and row["epochs"] == 0
