"""The state probe (`wam.worldmodel.probe`, `wam tokenizer probe`): the probe math on synthetic tokens (a known
linear function is recovered, an unrelated target scores R² ≈ 0, masked frames are left out, seeded MLPs
repeat), and the command end to end on real Pong/Breakout episodes with recorded RAM and a tiny tokenizer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wam.datasets.atari import legal_action_mask, make_env
from wam.datasets.collect import run_episode
from wam.datasets.policies import BoxingScript, BreakoutScript, PongScript, make_policy
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.runs.cli import run_command
from wam.worldmodel.probe import (
    PROBES,
    RAM_VARIABLES,
    fit_mlp,
    fit_ridge,
    r2_score,
    token_features,
)
from wam.worldmodel.tokenizer import TokenizerConfig, TokenizerTrainConfig, build_tokenizer, load_tokenizer
from wam.worldmodel.tokenizer_train import encode_datasets, train_tokenizer


# ------------------------------------------------------------------------------------ probe math
@pytest.fixture(scope="module")
def synthetic():
    """Token features of random token grids (a fresh debug tokenizer's codebook): [3000, 36 * 32]."""
    rng = np.random.default_rng(0)
    tokenizer = build_tokenizer(TokenizerConfig())
    tokens = rng.integers(0, TokenizerConfig().codebook_size, size=(3000, 36))
    x = token_features(tokenizer, tokens)
    assert x.shape == (3000, 36 * TokenizerConfig().codebook_dim) and x.dtype == torch.float32
    expected = tokenizer.quantizer.lookup(torch.as_tensor(tokens[:2])).flatten(1)
    torch.testing.assert_close(x[:2], expected)
    return x, rng


FIT, VAL, HELD = slice(0, 2000), slice(2000, 2400), slice(2400, 3000)


def _fit_both(x, y, m, **mlp_kw):
    ridge = fit_ridge(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL])
    mlp = fit_mlp(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL], **mlp_kw)
    return ridge, mlp


def test_known_linear_function_is_recovered_and_noise_scores_zero(synthetic):
    x, rng = synthetic
    xd = x.double().numpy()
    dense = xd @ rng.normal(size=x.shape[1])  # a linear function of all 36 code vectors
    sparse = xd[:, :64] @ rng.normal(size=64)  # of the first two tokens' code vectors only
    noise = 100.0 + rng.normal(size=len(x))  # constant plus noise, unrelated to the tokens
    y = np.stack([dense + 0.05 * dense.std() * rng.normal(size=len(x)), sparse, noise], axis=1)
    m = np.ones_like(y, dtype=bool)
    ridge, mlp = _fit_both(x, y, m, epochs=40)
    r_ridge, r_mlp = ridge.predict(x[HELD]), mlp.predict(x[HELD])
    r2 = [[r2_score(y[HELD, j], p[:, j]) for j in range(3)] for p in (r_ridge, r_mlp)]
    assert r2[0][0] > 0.95 and r2[0][1] > 0.95, r2
    assert abs(r2[0][2]) < 0.05, r2
    # the validation split picks a small penalty for the exact linear targets, a large one for noise
    assert ridge.alpha[1] <= 0.01 and ridge.alpha[2] >= 1.0, ridge.alpha
    assert r2[1][1] > 0.6, r2  # the MLP learns too, less sample-efficiently than ridge on a linear target
    assert abs(r2[1][2]) < 0.05, r2  # and finds nothing in noise (its epoch-0 weights predict the mean)
    constant = r2_score(y[HELD, 2], np.full(len(y[HELD]), y[FIT, 2].mean()))
    assert abs(constant) < 0.05


def test_masked_frames_are_left_out(synthetic):
    x, rng = synthetic
    xd = x.double().numpy()
    target = xd[:, :32] @ rng.normal(size=32) + 50.0
    present = rng.random(len(x)) < 0.6
    garbage = np.where(present, target, 0.0)  # like Pong's ball y: 0 when there is no ball
    y = np.stack([garbage, garbage], axis=1)
    m = np.stack([present, np.ones(len(x), dtype=bool)], axis=1)  # column 0 masked, column 1 not
    ridge = fit_ridge(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL])
    pred = ridge.predict(x[HELD])
    held_present = present[HELD]
    masked = r2_score(y[HELD][held_present, 0], pred[held_present, 0])
    unmasked = r2_score(y[HELD][held_present, 1], pred[held_present, 1])
    assert masked > 0.95 and unmasked < 0.9, (masked, unmasked)
    # a variable defined on too few frames is not fitted; the others are
    m_none = np.stack([np.zeros(len(x), dtype=bool), np.ones(len(x), dtype=bool)], axis=1)
    r = fit_ridge(x[FIT], y[FIT], m_none[FIT], x[VAL], y[VAL], m_none[VAL])
    assert r.alpha[0] is None and r.alpha[1] is not None


def test_mlp_is_seeded_and_leaves_global_rng_alone(synthetic):
    x, rng = synthetic
    y = (x.double().numpy()[:, :8].sum(1, keepdims=True))
    m = np.ones_like(y, dtype=bool)
    state = torch.get_rng_state()
    a = fit_mlp(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL], epochs=2, seed=3).predict(x[HELD])
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_mlp(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL], epochs=2, seed=3).predict(x[HELD])
    c = fit_mlp(x[FIT], y[FIT], m[FIT], x[VAL], y[VAL], m[VAL], epochs=2, seed=4).predict(x[HELD])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_ram_variables_and_absent_objects():
    assert set(RAM_VARIABLES) == {"Pong", "Breakout", "Boxing", "Freeway"}
    pong = {v.name: v for v in RAM_VARIABLES["Pong"]}
    assert (pong["player_y"].address, pong["enemy_y"].address, pong["ball_x"].address, pong["ball_y"].address) == \
        (51, 50, 49, 54)
    ram = np.zeros((3, 128), dtype=np.uint8)
    ram[1, 54] = 100
    np.testing.assert_array_equal(pong["ball_x"].mask(ram), [False, True, False])
    np.testing.assert_array_equal(pong["player_y"].mask(ram), [True, True, True])
    breakout = {v.name: v.address for v in RAM_VARIABLES["Breakout"]}
    assert breakout == {"player_x": 72, "ball_x": 99, "ball_y": 101}
    assert {v.name: v.address for v in RAM_VARIABLES["Boxing"]} == {"player_x": 32, "player_y": 34, "enemy_x": 33,
                                                                    "enemy_y": 35}
    assert [(v.name, v.address) for v in RAM_VARIABLES["Freeway"]] == [("player_y", 14)]
    # the bytes the scripted policies read (checked there against the emulator) are the same
    assert (PongScript.PADDLE_Y, PongScript.BALL_Y) == (pong["player_y"].address, pong["ball_y"].address)
    assert (BreakoutScript.PADDLE_X, BreakoutScript.BALL_X, BreakoutScript.BALL_Y) == (72, 99, 101)
    assert (BoxingScript.PLAYER_X, BoxingScript.PLAYER_Y, BoxingScript.ENEMY_X, BoxingScript.ENEMY_Y) == (32, 34, 33, 35)
    assert r2_score(np.ones(4), np.zeros(4)) != r2_score(np.ones(4), np.zeros(4))  # NaN for a constant target


# ------------------------------------------------------------------------------------ the command
def _collect(root: Path, game: str, episodes: int, steps: int, seed: int, ram: bool = True,
             policy: str = "scripted") -> str:
    """Real ALE episodes (with their RAM unless `ram` is False) written through the trajectory store."""
    env = make_env(game, seed=seed, max_episode_steps=steps)
    behaviour, legal = make_policy(policy, game, epsilon=0.2), legal_action_mask(game)
    store = TrajectoryStore.create(dataset_dir(root, game, policy if ram else "noram"), game=game,
                                   provenance={"protocol": "jowa", "policy": policy, "seed": seed})
    with store.writer(commit_every=episodes) as w:
        for i in range(episodes):
            arrays = run_episode(env, behaviour, legal, seed=100 * seed + i)
            if not ram:
                arrays.pop("ram")
            w.append(Episode(**arrays))
    return str(store.directory)


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> tuple[list[str], str]:
    """Pong and Breakout, 5 scripted episodes each with RAM, and a tokenizer trained for a few steps on them."""
    root = tmp_path_factory.mktemp("probe_frames")
    dirs = [_collect(root, "Pong", 5, 90, seed=1), _collect(root, "Breakout", 5, 60, seed=2)]
    run = tmp_path_factory.mktemp("probe_tok") / "tok"
    train = dataclasses.replace(TokenizerTrainConfig.from_preset("debug"), steps=4, batch_size=8, eval_frames=16,
                                eval_every=4, plot_every=4, checkpoint_every=4)
    train_tokenizer(TokenizerConfig.from_preset("debug"), train, dirs, run, progress=False)
    return dirs, str(run)


def _data(dirs: list[str]) -> list[str]:
    return [x for d in dirs for x in ("--data", d)]


FAST = ["--max-frames", "300", "--max-heldout-frames", "100", "--epochs", "3", "--hidden", "32", "--no-progress"]


def test_cli_end_to_end(probe_data, tmp_path, capsys):
    dirs, run = probe_data
    out = tmp_path / "probe"
    assert run_command(["tokenizer", "probe", run, *_data(dirs), "--out", str(out), *FAST]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("probe of tokenizer vq-") and "Pong ball_y" in line and "Breakout player_x" in line

    result = json.loads((out / "probe.json").read_text())
    assert result["probes"] == list(PROBES)
    games = {g["game"]: g for g in result["games"]}
    assert set(games) == {"Pong", "Breakout"}
    pong = games["Pong"]
    assert [v["name"] for v in pong["variables"]] == [v.name for v in RAM_VARIABLES["Pong"]]
    assert pong["episodes"] == {"train": 4, "val": 1, "heldout": 1}  # the tokenizer's 10 % split, >= 1 episode
    assert pong["frames"]["fit"] + pong["frames"]["val"] == min(300, pong["frames"]["training_total"])
    assert pong["frames"]["heldout"] == min(100, pong["frames"]["heldout_total"])
    assert pong["tokens_from"] == "encoded"
    ball = {v["name"]: v for v in pong["variables"]}["ball_y"]
    assert ball["mask"] and "RAM[54] == 0" in ball["mask"]
    assert ball["masked_frames"]["fit"] > 0  # no ball before the first serve: those frames are left out
    assert ball["frames"]["fit"] + ball["masked_frames"]["fit"] == pong["frames"]["fit"]
    for g in result["games"]:
        for v in g["variables"]:
            r = v["r2"]
            if v["note"] is None:
                assert all(isinstance(r[p], float) for p in PROBES), (g["game"], v)
                assert r["constant"] <= 1e-9  # the training mean never beats the held-out mean
                assert set(v["ridge_alpha"]) == {"token", "pixel"}
    md = (out / "probe.md").read_text()
    assert ("| game | variable | token ridge R² | token MLP R² | pixel ridge R² | pixel MLP R² | constant R² | "
            "ratio token-best/pixel-best |") in md
    assert "| Pong | ball_y (RAM[54]) |" in md and "RAM[54] == 0" in md
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # from the token cache (equal to encoding on the fly) the figures are the same
    encode_datasets(load_tokenizer(run), dirs, progress=False)
    again = tmp_path / "again"
    assert run_command(["tokenizer", "probe", run, *_data(dirs), "--out", str(again), *FAST]) == 0
    second = json.loads((again / "probe.json").read_text())
    assert {g["tokens_from"] for g in second["games"]} == {"cache"}
    assert [[v["r2"] for v in g["variables"]] for g in second["games"]] == \
        [[v["r2"] for v in g["variables"]] for g in result["games"]]

    # --no-pixels: the token probes alone (the same figures), no pixel columns and no ratio
    tokens_only = tmp_path / "tokens_only"
    assert run_command(["tokenizer", "probe", run, "--data", dirs[0], "--out", str(tokens_only), *FAST,
                        "--no-pixels"]) == 0
    third = json.loads((tokens_only / "probe.json").read_text())
    assert [g["game"] for g in third["games"]] == ["Pong"]
    for v, w in zip(third["games"][0]["variables"], games["Pong"]["variables"]):
        assert v["r2"]["pixel_ridge"] is None and v["r2"]["pixel_mlp"] is None and v["ratio"] is None
        assert v["r2"]["token_ridge"] == w["r2"]["token_ridge"]


def test_datasets_without_ram_or_annotations_are_refused(probe_data, tmp_path, capsys):
    dirs, run = probe_data
    root = tmp_path / "noram"
    bare = [_collect(root, "Pong", 2, 20, seed=5, ram=False), _collect(root, "Breakout", 2, 20, seed=6, ram=False)]
    assert run_command(["tokenizer", "probe", run, *_data([*dirs, *bare]), "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(d in err for d in bare) and not any(d in err for d in dirs)
    assert "wam data collect" in err and err.count("\n") == 1  # one error line naming every such dataset

    other = _collect(tmp_path / "other", "MsPacman", 2, 20, seed=7, policy="random")
    assert run_command(["tokenizer", "probe", run, "--data", other, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no RAM annotations for MsPacman" in err and "Boxing, Breakout, Freeway, Pong" in err
