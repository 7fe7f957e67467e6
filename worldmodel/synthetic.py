"""Random token batches for smoke runs and benchmarks that need no dataset (`--data synthetic`)."""

from __future__ import annotations

import numpy as np
import torch

from wam.datasets.batch import Batch


class SyntheticTokenSource:
    """Random token segments, a pure function of (seed, batch index): for smoke tests and benchmarks.

    Batch k of the *global* batch (`batch_size` rows) is drawn from a generator seeded with
    (seed, k); a process of rank r among `world_size` returns its `batch_size // world_size` rows,
    so data-parallel workers together see exactly the single-process batch. `num_segments` > 0
    draws the rows from that many fixed segments (a tiny dataset a model can overfit).
    """

    def __init__(self, batch_size: int, horizon: int, vocab_size: int, games: tuple[str, ...] = ("Synthetic",),
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_segments: int = 0,
                 n_legal: int = 18, tokens_per_obs: int = 36) -> None:
        assert batch_size % world_size == 0, f"batch {batch_size} does not split over {world_size} workers"
        self.batch_size, self.horizon, self.vocab_size = batch_size, horizon, vocab_size
        self.games = list(games)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_segments, self.n_legal, self.tokens_per_obs = num_segments, n_legal, tokens_per_obs
        self.next_batch = 0
        self._pool = self._draw(np.random.default_rng([seed, 2**31]), num_segments) if num_segments else None

    def _draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        h = self.horizon
        return {
            "obs": rng.integers(0, self.vocab_size, (n, h + 1, self.tokens_per_obs)),
            "actions": rng.integers(0, self.n_legal, (n, h)),
            "rewards": rng.choice(np.array([-1.0, 0.0, 0.0, 1.0], dtype=np.float32), (n, h)),
            "terminations": rng.random((n, h)) < 0.05,
            "game_ids": rng.integers(0, len(self.games), (n,)),
        }

    def sample(self) -> Batch:
        rng = np.random.default_rng([self.seed, self.next_batch])
        self.next_batch += 1
        if self._pool is not None:
            idx = rng.integers(0, self.num_segments, self.batch_size)
            data = {k: v[idx] for k, v in self._pool.items()}
        else:
            data = self._draw(rng, self.batch_size)
        per = self.batch_size // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        b, h = per, self.horizon
        legal = torch.zeros(b, 18, dtype=torch.bool)
        legal[:, : self.n_legal] = True
        return Batch(obs=torch.from_numpy(data["obs"][rows]).long(), actions=torch.from_numpy(data["actions"][rows]).long(),
                     rewards=torch.from_numpy(data["rewards"][rows]), terminations=torch.from_numpy(data["terminations"][rows]),
                     truncations=torch.zeros(b, h, dtype=torch.bool), mask=torch.ones(b, h, dtype=torch.bool),
                     game_ids=torch.from_numpy(data["game_ids"][rows]).long(), legal_actions=legal,
                     next_action=torch.full((b,), -1, dtype=torch.long))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.next_batch = int(state["seed"]), int(state["next_batch"])

    def close(self) -> None:
        pass
