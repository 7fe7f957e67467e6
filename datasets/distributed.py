"""Ray helpers shared by collection, evaluation, the planner pool and training.

Ray is imported inside functions only, so importing this module (or any model code) stays Ray-free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


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
        ray.init(num_cpus=ncpu, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
