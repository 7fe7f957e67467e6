"""Ray-distributed evaluation: play N episodes per game with an agent, write a per-episode CSV and results.json.

Work is split into *batches* of `envs_per_worker` consecutive episodes of one game (episodes 0..k-1,
k..2k-1, ...); a Ray actor plays one batch at a time, all of its episodes in lockstep (one `agent.act`
call for the whole batch), and returns their results to the parent, which alone writes files:

- `episodes.csv`: one row per finished episode (columns `wam.agents.metrics.EPISODE_COLUMNS`),
  appended and flushed as batches finish, so Ctrl-C or a crash keeps every finished episode; at
  the end it is rewritten sorted by (game, episode);
- `results.json`: settings, the live environment settings each worker read back, per-game and
  aggregate scores with confidence intervals (`wam.agents.metrics.summarize`), status
  (`complete` / `interrupted`), timings; written at the end and on interrupt;
- `videos/<game>_ep0.mp4` with `--video`: the first episode of each game (the agent's view, upscaled,
  beside its Q-values when the agent reports them).

Determinism: episode j of game g is seeded with `episode_seed(seed, g, j)` (the collector's
derivation): the environment is reset with it and the agent's per-row generator derives from it.
Batches are fixed by episode index, so results do not depend on the number of workers or on which
worker plays a batch. A worker that dies has its batch re-run on a fresh actor; its episodes are
counted once. Running again into the same `out_dir` with the same settings resumes: episodes already
in `episodes.csv` are kept and only the missing ones are played.

Exploration: epsilon-greedy is applied here, the same way for every agent: in each step and row,
with probability epsilon the agent's action is replaced by a uniform legal action.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wam.agents.base import Agent, load_agent
from wam.agents.metrics import EPISODE_COLUMNS, EpisodeRecord, read_episodes, summarize
from wam.agents.play import VIDEO_MAX_FRAMES, play_episodes
from wam.agents.video import write_video
from wam.datasets import faults
from wam.datasets.errors import WamError
from wam.datasets.faults import DieOn
from wam.planning.beam import PlannerSettings

log = logging.getLogger(__name__)

MAX_BATCH_RETRIES = 3
"""Restarts of a dead worker for the same batch before evaluation gives up."""
SETTINGS_KEYS = ("agent_spec", "protocol", "epsilon", "plan", "max_steps", "seed", "checkpoint_ids", "agent_kwargs")
"""The settings that change scores; resuming into a directory requires them to be equal."""


@dataclass
class EnvSettings:
    """Environment settings read back from a live env inside a worker."""

    game: str
    protocol: str
    sticky_action_prob: float  # ALE's repeat_action_probability
    protocol_cap: int  # the protocol's cap in agent steps
    episode_cap: int  # the cap in force (max_steps when given)
    frame_skip: int


@dataclass
class EpisodeResult:
    """What a worker returns for one episode."""

    game: str
    episode: int
    seed: int
    score: float
    length: int
    truncated: bool
    frames: np.ndarray | None = None  # uint8 [T+1, 84, 84] when recorded
    q_values: np.ndarray | None = None  # float32 [T, 18] when recorded and the agent reports them
    actions: np.ndarray | None = None  # int64 [T] when recorded
    action_counts: tuple[int, ...] | None = None  # times each of the 18 actions was played
    plan_changed: int | None = None  # decisions where the agent's planner overrode its greedy choice


@dataclass
class EvalResult:
    """The outcome of `evaluate` (also in `out_dir/results.json` and `out_dir/episodes.csv`)."""

    out_dir: Path
    records: list[EpisodeRecord]
    summary: dict[str, Any]
    env_settings: dict[str, EnvSettings]
    complete: bool
    seconds: float = 0.0
    steps: int = 0  # agent steps played by this call
    episodes_run: int = 0  # episodes played by this call
    restarted_workers: int = 0
    videos: dict[str, str] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


class _EvalWorker:
    """Body of the Ray actor: per game, one agent and a set of environments; plays batches of episodes."""

    def __init__(self, agent_spec: str, protocol: str, epsilon: float, plan: dict[str, Any] | None,
                 max_steps: int | None, agent_kwargs: dict[str, Any], video_max_frames: int,
                 num_threads: int = 1, fault: DieOn | None = None) -> None:
        self.agent_spec, self.protocol, self.epsilon = agent_spec, protocol, epsilon
        self.plan = PlannerSettings(**plan) if plan is not None else None
        self.max_steps, self.agent_kwargs, self.video_max_frames = max_steps, agent_kwargs, video_max_frames
        self.fault = fault  # tests' worker crash (wam.datasets.faults)
        self.agents: dict[str, Agent] = {}
        self.envs: dict[str, list] = {}
        if agent_spec not in ("random", "scripted"):
            import torch

            torch.set_num_threads(num_threads)

    def _setup(self, game: str, n: int, seed: int) -> tuple[Agent, list]:
        from wam.datasets.atari import make_env

        if game not in self.agents:
            self.agents[game] = load_agent(self.agent_spec, game, plan=self.plan, **self.agent_kwargs)
            self.envs[game] = []
        envs = self.envs[game]
        while len(envs) < n:
            envs.append(make_env(game, protocol=self.protocol, seed=seed, max_episode_steps=self.max_steps))
        return self.agents[game], envs[:n]

    def settings(self, game: str) -> EnvSettings:
        from wam.datasets.atari import FRAME_SKIP

        env = self.envs[game][0]
        return EnvSettings(game=game, protocol=env.protocol.name,
                           sticky_action_prob=float(env.unwrapped.ale.getFloat("repeat_action_probability")),
                           protocol_cap=int(env.protocol.max_agent_steps), episode_cap=int(env.max_episode_steps),
                           frame_skip=FRAME_SKIP)

    def run(self, game: str, indices: list[int], seeds: list[int], record: list[bool]
            ) -> tuple[list[EpisodeResult], EnvSettings]:
        faults.check(self.fault, *(f"{game}/{i}" for i in indices))
        from wam.datasets.atari import legal_action_mask

        agent, envs = self._setup(game, len(indices), seeds[0])
        played = play_episodes(agent, envs, legal_action_mask(game), seeds, self.epsilon, record,
                               self.video_max_frames)
        results = []
        for idx, s, (score, length, trunc, recording, counts, changed) in zip(indices, seeds, played):
            r = EpisodeResult(game, idx, int(s), score, length, trunc, action_counts=counts, plan_changed=changed)
            if recording is not None:
                r.frames, r.actions, r.q_values = recording["frames"], recording["actions"], recording["q_values"]
            results.append(r)
        return results, self.settings(game)


class _CsvAppender:
    """Appends episode rows to `episodes.csv`, flushing each batch (the header goes in once)."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=list(EPISODE_COLUMNS))
        if new:
            self.writer.writeheader()
            self.file.flush()

    def write(self, records: Sequence[EpisodeRecord]) -> None:
        for r in records:
            self.writer.writerow(r.to_row())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a partly written last row (a crash during a write leaves one); whole rows end with a newline."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s ends with a partly written row; dropping it (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)


def _write_sorted_csv(path: Path, records: Sequence[EpisodeRecord]) -> None:
    import io

    from wam.datasets.files import atomic_write_bytes

    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(EPISODE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in sorted(records, key=lambda r: (r.game, r.episode)):
        writer.writerow(r.to_row())
    atomic_write_bytes(path, buf.getvalue().encode())


def _batches(games: Sequence[str], todo: dict[str, list[int]], size: int) -> list[tuple[str, list[int]]]:
    """Fixed batches of `size` consecutive episode indices per game (by index block), games interleaved."""
    per_game = {g: {} for g in games}
    for g in games:
        for idx in todo[g]:
            per_game[g].setdefault(idx // size, []).append(idx)
    out = []
    blocks = sorted({b for g in games for b in per_game[g]})
    for b in blocks:
        for g in games:
            if b in per_game[g]:
                out.append((g, per_game[g][b]))
    return out


def evaluate(
    agent_spec: str,
    games: Sequence[str],
    episodes: int = 16,
    workers: int = 2,
    protocol: str = "jowa",
    seed: int = 0,
    epsilon: float | None = None,
    plan: PlannerSettings | dict[str, Any] | None = None,
    out_dir: str | Path = "eval",
    video: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    envs_per_worker: int = 4,
    agent_kwargs: dict[str, Any] | None = None,
    bootstrap_reps: int = 2000,
    bootstrap_seed: int = 0,
    ray_address: str | None = None,
    video_max_frames: int = VIDEO_MAX_FRAMES,
) -> EvalResult:
    """Evaluate `agent_spec` (`random`, `scripted` or a run directory) for `episodes` episodes per game.

    `epsilon` defaults to the protocol's evaluation epsilon; `plan` (beam width, horizon) goes to the
    agent; `max_steps` caps episodes below the protocol's cap (tests, demos). The confidence intervals
    in results.json use `bootstrap_reps` and `bootstrap_seed` (the same defaults as `wam report`,
    so both show the same numbers). See the module docstring
    for the files written.
    """
    from tqdm import tqdm

    from wam.datasets.atari import PROTOCOLS, canonical_game
    from wam.datasets.files import atomic_write_json

    eps = _checked_epsilon(protocol, games, episodes, workers, envs_per_worker, max_steps, epsilon)
    plan_settings = PlannerSettings(**plan) if isinstance(plan, dict) else plan
    games = list(dict.fromkeys(canonical_game(g) for g in games))
    agent_kwargs = dict(agent_kwargs or {})
    # Build each game's agent once here: bad specs fail before Ray starts, and we learn names and ids.
    agents = {g: load_agent(agent_spec, g, plan=plan_settings, **agent_kwargs) for g in games}
    cap = int(max_steps) if max_steps is not None else PROTOCOLS[protocol].max_agent_steps
    settings = {"agent_spec": agent_spec, "protocol": protocol, "epsilon": eps,
                "plan": plan_settings.as_dict() if plan_settings else None, "max_steps": cap, "seed": int(seed),
                "agent_kwargs": {k: agent_kwargs[k] for k in sorted(agent_kwargs)},
                "checkpoint_ids": {g: a.checkpoint_id for g, a in agents.items()}}  # a resume must match them

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, settings_path = out / "episodes.csv", out / "eval_config.json"
    records = _resumed_records(out, settings, games)
    atomic_write_json(settings_path, settings)

    todo = {g: [j for j in range(episodes) if (g, j) not in records] for g in games}
    batches = _batches(games, todo, envs_per_worker)
    to_record = functools.partial(_record, agents=agents, settings=settings, plan=plan_settings)
    result = EvalResult(out_dir=out, records=[], summary={}, env_settings={}, complete=False)
    if records and (out / "results.json").is_file():  # resuming: keep what earlier workers read back
        previous = json.loads((out / "results.json").read_text()).get("env_settings", {})
        result.env_settings = {g: EnvSettings(**v) for g, v in previous.items()}
    t0 = time.perf_counter()
    appender = _CsvAppender(csv_path)
    bar = tqdm(total=sum(len(v) for v in todo.values()), unit="ep", disable=not progress,
               desc=f"eval {agent_spec} on {'+'.join(games)}", dynamic_ncols=True)
    on_batch = functools.partial(_take_batch, to_record=to_record, appender=appender, records=records,
                                 result=result, bar=bar, t0=t0)
    try:
        if batches:
            worker_args = (agent_spec, protocol, eps, plan_settings.as_dict() if plan_settings else None, max_steps,
                           agent_kwargs, video_max_frames)
            _run_batches(batches, workers, ray_address, worker_args, seed, video, result, on_batch)
        result.complete = all((g, j) in records for g in games for j in range(episodes))
    finally:
        bar.close()
        appender.close()
        result.seconds = time.perf_counter() - t0
        result.records = sorted(records.values(), key=lambda r: (r.game, r.episode))
        settings = {**settings, "games": games, "episodes": episodes, "workers": workers,
                    "envs_per_worker": envs_per_worker}
        _write_results(result, settings, bootstrap_reps, bootstrap_seed)
    return result


def _take_batch(results: list[EpisodeResult], to_record: Callable[[EpisodeResult], EpisodeRecord],
                appender: _CsvAppender, records: dict[tuple[str, int], EpisodeRecord], result: EvalResult, bar: Any,
                t0: float) -> None:
    """Record a batch of finished episodes: the CSV row, the run's counts, a video where frames came back."""
    new = [to_record(r) for r in results]
    appender.write(new)
    for r, rec in zip(results, new):
        records[(r.game, r.episode)] = rec
        result.steps += r.length
        result.episodes_run += 1
        if r.frames is not None:
            result.videos[r.game] = str(write_video(result.out_dir / "videos" / f"{r.game}_ep{r.episode}", r.frames,
                                                    r.actions, r.q_values, r.game))
    bar.update(len(results))
    bar.set_postfix(ret=f"{np.mean([r.score for r in results]):.1f}",
                    sps=f"{result.steps / max(time.perf_counter() - t0, 1e-9):.0f}")


def _record(r: EpisodeResult, agents: dict[str, Agent], settings: dict[str, Any],
            plan: PlannerSettings | None) -> EpisodeRecord:
    """The episodes.csv row of a played episode under the evaluation's `settings`."""
    from wam.datasets.scores import human_normalized

    return EpisodeRecord(
        game=r.game, episode=r.episode, seed=r.seed, score=r.score, length=r.length, truncated=r.truncated,
        hns=human_normalized(r.game, r.score), protocol=settings["protocol"], epsilon=settings["epsilon"],
        plan="beam" if plan else "none", beam_width=plan.beam_width if plan else None,
        horizon=plan.horizon if plan else None, max_steps=settings["max_steps"], agent=agents[r.game].name,
        agent_spec=settings["agent_spec"], checkpoint_id=agents[r.game].checkpoint_id,
        eval_seed=int(settings["seed"]), action_counts=r.action_counts, plan_changed=r.plan_changed)


def _write_results(result: EvalResult, settings: dict[str, Any], reps: int, seed: int) -> None:
    """The final episodes.csv (sorted), the summary with its bootstrap intervals and results.json (also after
    an interruption: then its status says so and a warning tells how to resume)."""
    from wam.datasets.files import atomic_write_json

    out = result.out_dir
    if result.records:
        _write_sorted_csv(out / "episodes.csv", result.records)
    result.summary = summarize(result.records, reps=reps, seed=seed) if result.records else {}
    atomic_write_json(out / "results.json", _results_json(result, settings))
    if not result.complete:
        log.warning("evaluation in %s stopped early: %d episodes on disk; run the same command to resume",
                    out, len(result.records))


def _run_batches(batches: list[tuple[str, list[int]]], workers: int, ray_address: str | None,
                 worker_args: tuple, seed: int, video: bool, result: EvalResult,
                 on_batch: Callable[[list[EpisodeResult]], None]) -> None:
    """Play `batches` ((game, episode indices) each) on `workers` Ray actors (`_EvalWorker(*worker_args)`),
    calling `on_batch` with each finished batch's results as it arrives. A dead worker's batch is re-run on
    a new actor (at most MAX_BATCH_RETRIES times); the restarts are added to `result.restarted_workers`,
    also when leaving through an exception or Ctrl-C, which stops the remaining batches."""
    import ray

    from wam.datasets.collect import episode_seed
    from wam.datasets.distributed import ActorGroup, ray_session

    with ray_session(num_cpus=workers, address=ray_address):
        n_cpu = ray.available_resources().get("CPU", 1)
        cpus_per = min(1.0, max(0.01, n_cpu / workers))
        Worker = ray.remote(num_cpus=cpus_per)(_EvalWorker)
        fault, interrupt_after = faults.die_on("evaluate"), faults.interrupt_after()
        group = ActorGroup(
            lambda: Worker.remote(*worker_args, max(1, int(cpus_per)), fault), min(workers, len(batches)),
            MAX_BATCH_RETRIES, describe=lambda key: f"{key[0]} episodes {list(key[1])}",
            give_up=lambda key: (f"workers died {MAX_BATCH_RETRIES + 1} times on {key[0]} episodes {list(key[1])}; "
                                 "see the Ray logs (out of memory?) and resume with the same command"))
        queue = list(batches)

        def submit(ai: int, game: str, idxs: list[int]) -> None:
            seeds = [episode_seed(seed, game, j) for j in idxs]
            rec = [video and j == 0 for j in idxs]
            group.submit(ai, (game, tuple(idxs)), lambda actor: actor.run.remote(game, idxs, seeds, rec))

        try:
            for ai in range(len(group.actors)):
                submit(ai, *queue.pop(0))
            finished_batches = 0
            while group:
                ai, (game, _), (results, env_settings) = group.next()
                result.env_settings.setdefault(game, env_settings)
                on_batch(results)
                finished_batches += 1
                if interrupt_after is not None and finished_batches >= interrupt_after:
                    raise KeyboardInterrupt
                if queue:
                    submit(ai, *queue.pop(0))
        finally:  # also on Ctrl-C: stop the workers' remaining batches
            result.restarted_workers += group.restarts
            group.kill()


def _checked_epsilon(protocol: str, games: Sequence[str], episodes: int, workers: int, envs_per_worker: int,
                    max_steps: int | None, epsilon: float | None) -> float:
    """The evaluation epsilon (the protocol's unless given), after checking every argument of `evaluate`."""
    from wam.datasets.atari import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise WamError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not games:
        raise WamError("give at least one --game")
    if episodes < 1 or workers < 1 or envs_per_worker < 1:
        raise WamError(f"--episodes, --workers and --envs-per-worker must be >= 1 (got {episodes}, {workers}, "
                       f"{envs_per_worker})")
    if max_steps is not None and max_steps < 1:
        raise WamError(f"--max-steps must be >= 1, got {max_steps}")
    eps = PROTOCOLS[protocol].eval_epsilon if epsilon is None else float(epsilon)
    if not 0.0 <= eps <= 1.0:
        raise WamError(f"--epsilon must lie in [0, 1], got {eps}")
    return eps


def _resumed_records(out: Path, settings: dict[str, Any], games: list[str]) -> dict[tuple[str, int], EpisodeRecord]:
    """The episodes an earlier run of the same evaluation left in `out` (none for a new one); a WamError if
    `out` holds an evaluation with other settings. Drops a row torn by a crash, rewrites the table with the
    current columns, and merges the earlier checkpoint ids into `settings`."""
    csv_path, settings_path = out / "episodes.csv", out / "eval_config.json"
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return {}
    old = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    old_ids = old.get("checkpoint_ids", {})
    same = all(old.get(k) == settings[k] for k in SETTINGS_KEYS if k != "checkpoint_ids") and all(
        old_ids.get(g, settings["checkpoint_ids"][g]) == settings["checkpoint_ids"][g] for g in games)
    if not same:
        raise WamError(f"{out} holds an evaluation with other settings ({settings_path}); "
                       "use another --out or the same settings to resume it")
    _drop_torn_tail(csv_path)
    records = {(r.game, r.episode): r for r in read_episodes(csv_path)}
    _write_sorted_csv(csv_path, list(records.values()))  # the current columns, before rows are appended
    log.info("resuming %s: %d episodes already evaluated", out, len(records))
    settings["checkpoint_ids"] = {**old_ids, **settings["checkpoint_ids"]}
    return records


def _results_json(result: EvalResult, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "complete" if result.complete else "interrupted",
        "settings": settings,
        "env_settings": {g: asdict(s) for g, s in result.env_settings.items()},
        "summary": result.summary,
        "episodes_on_disk": len(result.records),
        "run": {"seconds": result.seconds, "agent_steps": result.steps, "episodes": result.episodes_run,
                "agent_steps_per_s": result.steps_per_second, "restarted_workers": result.restarted_workers},
        "videos": {g: str(Path(p).relative_to(result.out_dir)) for g, p in result.videos.items()},
    }
