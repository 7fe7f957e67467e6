"""A tiny episodic MDP with known optimal Q, for testing and measuring the Q-learning of the world-action model.

A chain s0 -> s1 -> ... -> s_{n-1} -> end (n = 3 by default), each state a fixed pattern of observation
tokens (the episode's last frame is an "end" pattern). Three legal actions (ALE ids 0, 1, 2) everywhere:

    action 0: reward 0, go on to the next state (s_{n-1} -> end)
    action 1: reward +1, go on to the next state (s_{n-1} -> end)       (optimal everywhere)
    action 2: reward 0, the episode terminates at once

so with n = 3: Q*(s2) = (0, 1, 0), Q*(s1) = (g, 1 + g, 0), Q*(s0) = (g (1 + g), 1 + g (1 + g), 0), g = gamma.
The behaviour policy takes action 0 with probability 0.7 (the most frequent data action is not the
optimal one) and 1 and 2 with 0.15 each. Q*(s, 0) needs the max over the next state's actions (an
off-policy value), and Q*(s0, .) needs n Bellman iterations.

`ToyData` draws episodes and cuts them into the training segments the `SegmentSampler` would give
(H steps, H+1 frames, padding masked); `q_table(model)` reads the model's expected Q of every state
the way greedy acting does (a window of at most H frames ending at the state: only trained positions);
`train_toy(...)` trains the real objective (`WorldActionObjective`, any `LossConfig`) with the real
`Trainer` and reports the error against Q* over training.

    python -m wam.worldmodel.toy_mdp     # compares target-update schedules on the 8-state chain (docs/training.md)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from wam.datasets.batch import Batch
from wam.worldmodel.losses import LossConfig, WorldActionObjective
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig
from wam.worldmodel.trainer import Trainer, TrainerConfig

N_LEGAL = 3
TOKENS = 4  # observation tokens per frame
VOCAB = 16
BEHAVIOUR = (0.7, 0.15, 0.15)


def patterns(n_states: int) -> np.ndarray:
    """Fixed token patterns [n_states + 1, TOKENS] of s0 .. s_{n-1} and of the end frame (the last row): distinct
    rows drawn from a fixed generator, sharing tokens; the end frame is all zeros."""
    rng = np.random.default_rng(1234)
    rows: list[tuple[int, ...]] = []
    while len(rows) < n_states:
        row = tuple(int(x) for x in rng.integers(1, VOCAB, TOKENS))
        if row not in rows:
            rows.append(row)
    return np.array([*rows, (0,) * TOKENS], dtype=np.int64)


def optimal_q(gamma: float, n_states: int = 3) -> np.ndarray:
    """Q*[state, action] (n_states x 3)."""
    q = np.zeros((n_states, N_LEGAL))
    v_next = 0.0
    for s in reversed(range(n_states)):
        q[s] = (gamma * v_next, 1.0 + gamma * v_next, 0.0)
        v_next = q[s].max()
    return q


def behaviour_q(gamma: float, n_states: int = 3) -> np.ndarray:
    """Q of the behaviour policy, Q^b[state, action] (n_states x 3): what in-sample targets
    (`LossConfig.bootstrap="data"`) converge to. Its greedy action is still the optimal one (action 1)."""
    q = np.zeros((n_states, N_LEGAL))
    v_next = 0.0
    for s in reversed(range(n_states)):
        q[s] = (gamma * v_next, 1.0 + gamma * v_next, 0.0)
        v_next = float(np.dot(BEHAVIOUR, q[s]))
    return q


def reference_q(loss: LossConfig, n_states: int = 3) -> np.ndarray:
    """The Q a loss should converge to on the chain: Q* for max bootstraps, Q^b for in-sample ones."""
    return (behaviour_q if loss.bootstrap == "data" else optimal_q)(loss.gamma, n_states)


def toy_model_config(**kw) -> WorldActionModelConfig:
    base = dict(vocab_size=VOCAB, tokens_per_obs=TOKENS, d_model=32, n_layers=1, n_heads=2, horizon=2, games=("Toy",))
    base.update(kw)
    return WorldActionModelConfig(**base)


class ToyData:
    """Episodes of the behaviour policy, sampled as training segments (a trainer `BatchSource`)."""

    def __init__(self, horizon: int, batch_size: int = 32, episodes: int = 400, seed: int = 0,
                 n_states: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.horizon, self.batch_size, self.seed, self.n_states = horizon, batch_size, seed, n_states
        self.patterns = patterns(n_states)
        self.episodes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for _ in range(episodes):
            states, actions, rewards = [0], [], []
            while True:
                a = int(rng.choice(N_LEGAL, p=BEHAVIOUR))
                actions.append(a)
                rewards.append(1.0 if a == 1 else 0.0)
                s = states[-1]
                nxt = n_states if (a == 2 or s == n_states - 1) else s + 1
                states.append(nxt)
                if nxt == n_states:
                    break
            t = len(actions)
            term = np.zeros(t, bool)
            term[-1] = True
            self.episodes.append((np.array(states), np.array(actions), np.array(rewards, np.float32), term))
        # every (episode, start) pair is one segment, as the SegmentSampler draws them
        self.starts = [(e, t) for e, ep in enumerate(self.episodes) for t in range(len(ep[1]))]
        self.next_batch = 0

    def segment(self, e: int, start: int) -> tuple[np.ndarray, ...]:
        states, actions, rewards, term = self.episodes[e]
        h = self.horizon
        frames = np.full(h + 1, self.n_states)
        n_frames = min(h + 1, len(states) - start)
        frames[:n_frames] = states[start:start + n_frames]
        n = min(h, len(actions) - start)
        act, rew, ter, mask = np.zeros(h, np.int64), np.zeros(h, np.float32), np.zeros(h, bool), np.zeros(h, bool)
        act[:n], rew[:n], ter[:n], mask[:n] = actions[start:start + n], rewards[start:start + n], term[start:start + n], True
        nxt = int(actions[start + h]) if start + h < len(actions) else -1
        return self.patterns[frames], act, rew, ter, mask, nxt

    def sample(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.next_batch])
        self.next_batch += 1
        idx = rng.integers(0, len(self.starts), self.batch_size)
        obs, act, rew, ter, mask, nxt = (np.stack(x) for x in zip(*(self.segment(*self.starts[i]) for i in idx)))
        b, h = act.shape
        legal = torch.zeros(b, 18, dtype=torch.bool)
        legal[:, :N_LEGAL] = True
        return Batch(obs=torch.from_numpy(obs), actions=torch.from_numpy(act), rewards=torch.from_numpy(rew),
                     terminations=torch.from_numpy(ter), truncations=torch.zeros(b, h, dtype=torch.bool),
                     mask=torch.from_numpy(mask), game_ids=torch.zeros(b, dtype=torch.long), legal_actions=legal,
                     next_action=torch.from_numpy(nxt).long())

    def action_share(self) -> np.ndarray:
        """Share of each legal action in the data."""
        counts = np.bincount(np.concatenate([ep[1] for ep in self.episodes]), minlength=N_LEGAL)
        return counts / counts.sum()

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])


@torch.no_grad()
def q_table(model: WorldActionModel, n_states: int = 3) -> np.ndarray:
    """The model's expected Q [state, legal action] along the episode s0 -0-> s1 -0-> ..., each read like greedy
    acting reads it: a window of the last min(H, t+1) frames ending at the state, Q at its last frame."""
    was_training = model.training
    model.eval()
    h = model.cfg.horizon
    pats = patterns(n_states)
    out_q = np.zeros((n_states, N_LEGAL))
    for s in range(n_states):
        first = max(0, s - h + 1)
        frames = torch.from_numpy(pats[first:s + 1])[None]  # [1, T, K]
        actions = torch.zeros(1, s - first, dtype=torch.long)
        out, _ = model(frames, actions, torch.zeros(1, dtype=torch.long), world_model=False)
        out_q[s] = model.expected_q(out.q_logits[0, -1]).mean(0)[:N_LEGAL].numpy()
    model.train(was_training)
    return out_q


@dataclass
class ToyResult:
    errors: list[tuple[int, float]]  # (step, max |Q - Q*|) at each evaluation
    q: np.ndarray  # final Q table
    q_star: np.ndarray  # the reference: Q* (or Q^b for bootstrap="data"); `greedy_optimal` compares argmaxes
    seconds: float

    @property
    def final_error(self) -> float:
        return self.errors[-1][1]

    def steps_to(self, tol: float) -> int | None:
        """First evaluated step from which the error stays below tol (None: never)."""
        first = None
        for step, err in self.errors:
            if err < tol:
                first = step if first is None else first
            else:
                first = None
        return first

    @property
    def greedy_optimal(self) -> bool:
        return bool((self.q.argmax(1) == self.q_star.argmax(1)).all())


def train_toy(loss: LossConfig, steps: int = 1500, lr: float = 3e-3, seed: int = 0, eval_every: int = 50,
              batch_size: int = 32, model_cfg: WorldActionModelConfig | None = None, n_states: int = 3) -> ToyResult:
    """Train the real objective on the toy MDP from a fresh model; the Q error against the Q it should reach
    (`reference_q`: Q*, or Q^b for in-sample targets) over training."""
    torch.manual_seed(seed)
    model = WorldActionModel(model_cfg or toy_model_config())
    objective = WorldActionObjective(model, loss)
    data = ToyData(model.cfg.horizon, batch_size=batch_size, seed=seed, n_states=n_states)
    cfg = TrainerConfig(steps=steps, lr=lr, min_lr=lr, warmup_steps=0, schedule="constant", device="cpu",
                        progress=False, log_every=10**9, checkpoint_every=10**9)
    trainer = Trainer(objective, data, cfg)
    q_star = reference_q(loss, n_states)
    errors = [(0, float(np.abs(q_table(model, n_states) - q_star).max()))]
    t0 = time.perf_counter()
    while trainer.step < steps:
        trainer.fit(until_step=min(steps, trainer.step + eval_every))
        errors.append((trainer.step, float(np.abs(q_table(model, n_states) - q_star).max())))
    return ToyResult(errors, q_table(model, n_states), q_star, time.perf_counter() - t0)


def _compare(steps: int = 1500, seeds: tuple[int, ...] = (0, 1, 2), tol: float = 0.1, n_states: int = 3,
             **loss_kw) -> None:
    """Print steps-to-tolerance and final error of several target schedules (the docs' measurement)."""
    torch.set_num_threads(1)
    schedules = [("hard every 200", dict(target_update_every=200)), ("hard every 50", dict(target_update_every=50)),
                 ("hard every 20", dict(target_update_every=20)), ("tau 0.01", dict(target_tau=0.01)),
                 ("tau 0.02", dict(target_tau=0.02)), ("tau 0.05", dict(target_tau=0.05))]
    for name, kw in schedules:
        rows = [train_toy(dataclasses.replace(LossConfig(**loss_kw), **kw), steps=steps, seed=s, n_states=n_states)
                for s in seeds]
        reach = [r.steps_to(tol) for r in rows]
        print(f"{name:16s} steps to max|Q-Q*|<{tol}: {reach}  final max err: "
              f"{[round(r.final_error, 3) for r in rows]}  greedy optimal: {[r.greedy_optimal for r in rows]}  "
              f"({np.mean([r.seconds for r in rows]):.1f} s/run)", flush=True)


if __name__ == "__main__":
    _compare(steps=1500, seeds=(0, 1), n_states=8, lambda_cql=0.0)
