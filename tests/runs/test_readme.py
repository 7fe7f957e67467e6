"""Every `wam` command shown in the README exists with the flags it shows (parsed, not run),
and the cheap ones run for real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from wam.runs.cli import _find_command, parse_command, run_command

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[str]:
    """`wam ...` lines inside the README's fenced code blocks (comments stripped, continuations joined)."""
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("wam "):
                cmds.append(line)
    return cmds


def test_the_readme_shows_commands():
    cmds = readme_commands()
    assert len(cmds) >= 10, cmds
    for words in ("data collect", "tokenizer train", "pretrain", "finetune", "eval", "report"):
        assert any(c.startswith(f"wam {words}") for c in cmds), f"README shows no `wam {words}`"


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    argv = shlex.split(line)[1:]
    words, rest = _find_command(argv)
    assert words is not None, f"README command is not a wam command: {line}"
    fn, cfg = parse_command(words, rest)  # tyro raises SystemExit(2) on an unknown flag or bad value
    assert callable(fn) and cfg is not None


def test_readme_inspection_commands_run(tmp_path, capsys):
    """`wam data info/validate` as the README writes them, on a real (tiny) dataset."""
    import numpy as np

    from wam.datasets.store import Episode, TrajectoryStore, dataset_dir

    store = TrajectoryStore.create(dataset_dir(tmp_path / "data", "Pong", "random"), game="Pong",
                                   provenance={"protocol": "jowa", "policy": "random", "seed": 0})
    rng = np.random.default_rng(0)
    with store.writer() as w:
        t = 20
        w.append(Episode(observations=rng.integers(0, 255, (t + 1, 84, 84), dtype=np.uint8),
                         actions=rng.integers(0, 18, t), rewards=np.ones(t, np.float32),
                         terminations=np.eye(1, t, t - 1, dtype=bool)[0], truncations=np.zeros(t, bool)))
    import json

    assert run_command(["data", "info", str(tmp_path / "data")]) == 0
    table = capsys.readouterr().out
    assert "atari/pong/random-v0" in table and " 20 " in table.splitlines()[1], table  # its one row: 20 steps
    assert run_command(["data", "info", str(tmp_path / "data"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["datasets"]
    assert [(d["game"], d["episodes"], d["transitions"], d["return_mean"]) for d in info] == [("Pong", 1, 20, 20.0)]
    assert run_command(["data", "validate", str(tmp_path / "data")]) == 0
    assert "1 episodes, 20 transitions" in capsys.readouterr().out


def test_the_journeys_train_like_the_recipe_whose_output_they_show(tmp_path):
    """The README's journeys print the `small` recipe's output, so they must train with its settings."""
    from wam.runs.recipe import Recipe

    jobs = {j.name: j for j in Recipe(parse_command("recipe", ["--out", str(tmp_path)])[1]).training_jobs()}
    readme = {}
    for line in readme_commands():
        argv = shlex.split(line)[1:]
        if argv[0] in ("pretrain", "finetune"):
            kind = argv[0] if argv[0] == "pretrain" else ("scratch" if "scratch" in argv else "finetune")
            readme.setdefault(kind, parse_command(argv[0], argv[1:])[1])
    for kind, job in (("pretrain", "pretrain-seed0"), ("finetune", "finetune-seed0"), ("scratch", "scratch-seed0")):
        want = parse_command(jobs[job].argv[0], jobs[job].argv[1:])[1]
        got = readme[kind]
        assert (got.preset, got.loss, got.batch_size) == (want.preset, want.loss, want.batch_size), kind
        assert got.train == want.train, kind
