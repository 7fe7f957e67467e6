"""Ray helpers shared by collection, evaluation, the planner pool and training.

Ray is imported inside functions only, so importing this module (or any model code) stays Ray-free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

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
