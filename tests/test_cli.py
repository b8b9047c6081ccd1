"""The ``wsdan`` command line."""

import json

import pytest

from wsdan.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_data_generate_writes_a_data_set(tmp_path, capsys):
    dest = tmp_path / "gen"
    main(["data", "generate", "--dest", str(dest), "--num-classes", "3", "--image-size", "48",
          "--n-train", "6", "--n-val", "3", "--n-test", "3"])
    manifest = json.loads((dest / "dataset.json").read_text())
    assert manifest["counts"] == {"train": 6, "val": 3, "test": 3}
    assert len(list((dest / "images").rglob("*.jpg"))) == 12


def test_subcommand_help_is_the_jobs_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    assert "wsdan pretrain" in capsys.readouterr().out


def _walk(parser, name):
    """(command, option) pairs of a parser and its sub-parsers that have no help text."""
    import argparse

    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                missing += _walk(sub, f"{name} {sub_name}")
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append((name, "/".join(action.option_strings) or action.dest))
    return missing


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse
    import importlib

    missing, plain = [], []
    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(module).get_args_parser()
        missing += _walk(parser, name)
        if not issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
            plain.append(name)
    assert not missing, f"options without help: {missing}"
    assert not plain, f"commands whose --help does not show defaults: {plain}"


def test_readme_commands_exist():
    """Every `wsdan X` and `python -m M` the README and BENCHMARKS show is a real command or
    module (the CLI's table is what `wsdan --help` lists)."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + (root / "BENCHMARKS.md").read_text()
    modules = set(re.findall(r"python -m ((?:jobs|tuning|wsdan)\.[a-z_]+)", text))
    assert {m for m, _ in COMMANDS.values()} >= {m for m in modules if m.startswith("jobs.")}
    for m in modules:
        assert importlib.util.find_spec(m) is not None, m
    first_words = {n.split()[0] for n in COMMANDS}
    shown = set(re.findall(r"(?:`|bin/|^\s*)wsdan ([a-z][a-z-]*)", text, flags=re.MULTILINE))
    assert shown, "the README shows no wsdan command?"
    assert shown <= first_words | {"data"}, shown - first_words


def test_data_help_lists_its_subcommands(capsys):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "prepare" in out and "generate" in out


def test_serve_builds_a_loopback_mlflow_command(capsys, monkeypatch):
    from wsdan.config import ConfigError
    from wsdan.serving import model_uri

    assert model_uri("cub") == "models:/cub@champion"
    assert model_uri("cub@staging") == "models:/cub@staging"
    assert model_uri("cub/3") == "models:/cub/3"
    assert model_uri("models:/cub/3") == "models:/cub/3"
    with pytest.raises(ConfigError, match="NAME@ALIAS"):
        model_uri("a@@b")
    assert main(["serve", "cub", "--dry-run", "--timeout", "30"]) == 0
    cmd = capsys.readouterr().out.split()  # here: MLflow's scoring app behind the body guard
    assert cmd[:4] == ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=30", "WSDAN_SERVE_MAX_IMAGES=256",
                       "WSDAN_SERVE_MAX_REQUEST_MB=20",
                       "WSDAN_SERVE_MODEL_URI=models:/cub@champion"]
    assert cmd[5:7] == ["-m", "uvicorn"] and cmd[-1] == "wsdan.serving_app:app"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5001"
    assert main(["serve", "cub", "--dry-run", "--env-manager", "uv"]) == 0
    cmd = capsys.readouterr().out.split()  # another environment: mlflow models serve itself
    assert cmd[4:8] == ["models", "serve", "-m", "models:/cub@champion"]
    assert cmd[cmd.index("-h") + 1] == "127.0.0.1" and cmd[cmd.index("-p") + 1] == "5001"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["serve", "cub"]) == 2  # no tracking server named: a clear error, no server
    assert "MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err


def test_stack_logs_shows_and_follows_a_service_log(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from wsdan.stack import log_files, stack_paths

    monkeypatch.setenv("WSDAN_STACK_DIR", str(tmp_path / "stack"))
    files = log_files(stack_paths())
    assert set(files) == {"s3", "mlflow", "ray"}
    files["s3"].parent.mkdir(parents=True, exist_ok=True)
    files["s3"].write_text("".join(f"line {i}\n" for i in range(100)))
    env = {**os.environ, "WSDAN_STACK_DIR": str(tmp_path / "stack")}
    out = subprocess.run([sys.executable, "-m", "wsdan.cli", "stack", "logs", "s3", "-n", "3"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[1:] == ["line 97", "line 98", "line 99"]
    everything = subprocess.run([sys.executable, "-m", "wsdan.cli", "stack", "logs"], env=env,
                                capture_output=True, text=True, check=True).stdout
    assert "==> mlflow:" in everything and "no log yet" in everything
    follow = subprocess.Popen([sys.executable, "-m", "wsdan.cli", "stack", "logs", "s3", "-f",
                               "-n", "1"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout.readline().startswith("==> s3:")
        assert follow.stdout.readline() == "line 99\n"
        time.sleep(0.5)
        with open(files["s3"], "a") as f:
            f.write("appended later\n")
        assert follow.stdout.readline() == "appended later\n"
    finally:
        follow.terminate()
        follow.wait(timeout=10)


def test_evaluate_names_the_splits_a_data_set_has(tmp_path, capsys):
    from wsdan.data.pipeline import FORMAT_VERSION

    (tmp_path / "dataset.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "classes": ["a", "b"], "num_classes": 2,
        "counts": {"train": 5, "val": 2, "test": 0}, "shards": {}}))
    # The split is checked before the model is loaded: no model needed for the error.
    assert main(["evaluate", "--model", "models:/nothing@champion", "--data",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no 'test' images" in err and "its splits: train (5), val (2)" in err


def test_a_ray_address_where_nothing_listens_fails_fast_and_says_what_to_do(monkeypatch):
    import socket
    import time

    from wsdan.cluster import check_ray_address
    from wsdan.config import ConfigError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS=127.0.0.1:{port}: no Ray head") as e:
        check_ray_address(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 10 and "wsdan stack up" in str(e.value)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_ray_address("no-port-here")
    check_ray_address(None)  # a local Ray for this command
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_ray_address(f"127.0.0.1:{listening.getsockname()[1]}")


def test_stack_env_exports_only_what_runs(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WSDAN_STACK_DIR": str(tmp_path / "stack"),
           "WSDAN_RAY_PORT": "1", "WSDAN_MLFLOW_PORT": "2", "WSDAN_S3_PORT": "3"}
    out = subprocess.run([sys.executable, "-m", "wsdan.cli", "stack", "env"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("# not running: ray, mlflow, s3")
    assert "RAY_ADDRESS" not in out and "MLFLOW_TRACKING_URI" not in out and "AWS_" not in out


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    # A data source that is not there: DataSourceError, not a traceback.
    assert main(["evaluate", "--model", "models:/x@champion", "--data",
                 str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no data set manifest") and "Traceback" not in err
