"""`wam eval`: score an agent on Atari games with Ray-distributed rollouts (see docs/evaluation.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate an agent for N episodes per game on Ray workers; writes episodes.csv and results.json to --out."""

    agent: str = "random"
    """`random`, `scripted` (the RAM-reading behaviour policy), or a run directory / checkpoint of a trained agent."""
    game: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Games to evaluate on; repeat the flag: --game Pong --game Breakout (at least one)."""
    episodes: int = 16
    """Episodes per game."""
    workers: int = 2
    """Ray worker actors (each runs environments and a copy of the agent on CPU)."""
    protocol: Literal["jowa", "machado"] = "jowa"
    """jowa: no sticky actions, 108,000 agent-step cap; machado: sticky actions 0.25, 27,000 agent steps."""
    epsilon: float | None = None
    """Epsilon-greedy exploration at evaluation; default: the protocol's (0.001)."""
    plan: Literal["none", "beam"] = "none"
    """Plan at act time with beam search in the world model (model agents only; random/scripted ignore it)."""
    beam_width: int = 2
    """Beam width K of the planner (with --plan beam)."""
    horizon: int = 2
    """Imagined steps H of the planner (with --plan beam)."""
    plan_backup: Literal["mean", "leaf"] = "mean"
    """Planned value of a candidate: the mean of its value expansions over horizons 0..H (`mean`, keeps Q's
    ranking where the model's imagination ignores the action) or the H-step one alone (`leaf`, JOWA)."""
    video: bool = False
    """Record the first episode of each game as a video (MP4, or GIF where MP4 cannot be encoded)."""
    max_steps: int | None = None
    """Cap every episode at this many agent steps (below the protocol's cap; for tests and demos)."""
    envs_per_worker: int = 4
    """Episodes each worker plays in lockstep (one batched agent call per step). `wam bench eval`, debug model
    on one core: greedy 319 steps/s with 1, 558 with 4; planning 36 with 1, 94 with 4, 175 with 16."""
    seed: int = 0
    """Seed: episode j of game g is seeded from (seed, g, j), whatever the number of workers."""
    out: Path = Path("eval")
    """Output directory; running again with the same settings resumes an interrupted evaluation."""
    ray_address: str | None = None
    """Address of a running Ray cluster (default: start a local one with --workers CPUs)."""
    progress: bool = True
    """Show a progress bar."""
    memory: Literal["window", "episode"] = "window"
    """Model agents: `window` re-encodes the last context frames each step; `episode` carries a recurrent
    core's state (mamba, mamba2, atlas) through the whole episode."""
    context: int | None = None
    """Model agents: frames in the window (default: the model's horizon, less the planner's)."""
    bf16: bool = False
    """Model agents: run the model under bf16 autocast."""
    support_threshold: float | None = None
    """Model agents with a behaviour prior: act only on actions with pi_b(a | s) >= this x the most likely
    action's (discrete BCQ's filter; default: the model's `support_threshold`)."""
    behaviour_prior: float | None = None
    """Model agents with a behaviour prior: act on E[Q] + this x log pi_b (default: the model's
    `behaviour_prior`, the tau it was trained with; larger stays closer to the data's policy)."""


def eval_command(cfg: EvalConfig) -> int:
    from wam.agents.evaluate import evaluate as run_eval
    from wam.planning.beam import PlannerSettings

    plan = PlannerSettings(cfg.beam_width, cfg.horizon, backup=cfg.plan_backup) if cfg.plan == "beam" else None
    if plan is not None and cfg.agent in ("random", "scripted"):
        print(f"note: the {cfg.agent} agent has no model to plan with; --plan is recorded but ignored")
    result = run_eval(cfg.agent, cfg.game, episodes=cfg.episodes, workers=cfg.workers, protocol=cfg.protocol,
                      seed=cfg.seed, epsilon=cfg.epsilon, plan=plan, out_dir=cfg.out, video=cfg.video,
                      progress=cfg.progress, max_steps=cfg.max_steps, envs_per_worker=cfg.envs_per_worker,
                      ray_address=cfg.ray_address, agent_kwargs=agent_kwargs(cfg))
    print(format_summary(result.summary))
    print(f"{result.episodes_run} episodes, {result.steps} agent steps in {result.seconds:.1f}s "
          f"({result.steps_per_second:.0f} steps/s); restarted workers: {result.restarted_workers}")
    print(f"wrote {cfg.out / 'episodes.csv'} and {cfg.out / 'results.json'}")
    for game, path in result.videos.items():
        print(f"video of {game}: {path}")
    return 0 if result.complete else 1


def agent_kwargs(cfg: EvalConfig) -> dict:
    """Options for model agents; left out when unset so baselines see none."""
    if cfg.agent in ("random", "scripted"):
        return {}
    kw: dict = {}
    if cfg.memory != "window":
        kw["memory"] = cfg.memory
    if cfg.context is not None:
        kw["context"] = cfg.context
    if cfg.bf16:
        kw["bf16"] = True
    if cfg.support_threshold is not None:
        kw["support_threshold"] = cfg.support_threshold
    if cfg.behaviour_prior is not None:
        kw["behaviour_prior"] = cfg.behaviour_prior
    return kw


def format_summary(summary: dict) -> str:
    """A plain-text table of per-game scores and the HNS aggregates of a `metrics.summarize` result."""
    lines = [f"{'game':<16} {'eps':>4} {'return (95% CI)':>32} {'HNS (95% CI)':>28}"]
    for g, s in summary.get("games", {}).items():
        r = s["return"]
        ret = f"{r['point']:.1f} [{r['low']:.1f}, {r['high']:.1f}]"
        h = s["hns"]
        hns = f"{h['point']:.3f} [{h['low']:.3f}, {h['high']:.3f}]" if h else "n/a"
        lines.append(f"{g:<16} {s['episodes']:>4} {ret:>32} {hns:>28}")
    for name, v in summary.get("hns_aggregates", {}).items():
        lines.append(f"{name + ' HNS':<21} {v['point']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
    return "\n".join(lines)
