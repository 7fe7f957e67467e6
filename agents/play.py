"""Playing episodes: one agent over a batch of environments in lockstep, with epsilon applied by the loop
(the same way for every agent, one generator per episode), recording frames, actions and Q-values on request."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wam.agents.base import Agent

AGENT_STREAM = 0x5EED_A6E7
"""Mixed into an episode's seed to seed the agent's generator (so it differs from the env's stream)."""
VIDEO_MAX_FRAMES = 5000
"""Frames kept for a video (84x84 each); a longer episode's video shows its start."""


def agent_rng(seed: int) -> np.random.Generator:
    """The agent's generator for the episode seeded with `seed`."""
    return np.random.default_rng([AGENT_STREAM, int(seed)])


def play_episodes(agent: Agent, envs: Sequence, legal: np.ndarray, seeds: Sequence[int], epsilon: float,
                  record: Sequence[bool] | None = None, video_max_frames: int = VIDEO_MAX_FRAMES
                  ) -> list[tuple[float, int, bool, dict[str, np.ndarray] | None, tuple[int, ...], int | None]]:
    """Play one episode in each env (seeded by `seeds`) in lockstep; per env (return, length, truncated, recording,
    action counts: how often each of the 18 actions was played, epsilon's included, and how many of the agent's
    decisions its planner changed from the greedy choice: None for an agent whose info has no `plan_changed`).

    legal: bool [18] (the game's mask). `record[i]` keeps env i's frames, actions and Q-values (if the
    agent's info has `q_values`), up to `video_max_frames` frames.
    """
    from wam.datasets.policies import uniform_legal_action

    n = len(envs)
    assert len(seeds) == n and n > 0, f"{len(seeds)} seeds for {n} envs"
    record = list(record) if record is not None else [False] * n
    legal_rows = np.broadcast_to(np.asarray(legal, dtype=bool), (n, legal.shape[-1]))  # [N, 18]
    rngs = [agent_rng(s) for s in seeds]
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])  # [N, 84, 84]
    state = agent.reset(agent.init_state(n), np.ones(n, dtype=bool), rngs)
    active = np.ones(n, dtype=bool)
    returns = np.zeros(n, dtype=np.float64)
    lengths = np.zeros(n, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    counts = np.zeros((n, legal_rows.shape[-1]), dtype=np.int64)
    changed = np.zeros(n, dtype=np.int64)
    planned = False
    rec: list[dict[str, list] | None] = [
        {"frames": [obs[i].copy()], "actions": [], "q_values": []} if record[i] else None for i in range(n)
    ]
    while active.any():
        ram = np.stack([env.unwrapped.ale.getRAM() for env in envs])  # [N, 128]
        actions, state, info = agent.act(state, obs, legal_rows, rngs, ram=ram)
        actions = np.asarray(actions, dtype=np.int64).copy()  # [N]
        q = info.get("q_values")
        if "plan_changed" in info:
            planned = True
            changed[active] += np.asarray(info["plan_changed"], dtype=bool)[active]
        for i in np.flatnonzero(active):
            if epsilon > 0.0 and rngs[i].random() < epsilon:
                actions[i] = uniform_legal_action(legal_rows[i], rngs[i])
            o, r, term, trunc, _ = envs[i].step(int(actions[i]))
            counts[i, actions[i]] += 1
            obs[i] = o
            returns[i] += r
            lengths[i] += 1
            r_i = rec[i]
            if r_i is not None and len(r_i["frames"]) < video_max_frames:
                r_i["frames"].append(o.copy())
                r_i["actions"].append(int(actions[i]))
                if q is not None:
                    r_i["q_values"].append(np.asarray(q[i], dtype=np.float32))
            if term or trunc:
                active[i] = False
                truncated[i] = bool(trunc) and not term
        if hasattr(agent, "record_actions"):  # tell history-keeping agents what epsilon actually played
            state = agent.record_actions(state, actions)
    out = []
    for i in range(n):
        recording = None
        if rec[i] is not None:
            recording = {"frames": np.stack(rec[i]["frames"]).astype(np.uint8),
                         "actions": np.asarray(rec[i]["actions"], dtype=np.int64),
                         "q_values": np.stack(rec[i]["q_values"]) if rec[i]["q_values"] else None}
        out.append((float(returns[i]), int(lengths[i]), bool(truncated[i]), recording, tuple(counts[i].tolist()),
                    int(changed[i]) if planned else None))
    return out
