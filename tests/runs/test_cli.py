"""The `wam` command: help everywhere, one-line user errors with exit status 2, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wam.runs.cli import COMMANDS, run_command


def _wam(*args: str, cwd=None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "wam"  # the console script installed beside this interpreter
    assert exe.exists(), "the `wam` console script is not installed"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_top_level_help_lists_every_command(capsys):
    assert run_command(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert f"wam {words}" in out


@pytest.mark.parametrize("words", sorted(COMMANDS))
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as e:
        run_command([*words.split(), "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command_exits_2(capsys):
    assert run_command(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert run_command(["data", "frobnicate"]) == 2


def test_unknown_game_is_one_line_with_a_suggestion(tmp_path):
    r = _wam("data", "collect", "--game", "Pongg", "--steps", "10", "--out", str(tmp_path / "d"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "Pongg" in err[0] and "Pong" in err[0].replace("Pongg", "")


def test_bad_value_exits_2_without_traceback(tmp_path):
    r = _wam("data", "collect", "--game", "Pong", "--steps", "many", "--out", str(tmp_path / "d"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--steps" in r.stderr


def test_missing_dataset_path_is_a_user_error(tmp_path):
    r = _wam("data", "validate", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "nope" in r.stderr


def test_ctrl_c_exits_130_after_the_command_returns(monkeypatch, tmp_path, capsys):
    """A KeyboardInterrupt out of a command (what the trainers raise after saving on Ctrl-C) exits with 130."""
    import wam.runs.train_cmds as train_cmds

    def interrupted(cfg, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmds, "run_training", interrupted)
    assert run_command(["pretrain", "--data", "synthetic", "--out", str(tmp_path / "run")]) == 130
