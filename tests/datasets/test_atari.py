"""wam.datasets.atari against the live emulator: names, protocols, preprocessing, masks, seeding."""

from __future__ import annotations

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import AtariPreprocessing

from wam.datasets.atari import (
    ACTION_NAMES,
    PROTOCOLS,
    AtariEnv,
    all_games,
    canonical_game,
    game_rom_id,
    get_protocol,
    get_ram,
    legal_action_mask,
    make_env,
)
from wam.datasets.errors import WamError

gym.register_envs(ale_py)


def _actions(n: int, seed: int, legal: np.ndarray | None = None) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(legal) if legal is not None else np.arange(18)
    return [int(a) for a in rng.choice(ids, size=n)]


def _rollout(env: AtariEnv, seed: int, actions: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations [T+1, 84, 84], rewards [T], RAM [T+1, 128] of one reset(seed) + fixed actions."""
    obs, _ = env.reset(seed=seed)
    frames, rewards, rams = [obs], [], [get_ram(env)]
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        frames.append(obs)
        rewards.append(r)
        rams.append(get_ram(env))
        if terminated or truncated:
            break
    return np.stack(frames), np.array(rewards), np.stack(rams)


@pytest.mark.parametrize(
    "name, expected",
    [("Pong", "Pong"), ("pong", "Pong"), ("ALE/Pong-v5", "Pong"), ("PongNoFrameskip-v4", "Pong"),
     ("space_invaders", "SpaceInvaders"), ("SpaceInvaders", "SpaceInvaders"), ("ALE/MsPacman-v5", "MsPacman"),
     ("montezuma_revenge", "MontezumaRevenge"), ("Carnival", "Carnival")],
)
def test_canonical_game_accepts_common_spellings(name, expected):
    assert canonical_game(name) == expected


def test_rom_id_and_game_list_come_from_ale_py():
    assert game_rom_id("SpaceInvaders") == "space_invaders"
    games = all_games()
    assert len(games) == len(ale_py.roms.get_all_rom_ids())
    assert {"Pong", "Breakout", "SpaceInvaders", "Carnival"} <= set(games)


def test_unknown_game_suggests_close_matches():
    with pytest.raises(WamError, match=r"unknown Atari game 'Pongg'; did you mean Pong\?"):
        canonical_game("Pongg")
    with pytest.raises(WamError, match="SpaceInvaders"):
        canonical_game("space_invader")
    with pytest.raises(WamError, match="unknown Atari game 'qwertyuiop'"):
        canonical_game("qwertyuiop")


def test_protocol_table_and_unknown_protocol():
    assert (PROTOCOLS["jowa"].sticky_action_prob, PROTOCOLS["jowa"].max_agent_steps) == (0.0, 108_000)
    assert (PROTOCOLS["machado"].sticky_action_prob, PROTOCOLS["machado"].max_agent_steps) == (0.25, 27_000)
    assert PROTOCOLS["jowa"].eval_epsilon == PROTOCOLS["machado"].eval_epsilon == 0.001
    with pytest.raises(WamError, match="unknown protocol 'dopamine'; choose one of jowa, machado"):
        get_protocol("dopamine")
    with pytest.raises(WamError, match="unknown protocol"):
        make_env("Pong", protocol="dopamine")


@pytest.mark.parametrize("protocol", ["jowa", "machado"])
def test_live_env_has_protocol_settings_and_spaces(protocol):
    env = make_env("Pong", protocol=protocol)
    expected = PROTOCOLS[protocol]
    assert env.ale.getFloat("repeat_action_probability") == pytest.approx(expected.sticky_action_prob)
    assert env.max_episode_steps == expected.max_agent_steps
    assert env.action_space.n == 18 and len(ACTION_NAMES) == 18
    assert env.get_action_meanings()[:6] == ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN"]
    obs, info = env.reset(seed=0)
    assert obs.shape == (84, 84) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(17)  # any of the 18 ids is accepted
    assert obs.shape == (84, 84) and obs.dtype == np.uint8 and isinstance(reward, float)
    assert "lives" in info and get_ram(env).shape == (128,) and get_ram(env).dtype == np.uint8


def test_episode_cap_truncates_exactly():
    env = make_env("Pong", max_episode_steps=5)
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]


def test_game_over_terminates_and_lives_count_down():
    env = make_env("Breakout")
    _, info = env.reset(seed=0)
    assert info["lives"] == 5
    lives, terminated, steps = [], False, 0
    while not terminated and steps < 2_000:
        _, _, terminated, truncated, info = env.step(1 if steps % 50 == 0 else 0)  # serve, never move
        lives.append(info["lives"])
        steps += 1
    assert terminated and not truncated and info["lives"] == 0
    assert sorted(set(lives), reverse=True) == [5, 4, 3, 2, 1, 0][: len(set(lives))]


def test_legal_action_masks_are_the_minimal_sets():
    pong = legal_action_mask("Pong")
    assert pong.dtype == np.bool_ and pong.shape == (18,)
    assert [ACTION_NAMES[i] for i in np.flatnonzero(pong)] == ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
    assert legal_action_mask("ALE/Breakout-v5").sum() == 4
    assert legal_action_mask("boxing").all()
    env = make_env("pong")
    np.testing.assert_array_equal(env.legal_action_mask, pong)
    with pytest.raises(ValueError):
        pong[0] = False  # shared cached mask is read-only


@pytest.mark.parametrize("protocol", ["jowa", "machado"])
def test_same_seed_same_trajectory(protocol):
    actions = _actions(300, seed=1)
    a = _rollout(make_env("Breakout", protocol, seed=3), 11, actions)
    b = _rollout(make_env("Breakout", protocol, seed=4), 11, actions)  # construction seed is overridden
    env = make_env("Breakout", protocol)
    c = _rollout(env, 11, actions)
    d = _rollout(env, 11, actions)  # the same env reseeded replays too
    for x, y in [(a, b), (a, c), (a, d)]:
        for arr_x, arr_y in zip(x, y):
            np.testing.assert_array_equal(arr_x, arr_y)


def test_sticky_actions_depend_on_seed():
    actions = _actions(300, seed=1)
    a = _rollout(make_env("Breakout", "machado"), 11, actions)
    b = _rollout(make_env("Breakout", "machado"), 12, actions)
    assert a[2].shape != b[2].shape or not np.array_equal(a[2], b[2]), "seed had no effect with sticky actions"
    # without sticky actions Breakout's emulation does not depend on the seed
    c = _rollout(make_env("Breakout", "jowa"), 11, actions)
    d = _rollout(make_env("Breakout", "jowa"), 12, actions)
    np.testing.assert_array_equal(c[2], d[2])


def test_observation_is_max_pool_of_last_two_raw_frames():
    """Drive a bare ALE frame by frame and rebuild each observation from its raw screens."""
    env = make_env("Pong", seed=0)
    env.reset(seed=5)
    raw = gym.make("ALE/Pong-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=True,
                   obs_type="grayscale")
    raw.reset(seed=5)
    pooled_differs = 0
    for action in _actions(120, seed=2, legal=legal_action_mask("Pong")):
        screens = [raw.step(action)[0] for _ in range(4)]  # 4 x [210, 160]
        expected = cv2.resize(np.maximum(screens[2], screens[3]), (84, 84), interpolation=cv2.INTER_AREA)
        last_only = cv2.resize(screens[3], (84, 84), interpolation=cv2.INTER_AREA)
        obs = env.step(action)[0]
        np.testing.assert_array_equal(obs, expected)
        pooled_differs += int(not np.array_equal(expected, last_only))
    assert pooled_differs > 10, "the test never saw two different raw frames: it checks nothing"


@pytest.mark.parametrize("protocol", ["jowa", "machado"])
def test_matches_gymnasium_atari_preprocessing(protocol):
    """Parity with gymnasium's reference wrapper (the same seed derivation, so sticky actions match too)."""
    sticky = PROTOCOLS[protocol].sticky_action_prob
    ref = AtariPreprocessing(
        gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=sticky, full_action_space=True),
        noop_max=0, frame_skip=4, screen_size=84, terminal_on_life_loss=False, grayscale_obs=True,
        scale_obs=False,
    )
    env = make_env("Breakout", protocol)
    ref_obs, _ = ref.reset(seed=9)
    obs, _ = env.reset(seed=9)
    np.testing.assert_array_equal(obs, ref_obs)
    total = 0.0
    for action in _actions(250, seed=3):
        ref_obs, ref_r, ref_term, _, ref_info = ref.step(action)
        obs, r, term, _, info = env.step(action)
        assert (r, term, info["lives"]) == (ref_r, ref_term, ref_info["lives"])
        total += r
        if term:
            # gymnasium returns the previous (stale) frames when the game ends inside the skip;
            # wam pools the final frame (test_terminal_observation_is_the_final_frame)
            break
        np.testing.assert_array_equal(obs, ref_obs)
    assert total > 0 and term, "the compared stretch had no reward or no game over: parity is weak"


def test_get_ram_works_through_wrappers_and_bad_action_fails():
    env = make_env("Pong")
    env.reset(seed=0)
    wrapped = gym.wrappers.RecordEpisodeStatistics(env)
    np.testing.assert_array_equal(get_ram(wrapped), env.ale.getRAM())
    with pytest.raises(ValueError, match="outside the full action space"):
        env.step(18)
    with pytest.raises(WamError, match="max_episode_steps"):
        make_env("Pong", max_episode_steps=-1)


def test_terminal_observation_is_the_final_frame():
    """A game that ends inside the frame skip shows its last raw frame, not the previous step's."""
    env = make_env("Breakout")
    raw = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=True,
                   obs_type="grayscale")
    previous_obs, _ = env.reset(seed=9)
    raw.reset(seed=9)
    for step, action in enumerate(_actions(2_000, seed=3)):
        screens = []
        for _ in range(4):
            screen, _, raw_terminated, _, _ = raw.step(action)
            screens.append(screen)
            if raw_terminated:
                break
        obs, _, terminated, _, _ = env.step(action)
        assert terminated == raw_terminated, f"termination differs at step {step}"
        if terminated:
            pooled = np.maximum(screens[-2], screens[-1]) if len(screens) >= 2 else screens[-1]
            expected = cv2.resize(pooled, (84, 84), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(obs, expected)
            assert len(screens) < 4, "the game ended on the last frame of a skip: nothing special tested"
            assert not np.array_equal(obs, previous_obs), "a stale frame would pass this test"
            return
        previous_obs = obs
    pytest.fail("Breakout never ended under random actions")


@pytest.mark.parametrize("game", ["Breakout", "Pong"])
def test_reseeding_a_used_jowa_env_equals_a_fresh_one(game):
    """With sticky actions off, a seeded reset skips the ROM reload; it must still replay exactly."""
    actions = np.random.default_rng(0).integers(0, 18, 120)

    def play(env, seed):
        frames = [env.reset(seed=seed)[0]]
        for a in actions:
            obs, _, term, trunc, _ = env.step(int(a))
            frames.append(obs)
            if term or trunc:
                break
        return np.stack(frames)

    used = make_env(game, protocol="jowa", seed=1)
    play(used, 1)
    again = play(used, 7)
    fresh = play(make_env(game, protocol="jowa", seed=7), 7)
    np.testing.assert_array_equal(again, fresh)
