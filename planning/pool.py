"""A pool of Ray actors, each holding a CPU copy of the model and a `BeamSearchPlanner`.

Requests (one environment state each: a context window of frames and actions, the game, the legal
actions) from many environments are cut into fixed chunks of `batch_size` consecutive requests;
each chunk is planned by one actor in a single batched planner call and the answers come back in
request order. Chunks are fixed by request index and every actor runs the same weights with the
same number of torch threads, so the answers depend only on the requests (and the model), never on
the number of workers or on which actor planned a chunk. An actor that dies has its chunk re-run
on a fresh actor (at most `max_retries` times per chunk; then a `WamError`).

Ray is imported inside the pool's methods only.

    with PlannerPool(model, PlannerSettings(beam_width=2, horizon=2), workers=2) as pool:
        answers = pool.plan(requests)          # list[PlanAnswer], one per request, in order
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wam.datasets import faults
from wam.datasets.errors import WamError
from wam.datasets.faults import DieOn
from wam.planning.beam import BeamSearchPlanner, PlannerSettings

log = logging.getLogger(__name__)


@dataclass
class PlanRequest:
    """One environment state to plan from."""

    obs_tokens: np.ndarray  # [T, tokens_per_obs] integer tokens of the last T frames (the current one last)
    actions: np.ndarray  # [T-1] int64, the actions taken between those frames
    game_id: int  # row of the model's task tables
    legal: np.ndarray  # [18] bool legal-action mask


@dataclass
class PlanAnswer:
    """The planner's answer for one request (see `wam.planning.beam.PlanResult`)."""

    action: int
    raw_q: np.ndarray  # [18] float32, -inf where illegal
    candidates: np.ndarray  # [K] int64
    candidate_q: np.ndarray  # [K] float32 planned Q (-inf for a candidate that is not legal)
    plans: np.ndarray  # [K, H] int64 imagined action sequences


@dataclass
class PoolStats:
    requests: int = 0
    chunks: int = 0
    restarted_workers: int = 0
    seconds: float = 0.0
    model_calls: int = 0
    tokens: int = 0
    per_chunk_seconds: list[float] = field(default_factory=list)


def plan_requests(planner: BeamSearchPlanner, requests: Sequence[PlanRequest]) -> tuple[list[PlanAnswer], int, int]:
    """Plan a list of requests locally: one batched planner call per context length (in first-seen order).

    Returns the answers in request order, and the planner's model calls and tokens.
    """
    model = planner.model
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(len(r.obs_tokens), []).append(i)
    answers: list[PlanAnswer | None] = [None] * len(requests)
    calls = tokens = 0
    for idx in groups.values():
        obs = torch.as_tensor(np.stack([requests[i].obs_tokens for i in idx]).astype(np.int64), device=device)
        acts = torch.as_tensor(np.stack([np.asarray(requests[i].actions, dtype=np.int64) for i in idx]), device=device)
        gids = torch.as_tensor([requests[i].game_id for i in idx], dtype=torch.long, device=device)
        legal = torch.as_tensor(np.stack([requests[i].legal for i in idx]).astype(bool), device=device)
        res = planner.plan_context(obs, acts.view(len(idx), -1), gids, legal)
        calls += res.model_calls
        tokens += res.tokens
        for j, i in enumerate(idx):
            answers[i] = PlanAnswer(action=int(res.action[j]), raw_q=res.raw_q[j].float().cpu().numpy(),
                                    candidates=res.candidates[j].cpu().numpy(),
                                    candidate_q=res.candidate_q[j].float().cpu().numpy(),
                                    plans=res.plans[j].cpu().numpy())
    return answers, calls, tokens  # type: ignore[return-value]


class _PlannerWorker:
    """Body of a pool actor: a model copy (CPU) and a planner; plans one chunk per call."""

    def __init__(self, model: Any, settings: PlannerSettings, threads: int,
                 fault: DieOn | None = None) -> None:
        torch.set_num_threads(threads)  # same thread count in every actor: identical reductions
        self.model = model.cpu().eval()
        s = settings
        self.planner = BeamSearchPlanner(self.model, s.beam_width, s.horizon, s.gamma, s.reward, s.backup)
        self.fault = fault  # tests' worker crash (wam.datasets.faults)

    def plan(self, chunk: int, requests: list[PlanRequest]) -> tuple[int, list[PlanAnswer], int, int, float]:
        faults.check(self.fault, str(chunk))
        t0 = time.perf_counter()
        answers, calls, tokens = plan_requests(self.planner, requests)
        return chunk, answers, calls, tokens, time.perf_counter() - t0

    def ping(self) -> bool:
        return True


class PlannerPool:
    """Ray actors planning batched chunks of requests; see the module docstring.

    Args:
        model: the model to copy into every actor (moved to CPU there; pickled once with `ray.put`).
        settings: beam width, horizon, gamma, reward mode.
        workers: number of actors.
        batch_size: requests per chunk (one batched planner call each).
        threads_per_worker: torch threads in each actor.
        max_retries: how often one chunk may be re-run after its actor died.
        ray_address: an existing Ray cluster; by default the running session or a local one.
    """

    def __init__(self, model: Any, settings: PlannerSettings, workers: int = 2, batch_size: int = 16,
                 threads_per_worker: int = 1, max_retries: int = 3, ray_address: str | None = None) -> None:
        if workers < 1 or batch_size < 1:
            raise WamError(f"planner pool needs workers >= 1 and batch_size >= 1, got {workers} and {batch_size}")
        self.model, self.settings = model, settings
        self.workers, self.batch_size, self.threads = workers, batch_size, threads_per_worker
        self.max_retries, self.ray_address = max_retries, ray_address
        self.stats = PoolStats()
        self._session: Any = None
        self._group: Any = None  # the actors (ActorGroup), while started

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PlannerPool:
        import ray

        from wam.datasets.distributed import ActorGroup, ray_session

        self._session = ray_session(num_cpus=self.workers * self.threads, address=self.ray_address)
        self._session.__enter__()
        n_cpu = ray.available_resources().get("CPU", 1)
        self._cpus_per = min(float(self.threads), max(0.01, n_cpu / self.workers))
        self._Worker = ray.remote(num_cpus=self._cpus_per)(_PlannerWorker)
        self._model_ref = ray.put(self.model)
        self._fault = faults.die_on("plan")
        self._group = ActorGroup(
            self._new_actor, self.workers, self.max_retries, describe=lambda c: f"planner chunk {c}",
            give_up=lambda c: (f"planner chunk {c} killed its worker {self.max_retries + 1} times; giving up "
                               "(check the workers' memory and logs)"))
        log.info("planner pool: %d actors (%.2f CPU each), K=%d H=%d, chunks of %d requests", self.workers,
                 self._cpus_per, self.settings.beam_width, self.settings.horizon, self.batch_size)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._group is not None:
            self._group.kill()
            self._group = None
        if self._session is not None:
            self._session.__exit__(*exc)
            self._session = None

    def _new_actor(self) -> Any:
        return self._Worker.remote(self._model_ref, self.settings, self.threads, self._fault)

    def warmup(self) -> None:
        """Wait until every actor has built its model (so timings exclude start-up)."""
        import ray

        ray.get([a.ping.remote() for a in self._group.actors])

    # ----------------------------------------------------------------------------------- plan
    def plan(self, requests: Sequence[PlanRequest], progress: bool = False) -> list[PlanAnswer]:
        """Plan every request; answers in request order."""
        from tqdm import tqdm

        if self._group is None:
            raise WamError("PlannerPool is not started; use it as `with PlannerPool(...) as pool:`")
        t0 = time.perf_counter()
        chunks = [list(requests[i:i + self.batch_size]) for i in range(0, len(requests), self.batch_size)]
        results: list[list[PlanAnswer] | None] = [None] * len(chunks)
        todo = list(range(len(chunks)))[::-1]  # a stack, chunk 0 on top
        bar = tqdm(total=len(requests), unit="state", disable=not progress, desc="plan", dynamic_ncols=True)
        group = self._group

        def submit(ai: int) -> None:
            if todo:
                c = todo.pop()
                group.submit(ai, c, lambda actor: actor.plan.remote(c, chunks[c]))

        restarts = group.restarts
        group.forget()  # chunk numbers restart at 0 in every call
        try:
            for ai in range(len(group.actors)):
                submit(ai)
            while group:
                ai, c, (_, answers, calls, tokens, secs) = group.next()
                results[c] = answers
                self.stats.model_calls += calls
                self.stats.tokens += tokens
                self.stats.per_chunk_seconds.append(secs)
                bar.update(len(answers))
                submit(ai)
        finally:
            self.stats.restarted_workers += group.restarts - restarts
        bar.close()
        self.stats.requests += len(requests)
        self.stats.chunks += len(chunks)
        self.stats.seconds += time.perf_counter() - t0
        return [a for chunk in results for a in chunk]  # type: ignore[union-attr]


__all__ = ["PlanAnswer", "PlanRequest", "PlannerPool", "PoolStats", "plan_requests"]
