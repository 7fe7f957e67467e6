"""`--workers N [--ray-address ADDR]`: data-parallel training with Ray Train's `TorchTrainer`.

Each of the N workers runs `run_training` (the same code as a single process): Ray Train starts the
processes and initialises `torch.distributed` (gloo on CPU, NCCL on GPU); the `Trainer` sees several
processes and wraps the objective in DDP. Every worker takes `batch_size / N` segments per
micro-batch from its own data stream (sampler seed + rank; with `--data synthetic` the workers share
the single-process batch row by row), so one step of N workers trains on the same number of segments
as one process. Rank 0 writes `metrics.jsonl` and the checkpoints into `--out`, which therefore must
be on a filesystem every worker (and the driver) sees; a checkpoint holds every rank's data position,
so `--resume` with the same `--workers` continues exactly where the run stopped. Every worker calls
`ray.train.report` at each log step (the same number of times, as Ray requires).

Ray is imported only here, inside the functions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _worker_loop(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker."""
    import ray.train

    from wam.runs.train_cmds import run_training

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config.get("threads_per_worker")
    if threads:
        import torch

        torch.set_num_threads(threads)

    def report(step: int, logs: dict[str, float]) -> None:
        ray.train.report({"step": step, **logs})

    run_training(config["cfg"], rank=rank, world=world, on_log=report)


def train_with_ray(cfg: Any, workers: int, address: str | None = None, threads_per_worker: int | None = None) -> Any:
    """Train `cfg` (a PretrainConfig or FinetuneConfig) on `workers` Ray Train workers; returns Ray's Result.

    Uses a running Ray session (or the cluster at `address`), else starts a local one with `workers` CPUs.
    """
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from wam.datasets.distributed import ray_session

    use_gpu = torch.cuda.is_available()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if threads_per_worker is None and not use_gpu:
        threads_per_worker = max(1, (os.cpu_count() or 1) // workers) if address is None else None
    log.info("Ray Train: %d workers (%s), run directory %s", workers, "GPU/NCCL" if use_gpu else "CPU/gloo", out)
    with ray_session(num_cpus=workers, address=address):
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"cfg": cfg, "threads_per_worker": threads_per_worker},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name="ray-train", storage_path=str(out / "ray")),
        )
        import signal

        previous = signal.getsignal(signal.SIGINT)
        try:
            return trainer.fit()
        finally:  # Ray Train installs its own SIGINT handler and leaves it behind
            signal.signal(signal.SIGINT, previous)
