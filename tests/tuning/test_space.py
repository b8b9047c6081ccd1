"""Sweep configs and search spaces: parsing, validation naming the key, trial overrides."""

from __future__ import annotations

import math

import pytest
import yaml

from tuning.report import TrialRow, compute_saved, table_csv, table_markdown
from tuning.space import SearchSpace, load_sweep, max_concurrent, parse_sweep
from wsdan.config import ConfigError, TrainConfig

BASE = "jobs/configs/synthetic_cpu.yaml"


def _sweep(**extra):
    d = {"base": BASE, "overrides": {"optim.epochs": 4}, "trials": 4,
         "space": {"optim.lr": {"loguniform": [0.001, 0.1]}}}
    d.update(extra)
    return parse_sweep(d)


def test_with_overrides_validates_like_the_command_line():
    cfg = TrainConfig()
    out = cfg.with_overrides({"model.num_attentions": 16, "optim.lr": 1})
    assert out.model.num_attentions == 16 and out.optim.lr == 1.0
    assert isinstance(out.optim.lr, float)
    assert cfg.model.num_attentions == 32  # frozen original untouched
    with pytest.raises(ConfigError, match=r"unknown config key optim\.learning_rate"):
        cfg.with_overrides({"optim.learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"model\.num_attentions: must be >= 1, got 0"):
        cfg.with_overrides({"model.num_attentions": 0})
    with pytest.raises(ConfigError, match=r"model\.num_attentions: expected int, got 4\.5"):
        cfg.with_overrides({"model.num_attentions": 4.5})
    with pytest.raises(ConfigError, match=r"optim is a section"):
        cfg.with_overrides({"optim": 3})
    with pytest.raises(ConfigError, match=r"seed is not a section"):
        cfg.with_overrides({"seed.x": 3})
    # Same result as the key=value path.
    from wsdan.config import apply_overrides, from_dict

    cli = from_dict(TrainConfig, apply_overrides(cfg.to_dict(), ["model.num_attentions=16",
                                                                 "optim.lr=1"]))
    assert cli == out


def test_the_shipped_sweep_config_parses():
    s = load_sweep("tuning/configs/synthetic_cpu.yaml")
    assert s.trials >= 8 and s.epochs == 3 and s.rungs() == [1, 2]
    assert {"model.num_attentions", "optim.center_beta", "optim.lr",
            "augment.crop_theta.center", "augment.crop_theta.half_width",
            "augment.drop_theta.center", "augment.drop_theta.half_width"} == set(s.space.domains)
    space = s.space.param_space()
    from ray import tune

    assert isinstance(space["optim.lr"], tune.search.sample.Float)


def test_threshold_ranges_are_centre_and_half_width_and_never_inverted():
    s = _sweep(space={"augment.drop_theta": {"center": {"uniform": [0.3, 0.5]},
                                             "half_width": {"uniform": [0.0, 0.2]}}})
    import random

    rng = random.Random(0)
    for _ in range(200):
        c, h = rng.uniform(0.3, 0.5), rng.uniform(0.0, 0.2)
        cfg = s.trial_config({"augment.drop_theta.center": c, "augment.drop_theta.half_width": h})
        assert cfg.augment.drop_theta_low == pytest.approx(c - h)
        assert cfg.augment.drop_theta_high == pytest.approx(c + h)
        assert 0 < cfg.augment.drop_theta_low <= cfg.augment.drop_theta_high < 1
    assert cfg.augment.crop_theta_low == TrainConfig.from_yaml(BASE).augment.crop_theta_low


@pytest.mark.parametrize("space, match", [
    ({"optim.lr": {"uniform": [0.1, 0.1]}}, r"space\.optim\.lr: uniform range \[0\.1, 0\.1\] is empty"),
    ({"optim.lr": {"uniform": [0.2, 0.1]}}, r"space\.optim\.lr: uniform low 0\.2 > high 0\.1"),
    ({"optim.lr": {"loguniform": [0, 0.1]}}, r"space\.optim\.lr: loguniform needs low > 0"),
    ({"optim.lr": {"uniform": [-0.1, 0.1]}}, r"space\.optim\.lr: value -0\.1 is rejected"),
    ({"optim.lr": {"normal": [0, 1]}}, r"space\.optim\.lr: expected one of"),
    ({"optim.lr": {"choice": []}}, r"space\.optim\.lr: choice needs a non-empty list"),
    ({"model.num_attentions": {"randint": [4, 4]}}, r"space\.model\.num_attentions: randint range"),
    ({"model.num_attentions": {"randint": [2.5, 8]}}, r"randint needs integer bounds"),
    ({"model.num_attentions": {"uniform": [4, 8]}},
     r"space\.model\.num_attentions: value 4\.0 is rejected .*expected int"),
    ({"model.backbone": {"choice": ["resnet18", "vgg99"]}},
     r"space\.model\.backbone: value 'vgg99' is rejected .*unknown backbone"),
    ({"optim.center_beta": {"choice": [0.05, 1.5]}},
     r"space\.optim\.center_beta: value 1\.5 is rejected .*\(0, 1\]"),
    ({"model.nope": {"choice": [1]}}, r"space\.model\.nope: unknown config key"),
    ({"augment.crop_theta": {"center": {"uniform": [0.3, 0.6]}}},
     r"space\.augment\.crop_theta: expected \{center: \.\.\., half_width: \.\.\.\}"),
    ({"augment.crop_theta": {"center": {"uniform": [0.05, 0.5]},
                             "half_width": {"uniform": [0.0, 0.1]}}},
     r"space\.augment\.crop_theta: center 0\.05 ± half_width 0\.1 gives \[-0\.05"),
    ({"augment.crop_theta": {"center": {"uniform": [0.3, 0.5]},
                             "half_width": {"uniform": [-0.1, 0.1]}}},
     r"space\.augment\.crop_theta\.half_width: must be >= 0"),
    ({"augment.crop_theta_high": {"uniform": [0.5, 0.7]}},
     r"search the range as augment\.crop_theta"),
    ({}, r"space: expected a non-empty mapping"),
])
def test_impossible_spaces_name_the_key(space, match):
    with pytest.raises(ConfigError, match=match):
        _sweep(space=space)


@pytest.mark.parametrize("extra, match", [
    ({"trials": 0}, r"trials: must be an integer >= 1, got 0"),
    ({"searcher": "grid"}, r"searcher: must be one of optuna, random"),
    ({"resources": {"num_workers": 0}}, r"resources\.num_workers: must be >= 1"),
    ({"resources": {"gpus": 1}}, r"resources\.gpus: unknown key"),
    ({"scheduler": {"grace_period": 0}}, r"scheduler\.grace_period: must be >= 1"),
    ({"scheduler": {"reduction_factor": 1}}, r"scheduler\.reduction_factor: must be >= 2"),
    ({"overrides": {"optim.epochs": 0}}, r"overrides: .*optim\.epochs: must be >= 1"),
    ({"base": "nowhere.yaml"}, r"base: training config 'nowhere\.yaml' not found"),
    ({"space_": {}}, r"space_: unknown sweep key"),
])
def test_bad_sweep_keys_are_named(extra, match):
    with pytest.raises(ConfigError, match=match):
        _sweep(**extra)


def test_cli_overrides_win_and_file_errors_name_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(__import__("pathlib").Path(BASE).resolve()),
                                    "overrides": {"optim.epochs": 4},
                                    "space": {"optim.lr": {"choice": [0.01, 0.02]}}}))
    s = load_sweep(path, ["optim.epochs=2", "model.num_attentions=4"])
    assert s.epochs == 2 and s.train.model.num_attentions == 4
    with pytest.raises(ConfigError, match=rf"{path}: overrides: .*unknown config key optim\.x"):
        load_sweep(path, ["optim.x=1"])


def test_concurrency_fits_the_cluster():
    s = _sweep(resources={"num_workers": 2, "cpus_per_worker": 1, "data_cpus": 1}, trials=8)
    assert max_concurrent(s, {"CPU": 4}) == 1  # 2 workers + 1 data CPU each
    assert max_concurrent(s, {"CPU": 9}) == 3
    assert max_concurrent(s, {"CPU": 100}) == 8  # never more than the trials
    with pytest.raises(ConfigError, match=r"resources: one trial needs 3 CPU .* has 2"):
        max_concurrent(s, {"CPU": 2})
    g = _sweep(resources={"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4,
                          "data_cpus": 2, "max_concurrent": 3}, trials=8)
    assert g.resources.per_trial() == {"CPU": 10.0, "GPU": 2.0}
    assert max_concurrent(g, {"CPU": 64, "GPU": 8}) == 3  # the limit asked for
    assert max_concurrent(g, {"CPU": 64, "GPU": 4}) == 2  # GPUs bound it
    with pytest.raises(ConfigError, match=r"one trial needs 2 GPU"):
        max_concurrent(g, {"CPU": 64})


def test_results_table_and_compute_saved():
    rows = [TrialRow("a", {"optim.lr": 0.01}, "FINISHED", 4, 0.8, 0.85, 3,
                     [(1, 0.5), (2, 0.7), (3, 0.85), (4, 0.8)], "/x/ckpt"),
            TrialRow("b", {"optim.lr": 0.001}, "KILLED", 1, 0.2, 0.2, 1, [(1, 0.2)]),
            TrialRow("c", {"optim.lr": 0.1}, "FAILED", 0, math.nan, math.nan, 0, [],
                     error="RuntimeError: boom | bad")]
    saved = compute_saved(rows, 4)
    assert saved == {"epochs_run": 5, "epochs_if_all_finished": 12,
                     "compute_saved_fraction": pytest.approx(7 / 12),
                     "trials_stopped_early": 1, "trials_failed": 1}
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert [r["trial_id"] for r in table] == ["a", "b", "c"]
    assert float(table[0]["best_val_fused_top1"]) == 0.85
    assert table[1]["stopped_early"] == "True" and table[2]["status"] == "FAILED"
    md = table_markdown(rows)
    assert md.count("\n") == 5 and "boom \\| bad" in md


def test_space_overrides_skip_unknown_params():
    base = TrainConfig.from_yaml(BASE)
    space = SearchSpace.parse({"optim.lr": {"choice": [0.01]}}, base)
    assert space.overrides({"optim.lr": 0.01, "other": 3}) == {"optim.lr": 0.01}


def test_trial_id_from_a_tune_trial_folder():
    from tuning.report import _trial_id_from_path

    assert _trial_id_from_path("s3b/sweeps/x/train_trial_e3a9a23d_1_optim.lr=0.01_2026") == \
        "e3a9a23d"
    assert _trial_id_from_path("/r/x/train_trial_5ef35_00000_0_a=1_2026-11-30") == "5ef35_00000"


def test_sweep_log_prints_one_line_per_epoch_and_per_ended_trial(tmp_path):
    """The sweep driver's own output (in place of Tune's tables): each reported epoch once
    with its accuracy and parameters, an epoch reported again after a restart marked, each
    ended trial with its outcome and the count of ended trials and the best so far."""
    import io
    from types import SimpleNamespace

    from tuning.trial import SweepLog, TrialSetup

    sweep = SimpleNamespace(epochs=3, trials=2)
    setup = TrialSetup(sweep_name="s", sweep=sweep, jobs_storage=str(tmp_path),
                       tracking_uri="file:///x", experiment_id="0", parent_run_id="p")
    out = io.StringIO()
    log = SweepLog(setup, out=out)
    a = SimpleNamespace(trial_id="a1", config={"optim.lr": 0.0123456, "model.attention_maps": 8},
                        last_result=None)
    b = SimpleNamespace(trial_id="b2", config={"optim.lr": 1e-5, "model.attention_maps": 4},
                        last_result=None, error_file=None,
                        get_pickled_error=lambda: None,
                        get_error=lambda: RuntimeError("boom\nlast line of it"))
    log.on_trial_result(0, [], a, {"epoch": 1, "val_fused_top1": 0.5})
    log.on_trial_result(0, [], a, {"epoch": 2, "val_fused_top1": 0.75})
    log.on_trial_result(0, [], a, {"epoch": 2, "val_fused_top1": 0.70})  # after a restart
    log.on_trial_result(0, [], b, {"training_iteration": 1})  # no epoch: not printed
    a.last_result = {"epoch": 2}
    log.on_trial_complete(0, [], a)
    log.on_trial_error(0, [], b)
    assert out.getvalue().splitlines() == [
        "[wsdan] trial a1 epoch 1/3 | val fused top-1 0.5000 | optim.lr=0.01235 "
        "model.attention_maps=8",
        "[wsdan] trial a1 epoch 2/3 | val fused top-1 0.7500 | optim.lr=0.01235 "
        "model.attention_maps=8",
        "[wsdan] trial a1 epoch 2/3 (again, after a restart) | val fused top-1 0.7000 | "
        "optim.lr=0.01235 model.attention_maps=8",
        "[wsdan] trial a1 stopped early by the scheduler after epoch 2 "
        "[1/2 trials ended; best so far 0.7500 (trial a1)]",
        "[wsdan] trial b2 failed: last line of it (the whole error is in its MLflow run) "
        "[2/2 trials ended; best so far 0.7500 (trial a1)]",
    ]
