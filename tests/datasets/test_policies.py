"""Behaviour policies on live ALE envs: scripted rules beat random, epsilon mixing, legality, errors."""

from __future__ import annotations

import numpy as np
import pytest

from wam.datasets.atari import get_ram, legal_action_mask, make_env
from wam.datasets.errors import WamError
from wam.datasets.policies import (
    SCRIPTED_GAMES,
    BehaviourPolicy,
    EpsilonPolicy,
    RandomPolicy,
    make_policy,
    scripted_policy,
)


def _play(game: str, policy: BehaviourPolicy, steps: int, seed: int = 0) -> tuple[float, list[int]]:
    """Summed raw reward and actions of `steps` agent steps (episodes restart), checking legality."""
    env = make_env(game, "jowa", seed=seed)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    policy.reset(rng)
    total, actions = 0.0, []
    for _ in range(steps):
        action = policy.act(obs, get_ram(env), env.legal_action_mask, rng)
        assert env.legal_action_mask[action], f"{policy.name} chose illegal action {action} in {game}"
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            obs, _ = env.reset()
            policy.reset(rng)
    return total, actions


# Measured with ale-py 0.12.1, 600 jowa steps, seed 0 (random / scripted): Boxing 5 / 29,
# Breakout 4 / 15, Freeway 0 / 7, Pong -11 / 2. The margins leave room for emulator drift.
MARGINS = {"Boxing": 10.0, "Breakout": 5.0, "Freeway": 5.0, "Pong": 5.0}


@pytest.mark.parametrize("game", SCRIPTED_GAMES)
def test_scripted_policy_beats_random(game):
    random_return, _ = _play(game, make_policy("random", game), steps=600)
    scripted_return, _ = _play(game, make_policy("scripted", game), steps=600)
    assert scripted_return >= random_return + MARGINS[game], (game, scripted_return, random_return)


def test_every_scripted_game_has_a_margin():
    assert set(SCRIPTED_GAMES) == set(MARGINS) and len(SCRIPTED_GAMES) >= 4


def test_epsilon_extremes_equal_inner_and_random():
    inner_return, inner_actions = _play("Breakout", make_policy("scripted", "Breakout"), steps=200, seed=1)
    eps0_return, eps0_actions = _play("Breakout", EpsilonPolicy(scripted_policy("Breakout"), 0.0), steps=200, seed=1)
    assert eps0_actions == inner_actions and eps0_return == inner_return
    _, random_actions = _play("Pong", RandomPolicy(), steps=200, seed=2)
    _, eps1_actions = _play("Pong", make_policy("scripted", "Pong", epsilon=1.0), steps=200, seed=2)
    assert eps1_actions == random_actions


def test_epsilon_mix_rate():
    """Freeway's script always says UP (2); with eps 0.3, 0.3 * 2/3 of the actions are the other legal ones."""
    policy = make_policy("scripted", "Freeway", epsilon=0.3)
    assert isinstance(policy, EpsilonPolicy) and policy.name == "scripted+eps0.3"
    rng = np.random.default_rng(0)
    obs, ram, legal = np.zeros((84, 84), np.uint8), np.zeros(128, np.uint8), legal_action_mask("Freeway")
    policy.reset(rng)
    actions = np.array([policy.act(obs, ram, legal, rng) for _ in range(3_000)])
    assert legal[actions].all()
    assert abs(np.mean(actions != 2) - 0.3 * 2 / 3) < 0.03


def test_random_policy_is_uniform_over_legal_actions():
    rng = np.random.default_rng(0)
    legal = legal_action_mask("Pong")
    policy = RandomPolicy()
    actions = np.array([policy.act(np.zeros((84, 84), np.uint8), np.zeros(128, np.uint8), legal, rng)
                        for _ in range(6_000)])
    counts = np.bincount(actions, minlength=18)
    assert (counts[~legal] == 0).all()
    assert counts[legal].min() > 850 and counts[legal].max() < 1150  # 1000 expected each


def test_policies_satisfy_the_protocol():
    """Each policy is a BehaviourPolicy with the name datasets record, and acts with legal action ids."""
    legal = legal_action_mask("Pong")
    frame, ram = np.zeros((84, 84), np.uint8), np.zeros(128, np.uint8)
    for policy, name in ((RandomPolicy(), "random"), (scripted_policy("Pong"), "scripted"),
                         (make_policy("random", "Pong", epsilon=0.1), "random+eps0.1"),
                         (make_policy("scripted", "Pong", epsilon=0.3), "scripted+eps0.3")):
        assert isinstance(policy, BehaviourPolicy) and policy.name == name
        rng = np.random.default_rng(0)
        acts = [policy.act(frame, ram, legal, rng) for _ in range(50)]
        assert all(isinstance(a, (int, np.integer)) and legal[a] for a in acts), (name, acts)


def test_make_policy_errors():
    with pytest.raises(WamError, match="no scripted policy for SpaceInvaders; scripted policies exist for Boxing, Breakout, Freeway, Pong"):
        make_policy("scripted", "space_invaders")
    with pytest.raises(WamError, match="unknown behaviour policy 'greedy'; choose one of random, scripted"):
        make_policy("greedy", "Pong")
    with pytest.raises(WamError, match="epsilon must be in"):
        make_policy("random", "Pong", epsilon=1.5)
    with pytest.raises(WamError, match="unknown Atari game"):
        make_policy("random", "Pongg")
