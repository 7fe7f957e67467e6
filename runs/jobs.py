"""Training jobs of a recipe run as `wam` subprocesses, a few at a time, in dependency order.

A job whose final checkpoint exists is skipped; a started resumable job continues with `--resume`; a job
that cannot resume starts again with `--overwrite`. Each job logs to `<run>.log` beside its directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wam.datasets.errors import WamError


@dataclass
class Job:
    """One `wam` training command of a recipe: its run directory, its final step (a run is finished when
    that step's checkpoint exists) and the jobs it waits for."""

    name: str
    argv: list[str]
    run: Path
    steps: int
    after: tuple[str, ...] = ()
    resumable: bool = True  # `--resume` continues a started run; otherwise `--overwrite` starts it again
    proc: subprocess.Popen | None = None
    log: Any = None
    started: float = 0.0


def finished(run: Path, steps: int) -> bool:
    """Whether the run at `run` has saved its checkpoint of step `steps`."""
    return (run / "checkpoints" / f"step_{steps:08d}.pt").exists()


def run_jobs(jobs: list[Job], parallel: int) -> None:
    """Run `wam` training jobs as subprocesses, `parallel` at a time, respecting `after`; resume or skip."""
    from tqdm import tqdm

    done = {j.name for j in jobs if finished(j.run, j.steps)}
    pending = [j for j in jobs if j.name not in done]
    running: list[Job] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    bar = tqdm(total=len(jobs), initial=len(done), desc="training runs", unit="run", dynamic_ncols=True)
    try:
        while pending or running:
            for j in list(pending):
                if len(running) >= parallel:
                    break
                if all(a in done for a in j.after):
                    if j.resumable:  # continue a run that has saved a checkpoint
                        resume = ["--resume"] if (j.run / "checkpoints").exists() else []
                    else:  # start it again over what an interrupted run left
                        resume = ["--overwrite"] if j.run.exists() else []
                    j.run.parent.mkdir(parents=True, exist_ok=True)
                    j.log = open(j.run.parent / f"{j.run.name}.log", "a")  # noqa: SIM115
                    cmd = [sys.executable, "-m", "wam.runs.cli", *j.argv, "--no-progress", *resume]
                    tqdm.write(f"$ wam {' '.join(cmd[3:])}   (log: {j.log.name})")
                    j.proc = subprocess.Popen(cmd, stdout=j.log, stderr=subprocess.STDOUT, env=env)
                    j.started = time.perf_counter()
                    pending.remove(j)
                    running.append(j)
            time.sleep(1.0)
            for j in list(running):
                code = j.proc.poll()
                if code is None:
                    continue
                j.log.close()
                running.remove(j)
                if code != 0:
                    raise WamError(f"training run {j.name} exited with status {code}; see {j.log.name}")
                done.add(j.name)
                bar.update(1)
                tqdm.write(f"{j.name}: done in {time.perf_counter() - j.started:.0f}s")
            if pending and not running and not any(all(a in done for a in j.after) for j in pending):
                raise WamError(f"runs {[j.name for j in pending]} wait for runs that did not finish")
    finally:
        for j in running:
            j.proc.terminate()
            j.proc.wait()
        bar.close()
