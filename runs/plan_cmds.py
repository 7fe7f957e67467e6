"""`wam plan correct`: plan from dataset states with a trained agent and store corrected Q-values (HDF5).

    wam plan correct --agent RUN --data DIR --out q_targets.h5 [--beam-width 2 --horizon 2 --workers 2]

The file (format in `wam.planning.correct`, docs/planning.md) feeds `wam finetune --q-targets FILE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

log = logging.getLogger(__name__)


@dataclass
class CorrectConfig:
    """Run the beam-search planner over dataset states on Ray workers; write corrected Q-values to --out."""

    agent: str = ""
    """Run directory or checkpoint of a trained world-action model."""
    data: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Dataset directory, or a root holding several (repeatable); the model must know their games."""
    out: Path = Path("q_targets.h5")
    """HDF5 file to write (written to a temp name and renamed when complete)."""
    beam_width: int = 2
    """K: root candidates (top-K legal actions by Q), one beam each."""
    horizon: int = 2
    """H: imagined steps per beam."""
    gamma: float = 0.99
    """Discount of imagined rewards and of the bootstrap Q."""
    reward: Literal["expected", "argmax"] = "expected"
    """Imagined reward: expected value of the sign classes, or the most likely sign."""
    backup: Literal["mean", "leaf"] = "mean"
    """Corrected value: the mean of the value expansions over horizons 0..H (`mean`) or the H-step one (`leaf`)."""
    context: int = 0
    """Frames of history per state (0 = the most that leaves room for the horizon in the model's context)."""
    stride: int = 1
    """Plan from every N-th step of each episode."""
    max_states: int | None = None
    """Plan from a seeded uniform subset of this many states (default: all selected by --stride)."""
    workers: int = 2
    """Ray planner actors (each holds a CPU copy of the model)."""
    batch_size: int = 32
    """States per batched planner call."""
    seed: int = 0
    """Seed of the --max-states subset (planning itself is deterministic)."""
    overwrite: bool = False
    """Replace --out when it exists."""
    ray_address: str | None = None
    """Address of a running Ray cluster (default: start a local session)."""
    progress: bool = True
    """Show a progress bar."""


def correct(cfg: CorrectConfig) -> int:
    from wam.datasets.errors import WamError
    from wam.planning.beam import PlannerSettings
    from wam.planning.correct import correct_q_values

    if not cfg.agent:
        raise WamError("give the trained model with --agent RUN")
    if not cfg.data:
        raise WamError("give at least one dataset with --data DIR")
    settings = PlannerSettings(cfg.beam_width, cfg.horizon, cfg.gamma, cfg.reward, cfg.backup)
    s = correct_q_values(cfg.agent, list(cfg.data), cfg.out, settings, context=cfg.context, stride=cfg.stride,
                         max_states=cfg.max_states, workers=cfg.workers, batch_size=cfg.batch_size, seed=cfg.seed,
                         ray_address=cfg.ray_address, overwrite=cfg.overwrite, progress=cfg.progress)
    print(f"corrected Q at {s.states} states in {s.seconds:.1f}s ({s.states_per_second:.1f} states/s); planning "
          f"changed the greedy action at {s.changed} ({100 * s.changed / max(s.states, 1):.1f}%); wrote {s.out}"
          + (f"; {s.restarted_workers} worker(s) restarted" if s.restarted_workers else ""))
    return 0
