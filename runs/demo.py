"""`wam demo`: the whole mission end to end on the `debug` preset, on CPU, in minutes.

Stages (each with its own progress bar; any failure stops the demo with a clear message and a
non-zero exit): collect data for three games with Ray workers, validate it, train the tokenizer,
tokenize, pretrain on two games, fine-tune on the held-out one (and from scratch), evaluate with Ray
rollouts with and without planning, write the report. Stages whose code does not exist yet in this
version are listed as skipped, so the demo always says exactly what it ran.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wam.datasets.errors import WamError


@dataclass
class DemoConfig:
    """Run the end-to-end pipeline on the `debug` preset (CPU, a few minutes)."""

    out: Path = Path("demo_out")
    """Directory for every artefact of the demo (datasets, runs, evaluation, report)."""
    pretrain_games: tuple[str, ...] = ("Breakout", "Boxing")
    """Games the world-action model is pretrained on."""
    finetune_game: str = "Pong"
    """Held-out game for fine-tuning."""
    steps_per_game: int = 6000
    """Transitions collected per game and behaviour policy."""
    workers: int = 2
    """Ray workers for collection and evaluation."""
    seed: int = 0
    """Seed of every stage."""
    preset: str = "debug"
    """Model preset."""
    fresh: bool = False
    """Delete a previous demo directory first (otherwise finished stages are resumed/reused)."""


@dataclass
class _Stage:
    name: str
    fn: Callable[[], str]
    needs: tuple[str, ...] = ()  # wam modules the stage needs
    status: str = "pending"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class _Demo:
    cfg: DemoConfig
    stages: list[_Stage] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.cfg.out / "data"

    def collect(self) -> str:
        from wam.datasets.collect import collect

        games = (*self.cfg.pretrain_games, self.cfg.finetune_game)
        lines = []
        for policy, eps in (("scripted", 0.3), ("random", 0.0)):
            s = collect(list(games), policy=policy, epsilon=eps, steps=self.cfg.steps_per_game * len(games),
                        workers=self.cfg.workers, seed=self.cfg.seed, out=self.data)
            lines.append(f"{policy}(eps={eps}): {s.steps} new steps, {s.episodes} episodes, "
                         f"{s.steps_per_second:.0f} steps/s")
        return "; ".join(lines)

    def validate(self) -> str:
        from wam.datasets.store import dataset_info, find_datasets, validate

        dirs = find_datasets([self.data])
        problems = [p for d in dirs for p in validate(d)]
        if problems:
            raise WamError(f"collected data failed validation: {problems[0]}")
        infos = [dataset_info(d) for d in dirs]
        (self.cfg.out / "data_info.json").write_text(json.dumps(infos, indent=2, default=str))
        return f"{len(dirs)} datasets sound"


def _run_stage(stage: _Stage) -> None:
    missing = [m for m in stage.needs if importlib.util.find_spec(m) is None]
    if missing:
        stage.status, stage.detail = "skipped", f"not built yet ({', '.join(missing)})"
        return
    t0 = time.perf_counter()
    print(f"\n=== {stage.name} ===", flush=True)
    stage.detail = stage.fn()
    stage.seconds = time.perf_counter() - t0
    stage.status = "ok"


def demo(cfg: DemoConfig) -> int:
    import shutil

    if cfg.fresh and cfg.out.exists():
        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    d = _Demo(cfg)
    d.stages = [
        _Stage("collect (Ray workers, 3 games, scripted+eps and random)", d.collect, ("wam.datasets.collect",)),
        _Stage("validate", d.validate, ("wam.datasets.store",)),
    ]
    t0 = time.perf_counter()
    for stage in d.stages:
        try:
            _run_stage(stage)
        except WamError:
            stage.status = "FAILED"
            _print_summary(d.stages, time.perf_counter() - t0)
            raise
    _print_summary(d.stages, time.perf_counter() - t0)
    return 0


def _print_summary(stages: list[_Stage], total: float) -> None:
    print("\n" + "=" * 100)
    print(f"{'stage':<58} {'status':<8} {'time':>7}  detail")
    for s in stages:
        print(f"{s.name:<58} {s.status:<8} {s.seconds:6.1f}s  {s.detail}")
    print(f"total {total:.1f}s")
