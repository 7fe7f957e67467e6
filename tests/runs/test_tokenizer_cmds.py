"""`wam tokenizer train` and `wam tokenize` through the CLI dispatcher, on real Atari frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from wam.datasets.atari import legal_action_mask, make_env
from wam.datasets.collect import run_episode
from wam.datasets.policies import make_policy
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.runs.cli import run_command

SMALL = ["--train.batch-size", "8", "--train.eval-every", "5", "--train.plot-every", "10",
         "--train.checkpoint-every", "5", "--train.eval-frames", "32", "--no-progress"]


def _data(dirs: list[str]) -> list[str]:
    """Sequence options repeat their flag: `--data A --data B`."""
    return [x for d in dirs for x in ("--data", d)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Two games, three short random-policy episodes each, written through the trajectory store."""
    root = tmp_path_factory.mktemp("cmd_frames")
    dirs = []
    for k, game in enumerate(("Breakout", "MsPacman")):
        env, policy = make_env(game, seed=k, max_episode_steps=40), make_policy("random", game)
        store = TrajectoryStore.create(dataset_dir(root, game, "random"), game=game,
                                       provenance={"protocol": "jowa", "policy": "random", "seed": k})
        with store.writer(commit_every=3) as w:
            for i in range(3):
                w.append(Episode(**run_episode(env, policy, legal_action_mask(game), seed=100 * k + i)))
        dirs.append(str(store.directory))
    return dirs


def test_train_tokenize_resume_and_refuse_other_tokenizer(data, tmp_path, capsys):
    run = str(tmp_path / "tok")
    assert run_command(["tokenizer", "train", "--preset", "debug", *_data(data), "--out", run,
                        "--steps", "10", *SMALL]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "at step 10: held-out PSNR" in line and "mean-frame baseline" in line and "codebook usage" in line
    assert (Path(run) / "plots" / "recon_step_00000010.png").is_file()

    assert run_command(["tokenizer", "train", *_data(data), "--out", run, "--steps", "15", "--resume",
                        "--no-progress"]) == 0
    assert "at step 15:" in capsys.readouterr().out

    assert run_command(["tokenize", "--tokenizer", run, *_data(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tokenized 2 of 2 dataset(s) (0 already cached)" in out and "held-out PSNR" in out
    assert all(TrajectoryStore.open(d).has_tokens() for d in data)
    assert run_command(["tokenize", "--tokenizer", run, *_data(data), "--no-progress"]) == 0
    assert "tokenized 0 of 2 dataset(s) (2 already cached), 0 frames" in capsys.readouterr().out

    other = str(tmp_path / "other")
    assert run_command(["tokenizer", "train", *_data(data), "--out", other, "--steps", "2", *SMALL]) == 0
    capsys.readouterr()
    assert run_command(["tokenize", "--tokenizer", other, *_data(data[:1]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "wam tokenize: error:" in err and "holds tokens of tokenizer" in err


def test_user_errors_exit_2(data, tmp_path, capsys):
    assert run_command(["tokenizer", "train", *_data(data), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert run_command(["tokenizer", "train", "--preset", "nope", *_data(data), "--out", str(tmp_path)]) == 2
    assert "unknown tokenizer preset 'nope'" in capsys.readouterr().err
    assert run_command(["tokenize", "--tokenizer", str(tmp_path / "missing"), *_data(data)]) == 2
    assert "checkpoint" in capsys.readouterr().err
