"""Ray helpers shared by collection, evaluation, the planner pool and training.

Ray is imported inside functions only, so importing this module (or any model code) stays Ray-free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)

WORKER_NICENESS = 0
"""Niceness of the worker processes of a local Ray session (Ray's default is 15)."""


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, address: str | None = None,
                temp_dir: str | None = None) -> Iterator[None]:
    """Use the running Ray session, or start a local one for the duration of the block.

    A local session gets explicit CPUs, no dashboard and its own temp dir (short, because Ray's
    socket paths must fit in 107 bytes); it is shut down on exit. A session that was already
    running (a test fixture, a cluster) is left alone.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ncpu = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
        tmp = temp_dir or tempfile.mkdtemp(prefix="wamray-", dir="/tmp")
        # Ray starts its workers at niceness 15 by default, so any other busy process on the machine
        # (a training run, this driver) takes nearly all the CPU from them: a 1-worker evaluation ran
        # 2 agent steps/s beside two training processes against 90 in-process. Workers run at 0 here.
        ray.init(num_cpus=ncpu, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024, configure_logging=False,
                 _system_config={"worker_niceness": WORKER_NICENESS})
    try:
        yield
    finally:
        ray.shutdown()


class ActorGroup:
    """A fixed set of Ray actors running units of work, each unit re-run on a fresh actor when its actor died.

    The one fault-handling loop of collection, evaluation and the planner pool: `submit(ai, key, call)` runs
    `call(actor)` (which returns an ObjectRef) on actor `ai`; `next()` waits for any unit and returns
    (actor index, key, value). A unit whose actor died (`RayActorError`: a crash, out of memory, a killed
    process) is re-run on a new actor from `new_actor()`, at most `max_retries` times per key, then a
    `WamError` with `give_up(key)`. A unit that raised a `WamError` inside the actor re-raises it here (the
    user's error, not a traceback from a worker); other task errors propagate as they are.
    """

    def __init__(self, new_actor, workers: int, max_retries: int, describe=str, give_up=None) -> None:
        self.new_actor, self.max_retries, self.describe = new_actor, max_retries, describe
        self.give_up = give_up or (lambda key: f"workers died {max_retries + 1} times on {describe(key)}")
        self.actors = [new_actor() for _ in range(workers)]
        self.inflight: dict = {}  # ref -> (actor index, key, call)
        self.retries: dict = {}  # key -> restarts
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.inflight)

    def busy(self) -> set[int]:
        """Indices of the actors that have a unit in flight."""
        return {ai for ai, _, _ in self.inflight.values()}

    def submit(self, ai: int, key, call) -> None:
        self.inflight[call(self.actors[ai])] = (ai, key, call)

    def next(self):
        """(actor index, key, value) of the next finished unit; restarts dead actors on the way."""
        import ray

        from wam.datasets.errors import WamError

        while True:
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            ai, key, call = self.inflight.pop(ready[0])
            try:
                return ai, key, ray.get(ready[0])
            except ray.exceptions.RayActorError:
                self.restarts += 1
                self.retries[key] = self.retries.get(key, 0) + 1
                if self.retries[key] > self.max_retries:
                    raise WamError(self.give_up(key)) from None
                log.warning("worker %d died on %s; restarting it and re-running it", ai, self.describe(key))
                self.actors[ai] = self.new_actor()
                self.submit(ai, key, call)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, WamError):
                    raise e.cause from None
                raise

    def forget(self) -> None:
        """Start a new round of units on the same actors: drop the retry counts and any unit still in flight (left
        by a round that raised; it is not waited for)."""
        self.retries.clear()
        self.inflight.clear()

    def kill(self) -> None:
        """Stop every actor (their units in flight are dropped)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.inflight.clear()
