"""Collect Atari episodes with Ray actors; the parent alone writes the HDF5 datasets.

Work is split into episodes. Episode j of game g runs with its own seed derived from (seed, g, j), so the
dataset depends only on the seed, never on the number of workers or the order in which workers finish:
the parent buffers finished episodes and writes them in index order. With a step budget, the parent
writes the shortest prefix of episodes that reaches it and truncates the last one to the budget exactly
(marking it `truncated`). Episodes are committed atomically every few seconds (copy-on-write, see
docs/data-format.md); a crash loses at most those seconds, and running again on the same `--out` resumes:
the committed episodes are kept and only the missing ones are collected, identical to an uninterrupted
run. A worker that dies has its episode re-run on a fresh actor; an idle worker is always given the next
episode (a bounded look-ahead keeps finished-but-unwritten episodes in memory few).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wam.datasets import faults
from wam.datasets.errors import WamError
from wam.datasets.faults import DieOn

log = logging.getLogger(__name__)

MAX_EPISODE_RETRIES = 3
"""Restarts of a dead worker on one episode before collection stops with a `WamError`."""


@dataclass
class CollectSummary:
    steps: int = 0  # transitions written by this call
    episodes: int = 0  # episodes written by this call
    seconds: float = 0.0
    returns: list[float] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    restarted_workers: int = 0

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def dataset_name(policy: str, epsilon: float) -> str:
    """Minari-style dataset name for a behaviour policy, e.g. `scripted-eps30`."""
    return policy if epsilon == 0 else f"{policy}-eps{int(round(epsilon * 100)):02d}"


def episode_seed(seed: int, game: str, index: int) -> int:
    """A 32-bit seed for episode `index` of `game`, stable across runs and machines."""
    return int(np.random.SeedSequence([seed, zlib.crc32(game.encode()), index]).generate_state(1)[0])


def run_episode(env, policy, legal: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Play one episode of `policy` in `env` (legal: bool[18]); returns the arrays of a stored episode.

    `ram[t]` is the console RAM (`ale.getRAM()`) when `observations[t]` was produced: after the reset
    for t = 0, after step t-1 otherwise; the policy sees that same RAM row.
    """
    rng = np.random.default_rng(seed)
    ale = env.unwrapped.ale
    obs, info = env.reset(seed=seed)
    policy.reset(rng)
    ram = ale.getRAM().copy()
    frames, rams, actions, rewards, terms, truncs, lives = [obs], [ram], [], [], [], [], []
    while True:
        a = policy.act(obs, ram, legal, rng)
        obs, r, terminated, truncated, info = env.step(a)
        ram = ale.getRAM().copy()
        frames.append(obs)
        rams.append(ram)
        actions.append(a)
        rewards.append(r)
        terms.append(terminated)
        truncs.append(truncated)
        lives.append(info.get("lives", 0))
        if terminated or truncated:
            break
    return {
        "observations": np.stack(frames).astype(np.uint8),
        "actions": np.asarray(actions, dtype=np.int64),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminations": np.asarray(terms, dtype=bool),
        "truncations": np.asarray(truncs, dtype=bool),
        "lives": np.asarray(lives, dtype=np.int32),
        "ram": np.stack(rams).astype(np.uint8, copy=False),
    }


class _EpisodeRunner:
    """Body of the Ray actor: keeps one environment per game and plays requested episodes."""

    def __init__(self, protocol: str, policy: str, epsilon: float, fault: DieOn | None = None):
        self.protocol, self.policy_name, self.epsilon = protocol, policy, epsilon
        self.envs: dict[str, tuple] = {}
        self.fault = fault  # tests' worker crash (wam.datasets.faults)

    def run(self, game: str, index: int, seed: int) -> tuple[str, int, dict[str, np.ndarray]]:
        faults.check(self.fault, f"{game}/{index}")
        from wam.datasets.atari import legal_action_mask, make_env
        from wam.datasets.policies import make_policy

        if game not in self.envs:
            self.envs[game] = (make_env(game, protocol=self.protocol, seed=seed),
                               make_policy(self.policy_name, game, epsilon=self.epsilon),
                               legal_action_mask(game))
        env, policy, legal = self.envs[game]
        return game, index, run_episode(env, policy, legal, seed)

    def ping(self) -> bool:
        return True


@dataclass
class _GameJob:
    game: str
    store: object
    writer: object
    start_index: int  # first episode index this call collects
    steps_done: int  # transitions already in the dataset
    episodes_done: int
    target_steps: int | None
    target_episodes: int | None
    next_submit: int = 0
    next_write: int = 0
    pending: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    finished: bool = False

    def wants_more(self) -> bool:
        if self.finished:
            return False
        if self.target_episodes is not None:
            return self.next_submit < self.target_episodes
        return True  # step budget: keep a few episodes in flight; surplus ones are discarded


def collect(
    games: Sequence[str],
    policy: str = "random",
    epsilon: float = 0.0,
    steps: int | None = None,
    episodes: int | None = None,
    workers: int = 2,
    protocol: str = "jowa",
    seed: int = 0,
    out: str | Path = "data",
    progress: bool = True,
    ray_address: str | None = None,
) -> CollectSummary:
    """Collect `steps` transitions (split evenly over games) or `episodes` episodes per game into `out`.

    `out` is a dataset root: each game goes to `out/atari/<game>/<policy-name>-v0/`. A dead worker's
    episode is re-run on a new worker and counted once; after `MAX_EPISODE_RETRIES` restarts on one episode
    collection stops with a `WamError` (the episodes written before it stay in the dataset).
    """
    from tqdm import tqdm

    games = _checked_games(games, policy, epsilon, steps, episodes, workers, protocol)
    per_game_steps = None if steps is None else -(-steps // len(games))
    jobs: list[_GameJob] = []
    summary = CollectSummary()
    t0 = time.perf_counter()
    try:
        for g in games:
            jobs.append(_open_job(g, out, policy, epsilon, protocol, seed, per_game_steps, episodes))
            summary.datasets.append(str(jobs[-1].store.directory))
        todo = [j for j in jobs if not j.finished]
        if not todo:
            log.info("nothing to collect: %s already complete", out)
            return summary
        for j in todo:
            j.writer = j.store.writer(commit_every=64, commit_seconds=5.0).__enter__()

        total = (sum(j.target_steps - j.steps_done for j in todo) if steps is not None
                 else sum(j.target_episodes - j.episodes_done for j in todo))
        bar = tqdm(total=total, unit="step" if steps is not None else "ep", disable=not progress,
                   desc=f"collect {'+'.join(games)}", dynamic_ncols=True)
        _run_collection(todo, workers, ray_address, (protocol, policy, epsilon), seed, out, steps is not None,
                        summary, bar, t0)
        bar.close()
    finally:
        for j in jobs:
            if j.writer is not None:
                j.writer.__exit__(None, None, None)
        summary.seconds = time.perf_counter() - t0
    return summary


def _run_collection(todo: list[_GameJob], workers: int, ray_address: str | None, runner_args: tuple, seed: int,
                    out: str | Path, by_steps: bool, summary: CollectSummary, bar: Any, t0: float) -> None:
    """Play the episodes the jobs in `todo` still want on `workers` Ray actors (`_EpisodeRunner(*runner_args)`),
    writing each game's episodes in index order as they arrive; a dead actor's episode is re-run on a new one.
    Collecting by steps keeps at most 2 x `workers` episodes of a game ahead of its writer."""
    import ray

    from wam.datasets.distributed import ActorGroup, ray_session
    from wam.datasets.store import Episode

    with ray_session(num_cpus=workers, address=ray_address):
        n_cpu = ray.available_resources().get("CPU", 1)
        cpus_per = min(1.0, max(0.01, n_cpu / workers))
        Runner = ray.remote(num_cpus=cpus_per)(_EpisodeRunner)
        fault = faults.die_on("collect")
        group = ActorGroup(
            lambda: Runner.remote(*runner_args, fault), workers, MAX_EPISODE_RETRIES,
            describe=lambda key: f"{key[0]} episode {key[1]}",
            give_up=lambda key: (f"workers died {MAX_EPISODE_RETRIES + 1} times on {key[0]} episode {key[1]} "
                                 f"(seed {episode_seed(seed, *key)}); the episodes before it are saved in "
                                 f"{out}, see the Ray worker logs for the crash"))

        def submit(ai: int) -> bool:
            live = [j for j in todo if j.wants_more()]
            if not live:
                return False
            # keep a bounded number of episodes per game ahead of the writer
            live.sort(key=lambda j: j.next_submit - j.next_write)
            j = live[0]
            if by_steps and j.next_submit - j.next_write >= 2 * workers:
                return False
            idx = j.next_submit
            j.next_submit += 1
            game, ep_seed = j.game, episode_seed(seed, j.game, idx)
            group.submit(ai, (game, idx), lambda actor: actor.run.remote(game, idx, ep_seed))
            return True

        def feed_idle() -> None:
            """Give work to every actor that has none (one may have been left idle by the look-ahead cap)."""
            busy = group.busy()
            for ai in range(workers):
                if ai not in busy:
                    submit(ai)

        feed_idle()
        by_game = {j.game: j for j in todo}
        try:
            while group:
                _, (game, idx), (_, _, arrays) = group.next()
                job = by_game[game]
                if not job.finished:
                    job.pending[idx] = arrays
                    _write_ready(job, Episode, episode_seed, seed, summary, bar, by_steps)
                if job.finished:  # drop surplus episodes of a finished game
                    job.pending.clear()
                feed_idle()
                bar.set_postfix(eps=summary.episodes,
                                ret=f"{np.mean(summary.returns):.1f}" if summary.returns else "-",
                                sps=f"{summary.steps / max(time.perf_counter() - t0, 1e-9):.0f}")
        finally:
            summary.restarted_workers += group.restarts
            group.kill()


def _checked_games(games: Sequence[str], policy: str, epsilon: float, steps: int | None, episodes: int | None,
                   workers: int, protocol: str) -> list[str]:
    """The canonical names of `games` (duplicates dropped), after checking every argument of `collect` and
    building each game's policy once (a scripted policy missing for a game fails here, before Ray starts)."""
    from wam.datasets.atari import PROTOCOLS, canonical_game
    from wam.datasets.policies import make_policy

    if (steps is None) == (episodes is None):
        raise WamError("give exactly one of --steps or --episodes")
    if (steps is not None and steps <= 0) or (episodes is not None and episodes <= 0):
        raise WamError("--steps/--episodes must be positive")
    if not 0.0 <= epsilon <= 1.0:
        raise WamError(f"--epsilon must lie in [0, 1], got {epsilon}")
    if workers < 1:
        raise WamError(f"--workers must be at least 1, got {workers}")
    if not games:
        raise WamError("give at least one --game")
    if protocol not in PROTOCOLS:
        raise WamError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    games = list(dict.fromkeys(canonical_game(g) for g in games))
    for g in games:
        make_policy(policy, g, epsilon=epsilon)
    return games


def _open_job(game: str, out: str | Path, policy: str, epsilon: float, protocol: str, seed: int,
              target_steps: int | None, target_episodes: int | None) -> _GameJob:
    """The dataset of `game` under `out` (created, or reopened to resume: then it must have the same seed),
    and how far its collection has come."""
    from importlib.metadata import version

    from wam.datasets.store import TrajectoryStore, dataset_dir

    path = dataset_dir(out, game, dataset_name(policy, epsilon))
    provenance = {"game": game, "protocol": protocol, "policy": policy, "epsilon": float(epsilon),
                  "seed": int(seed), "ale_py_version": version("ale-py"), "collector": "wam data collect"}
    store = TrajectoryStore.create(path, game=game, provenance=provenance, exist_ok=True)
    if int(store.provenance.get("seed", seed)) != seed:
        raise WamError(f"{path} was collected with --seed {store.provenance['seed']}; "
                       f"resume with the same seed or choose another --out")
    done_steps, done_eps = int(store.num_steps), int(store.num_episodes)
    job = _GameJob(game, store, None, done_eps, done_steps, done_eps, target_steps, target_episodes,
                   next_submit=done_eps, next_write=done_eps)
    job.finished = ((target_steps is not None and done_steps >= target_steps)
                    or (target_episodes is not None and done_eps >= target_episodes))
    return job


def _write_ready(job: _GameJob, Episode, seed_fn, seed: int, summary: CollectSummary, bar, by_steps: bool) -> None:
    """Write the episodes that are next in index order; stop the game when its budget is met."""
    while job.next_write in job.pending and not job.finished:
        idx = job.next_write
        arrays = job.pending.pop(idx)
        if by_steps:
            room = job.target_steps - job.steps_done
            if len(arrays["actions"]) >= room:
                arrays = _truncate(arrays, room)
                job.finished = True
        ep = Episode(**arrays, seed=seed_fn(seed, job.game, idx), attrs={"episode_index": idx})
        job.writer.append(ep)
        n = len(arrays["actions"])
        job.steps_done += n
        job.episodes_done += 1
        job.next_write += 1
        summary.steps += n
        summary.episodes += 1
        summary.returns.append(float(arrays["rewards"].sum()))
        bar.update(n if by_steps else 1)
        if job.target_episodes is not None and job.episodes_done >= job.target_episodes:
            job.finished = True


def _truncate(arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first n transitions of an episode, flagged as truncated when cut short."""
    if len(arrays["actions"]) == n:
        return arrays
    out = {k: (v[: n + 1] if k in ("observations", "ram") else v[:n]).copy() for k, v in arrays.items()}
    out["truncations"][-1] = not out["terminations"][-1]
    return out
