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
