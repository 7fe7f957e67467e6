"""`wam demo`: the whole mission end to end on the `debug` preset, on CPU, in minutes.

Every stage runs the same `wam` command a user would type (printed before it runs), so the demo is also a
tour of the CLI:

 1. collect data for three games with Ray workers (scripted policy + 30 % random actions, and random);
 2. validate the datasets;
 3. train the VQ tokenizer and fill the token caches;
 4. pretrain the world-action model on two games;
 5. fine-tune it on the held-out game from its first few thousand transitions, train the same model from
    scratch on the same data, and a behaviour-cloning baseline;
 6. evaluate on the held-out game with Ray rollouts: random, the behaviour policy, behaviour cloning,
    from-scratch, fine-tuned without planning and fine-tuned with beam-search planning;
 7. write `report.md` with its plots.

A stage that fails stops the demo with a non-zero exit and a message naming the stage; the summary table
printed at the end has the honest numbers (mean return with a bootstrap confidence interval). Re-running
reuses finished stages (collection and training resume); `--fresh` starts over.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wam.datasets.errors import WamError

BEHAVIOUR_EPSILON = 0.3
"""Random-action fraction of the scripted behaviour data the demo collects and trains on."""


@dataclass
class DemoConfig:
    """Run the end-to-end pipeline on the `debug` preset (CPU, a few minutes)."""

    out: Path = Path("demo_out")
    """Directory for every artefact of the demo (datasets, runs, evaluations, report)."""
    pretrain_games: tuple[str, ...] = ()
    """Games the world-action model is pretrained on (repeat the flag; none given: Breakout and Boxing)."""
    finetune_game: str = "Pong"
    """Held-out game for fine-tuning."""
    steps_per_game: int = 4000
    """Transitions collected per game and behaviour policy."""
    finetune_transitions: int = 3000
    """Transitions of the held-out game used for fine-tuning (per dataset)."""
    tokenizer_steps: int = 1500
    """Optimiser steps of the tokenizer."""
    pretrain_steps: int = 3000
    """Optimiser steps of pretraining."""
    finetune_steps: int = 800
    """Optimiser steps of fine-tuning (and of the from-scratch and BC baselines)."""
    finetune_batch_size: int = 32
    """Segments per optimiser step of fine-tuning, from-scratch and BC. The `debug` preset's 8 left the
    from-scratch Q agent at -21 on Pong (it never returned the ball); 32 segments for 800 steps gave -9
    (docs/recipes.md, "The demo")."""
    plan_backup: Literal["leaf", "mean"] = "leaf"
    """Backup of the planning row (`wam eval --plan-backup`): `leaf` (JOWA's: imagined rewards plus the leaf's
    value) or `mean` (wam's default). On the demo's Pong, fine-tuned model, seeds 0 and 1: leaf -7.7 / -5.8
    against greedy -10.2 / -7.7, mean -9.0 / -9.5 (docs/recipes.md); on Boxing mean did better (docs/planning.md).
    JOWA too chooses its planner's settings per game."""
    eval_episodes: int = 6
    """Evaluation episodes per agent."""
    eval_max_steps: int = 1000
    """Cap on the agent steps of each evaluation episode (keeps the demo short)."""
    workers: int = 2
    """Ray workers for collection and evaluation."""
    core: str = "transformer"
    """Sequence core of the world-action model: transformer, mamba, mamba2 or atlas."""
    seed: int = 0
    """Seed of every stage."""
    fresh: bool = False
    """Delete a previous demo directory first (otherwise finished stages are reused/resumed)."""

    def __post_init__(self) -> None:
        # a repeated flag replaces this default rather than appending to it
        self.pretrain_games = tuple(self.pretrain_games) or ("Breakout", "Boxing")


@dataclass
class Stage:
    name: str
    fn: Callable[[], str]
    status: str = "pending"
    detail: str = ""
    seconds: float = 0.0


def tokenizer_summary(extra: dict) -> str:
    """One line from a loaded tokenizer's recorded evaluation: PSNR, mean-frame baseline, foreground gains."""
    from wam.worldmodel.tokenizer_train import fg_gains, gains_text

    psnr, base = extra.get("heldout_psnr"), extra.get("baseline_psnr")
    if psnr is None or base is None:
        return "trained"
    gains = fg_gains(extra)
    fg = f"; foreground vs median frame {gains_text(gains)}" if gains else ""
    return f"held-out PSNR {psnr:.1f} dB vs mean-frame {base:.1f} dB{fg}"


def run_wam(*args: object) -> None:
    """Run one `wam` command in-process, exactly as typed on the command line."""
    from wam.runs.cli import run_command

    argv = [str(a) for a in args]
    print(f"$ wam {shlex.join(argv)}", flush=True)
    code = run_command(argv)
    if code != 0:
        raise WamError(f"`wam {shlex.join(argv)}` exited with status {code}")


@dataclass
class _Demo:
    cfg: DemoConfig
    evals: dict[str, Path] = field(default_factory=dict)

    def p(self, *parts: str) -> Path:
        return self.cfg.out.joinpath(*parts)

    @property
    def games(self) -> tuple[str, ...]:
        return (*self.cfg.pretrain_games, self.cfg.finetune_game)

    def behaviour_data(self, game: str) -> Path:
        """The scripted (+30 % random actions) dataset of a game: what every model trains on. The random-policy
        data trains the tokenizer only, as in `wam recipe` (with it in the mix the Q agents scored -21 on Pong,
        the worst possible, against -10 without it)."""
        from wam.datasets.collect import dataset_name
        from wam.datasets.store import dataset_dir

        return dataset_dir(self.p("data"), game, dataset_name("scripted", BEHAVIOUR_EPSILON))

    # -- stages ------------------------------------------------------------------------------
    def collect(self) -> str:
        games = [a for g in self.games for a in ("--game", g)]
        for policy, eps in (("scripted", BEHAVIOUR_EPSILON), ("random", 0.0)):
            run_wam("data", "collect", *games, "--policy", policy, "--epsilon", eps,
                 "--steps", self.cfg.steps_per_game * len(self.games), "--workers", self.cfg.workers,
                 "--seed", self.cfg.seed, "--out", self.p("data"))
        return f"{len(self.games)} games x 2 policies x {self.cfg.steps_per_game} steps"

    def validate(self) -> str:
        from wam.datasets.store import find_datasets
        from wam.datasets.validate import dataset_info

        run_wam("data", "validate", self.p("data"))
        infos = [dataset_info(d) for d in find_datasets([self.p("data")])]
        self.p("data_info.json").write_text(json.dumps(infos, indent=2, default=str))
        return f"{len(infos)} datasets sound"

    def tokenizer(self) -> str:
        run = self.p("runs", "tokenizer")
        run_wam("tokenizer", "train", "--preset", "debug", "--data", self.p("data"), "--out", run,
             "--steps", self.cfg.tokenizer_steps,
             *(["--resume"] if (run / "checkpoints").exists() else []))
        run_wam("tokenize", "--tokenizer", run, "--data", self.p("data"))
        from wam.worldmodel.tokenizer import load_tokenizer

        return tokenizer_summary(load_tokenizer(run).extra)

    def _train(self, command: list[object], run: Path) -> None:
        resume = ["--resume"] if (run / "checkpoints").exists() and any((run / "checkpoints").iterdir()) else []
        run_wam(*command, "--out", run, *resume)

    def pretrain(self) -> str:
        data = [a for g in self.cfg.pretrain_games for a in ("--data", self.behaviour_data(g))]
        self._train(["pretrain", "--preset", "debug", *data, "--tokenizer", self.p("runs", "tokenizer"),
                     "--core", self.cfg.core, "--steps", self.cfg.pretrain_steps, "--seed", self.cfg.seed],
                    self.p("runs", "pretrain"))
        return _last_metrics(self.p("runs", "pretrain"))

    def finetune(self) -> str:
        common = ["--preset", "debug", "--data", self.behaviour_data(self.cfg.finetune_game),
                  "--game", self.cfg.finetune_game, "--transitions", self.cfg.finetune_transitions,
                  "--tokenizer", self.p("runs", "tokenizer"), "--steps", self.cfg.finetune_steps,
                  "--batch-size", self.cfg.finetune_batch_size, "--seed", self.cfg.seed]
        self._train(["finetune", "--from", self.p("runs", "pretrain"), *common], self.p("runs", "finetune"))
        self._train(["finetune", "--from", "scratch", "--core", self.cfg.core, *common], self.p("runs", "scratch"))
        self._train(["finetune", "--from", "scratch", "--core", self.cfg.core, "--objective", "bc", *common],
                    self.p("runs", "bc"))
        return "fine-tuned, from-scratch and behaviour-cloning runs"

    def evaluate(self) -> str:
        runs = self.p("runs")
        agents = {
            "random": ("random", []),
            "behaviour (scripted)": ("scripted", []),
            "behaviour cloning": (runs / "bc", []),
            "from scratch": (runs / "scratch", []),
            "pretrained+fine-tuned": (runs / "finetune", []),
            "pretrained+fine-tuned, planning": (runs / "finetune", ["--plan", "beam", "--beam-width", "2",
                                                                    "--horizon", "2", "--plan-backup",
                                                                    self.cfg.plan_backup]),
        }
        for label, (agent, extra) in agents.items():
            out = self.p("eval", label.replace(" ", "_").replace(",", "").replace("+", "_").replace("(", "")
                         .replace(")", ""))
            run_wam("eval", "--agent", agent, "--game", self.cfg.finetune_game, "--episodes", self.cfg.eval_episodes,
                 "--workers", self.cfg.workers, "--envs-per-worker", 2, "--max-steps", self.cfg.eval_max_steps,
                 "--seed", self.cfg.seed, "--out", out, *extra)
            self.evals[label] = out
        return f"{len(agents)} agents x {self.cfg.eval_episodes} episodes on {self.cfg.finetune_game}"

    def report(self) -> str:
        run_wam("report", *self.evals.values(), self.p("runs"), "--out", self.p("report"))
        return str(self.p("report", "report.md"))


def _last_metrics(run: Path) -> str:
    path = run / "metrics.jsonl"
    if not path.exists():
        return ""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    first, last = rows[0], rows[-1]
    keys = [k for k in ("loss", "obs_ce", "td_kl") if k in last]
    return ", ".join(f"{k} {first[k]:.3f}->{last[k]:.3f}" for k in keys)


def _game_summary(out: Path, game: str) -> dict | None:
    """The summary of `game` in the evaluation at `out` (`results.json`); None when it has none yet."""
    path = out / "results.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["summary"]["games"].get(game, {})


def _results_table(evals: dict[str, Path], game: str) -> str:
    lines = [f"{'agent (' + game + ', capped episodes)':<40} {'mean return [95% CI]':>30} {'HNS':>8}  episodes"]
    for label, out in evals.items():
        g = _game_summary(out, game)
        if g is None:
            lines.append(f"{label:<40} {'(missing)':>30}")
            continue
        r = g.get("return", {})
        hns = (g.get("hns") or {}).get("point")
        ci = f"{r.get('point', float('nan')):.1f} [{r.get('low', float('nan')):.1f}, {r.get('high', float('nan')):.1f}]"
        lines.append(f"{label:<40} {ci:>30} {hns if hns is None else f'{hns:.3f}':>8}  {g.get('episodes', 0)}")
    return "\n".join(lines)


Q_AGENTS = ("from scratch", "pretrained+fine-tuned")
"""The demo's trained Q agents (greedy), which must beat random; "pretrained+fine-tuned, planning" must not
fall below "pretrained+fine-tuned"."""


def _mean_return(out: Path, game: str) -> dict[str, float] | None:
    """The mean return with its interval (`point`, `low`, `high`) of `game` in the evaluation at `out`."""
    g = _game_summary(out, game)
    return None if g is None else g.get("return")


def demo_checks(evals: dict[str, Path], game: str) -> list[tuple[str, bool]]:
    """The demo's two conditions, each (line, holds): every trained Q agent's mean return above the upper
    end of random's 95 % interval, and planning's mean return not below the same agent's greedy one."""
    rnd = _mean_return(evals["random"], game)
    checks = []
    for label in Q_AGENTS:
        r = _mean_return(evals[label], game)
        if r is None or rnd is None:
            checks.append((f"{label}: no result", False))
            continue
        ok = r["point"] > rnd["high"]
        checks.append((f"{label} {r['point']:.1f} {'>' if ok else '<='} random's upper bound {rnd['high']:.1f}", ok))
    greedy, planned = (_mean_return(evals[k], game) for k in ("pretrained+fine-tuned", "pretrained+fine-tuned, planning"))
    if greedy is None or planned is None:
        checks.append(("planning: no result", False))
    else:
        ok = planned["point"] >= greedy["point"]
        checks.append((f"planning {planned['point']:.1f} {'>=' if ok else '<'} greedy {greedy['point']:.1f}", ok))
    return checks


def demo(cfg: DemoConfig) -> int:
    if cfg.fresh and cfg.out.exists():
        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    d = _Demo(cfg)
    stages = [
        Stage("1 collect (Ray workers)", d.collect),
        Stage("2 validate", d.validate),
        Stage("3 tokenizer train + tokenize", d.tokenizer),
        Stage(f"4 pretrain ({'+'.join(cfg.pretrain_games)})", d.pretrain),
        Stage(f"5 fine-tune on {cfg.finetune_game} (+ scratch, BC)", d.finetune),
        Stage("6 evaluate (Ray rollouts)", d.evaluate),
        Stage("7 report", d.report),
    ]
    run_stages(stages)
    print("\n" + _results_table(d.evals, cfg.finetune_game))
    print("\nchecks (one seed; docs/recipes.md says how they hold across seeds):")
    for line, ok in demo_checks(d.evals, cfg.finetune_game):
        print(f"  [{'ok' if ok else 'MISSED'}] {line}")
    print(f"\nreport: {cfg.out / 'report' / 'report.md'}")
    return 0


def run_stages(stages: list[Stage]) -> None:
    """Run stages in order with a header each; on a failure mark the rest "not run", print the summary table
    and re-raise (a WamError names the stage). The summary table is printed at the end either way."""
    t0 = time.perf_counter()
    for i, stage in enumerate(stages):
        print(f"\n=== stage {stage.name} ===", flush=True)
        s0 = time.perf_counter()
        try:
            stage.detail = stage.fn()
            stage.status = "ok"
        except BaseException as e:
            stage.status = "FAILED"
            stage.seconds = time.perf_counter() - s0
            for later in stages[i + 1:]:
                later.status = "not run"
            _print_summary(stages, time.perf_counter() - t0)
            if isinstance(e, WamError):
                raise WamError(f"stage '{stage.name}' failed: {e}") from None
            raise
        stage.seconds = time.perf_counter() - s0
    _print_summary(stages, time.perf_counter() - t0)


def _print_summary(stages: list[Stage], total: float) -> None:
    print("\n" + "=" * 100)
    print(f"{'stage':<44} {'status':<8} {'time':>7}  detail")
    for s in stages:
        print(f"{s.name:<44} {s.status:<8} {s.seconds:6.1f}s  {s.detail}")
    print(f"total {total:.1f}s")
