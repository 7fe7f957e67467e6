"""`wam recipe`: the `small` recipe, evidence that the world-action model learns (CPU, about an hour).

Where `wam demo` shows that every stage runs, the recipe asks whether the result is any good. It runs
the same `wam` commands as a user would, at the `small` preset, with several training seeds:

 1. collect scripted-policy data with 30 % random actions (the behaviour data) for two pretraining games
    and one held-out game, plus a little random-policy data (only for the tokenizer);
 2. train the VQ tokenizer, fill the token caches and probe the tokens for the objects' positions
    (`wam tokenizer probe`, on the recorded RAM);
 3. train, two processes at a time (one torch thread each): for every seed a pretraining on the two games,
    a fine-tuning run from it and a from-scratch run on the held-out game's first few thousand transitions
    (`--no-seeded-pretraining`: one pretraining that every seed fine-tunes from); every run holds the last
    `--calibration-episodes` episodes of each dataset out and logs its Q against their Monte-Carlo returns at
    every checkpoint step;
 4. evaluate with Ray rollouts, capped episodes: random and the behaviour policy on all three games; the
    model agent (pretrained on the pretraining games, fine-tuned on the held-out one) with and without
    beam-search planning; the from-scratch agent on the held-out game;
 5. check the three claims of issue 9 against the numbers and write `claims.md` / `claims.json`, run
    `wam diagnose` (Q against Monte-Carlo returns, action histograms, on the held-out episodes) on every
    pretrained model and on the first seed's fine-tuned and from-scratch models, then `wam report` with its plots.

The claims, each with a 95 % bootstrap confidence interval (seeds resampled, then episodes within each seed;
games kept fixed):

- **beats its data**: the agent's mean return is above the mean return of its behaviour data (over
  the same number of agent steps as an evaluation episode) on at least 2 of the 3 games;
- **planning helps**: the mean over games of the HNS difference with - without planning is >= 0;
- **pretraining helps**: pretrained + fine-tuned is above from-scratch on the held-out game.

A claim "holds" when its point estimate is on the right side, and is "supported" when the whole
interval is. Re-running resumes: finished stages, runs and evaluations are reused.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import tyro

from wam.agents.metrics import seed_diff_ci, seed_mean_ci
from wam.datasets.errors import WamError
from wam.runs.claims import behaviour_data_returns, claims_markdown, episode_rows, verdict
from wam.runs.jobs import Job, finished, run_jobs


@dataclass
class RecipeConfig:
    """Run the `small` recipe: pretrain, fine-tune over several seeds, evaluate, check the claims (CPU, ~1 h)."""

    out: Path = Path("small_out")
    """Directory for every artefact (datasets, runs, evaluations, report)."""
    preset: str = "small"
    """Preset of the world-action model and its training."""
    tokenizer_preset: str = "small"
    """Tokenizer preset: `small` (36 tokens of a 1,024-code book, one residual block per level, minutes on
    2 cores) or `debug` (no residual blocks, about half the time; the recipe's tokenizer before 2026-12-07)."""
    pretrain_games: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Games the model is pretrained on (repeat the flag; none given: Freeway and Boxing)."""
    finetune_game: str = "Pong"
    """Held-out game for fine-tuning."""
    steps_per_game: int = 30_000
    """Behaviour-data transitions collected per pretraining game (scripted policy, --epsilon random actions)."""
    finetune_game_steps: int = 15_000
    """Behaviour-data transitions collected for the held-out game (fine-tuning uses the first --transitions)."""
    random_steps_per_game: int = 4000
    """Random-policy transitions per game, used only to train the tokenizer."""
    epsilon: float = 0.3
    """Fraction of random actions in the behaviour data."""
    transitions: int = 5000
    """Transitions of the held-out game used for fine-tuning and for the from-scratch baseline."""
    tokenizer_steps: int = 9000
    """Optimiser steps of the tokenizer (9,000 draw Pong's ball and place its x to 5.5 px; 3,000 did not:
    docs/tokenizer.md)."""
    pretrain_steps: int = 4000
    """Optimiser steps of pretraining."""
    finetune_steps: int = 1500
    """Optimiser steps of each fine-tuning and from-scratch run."""
    seeded_pretraining: bool = True
    """One pretraining per seed (`runs/pretrain-seedS`, seed S), each evaluated with that seed and fine-tuned
    with it, so the CIs carry the spread between pretrainings (which moved greedy Boxing from -1.8 to 31.2
    between runs). `--no-seeded-pretraining`: one pretraining (`runs/pretrain`, seed 0) that every seed
    evaluates and fine-tunes from: (seeds - 1) fewer pretrainings, ~40 min of one core each, and CIs on the
    pretraining games that miss that spread."""
    lambda_cql: float | None = None
    """Weight of the CQL regulariser in every run (none given: the preset's, 0.01 for `small`; JOWA used 0.1)."""
    n_step: int | None = None
    """Rewards summed before the TD target bootstraps (none given: the preset's, JOWA's 1)."""
    double_q: bool | None = None
    """Double-DQN targets (none given: the preset's, off as in JOWA). The ablation run in
    docs/results/small-nstep4-double-cql1 used --lambda-cql 1.0 --n-step 4 --double-q True."""
    bootstrap: Literal["max", "data"] | None = None
    """Action the TD target bootstraps from: `max` (Q-learning, JOWA) or `data` (in-sample); none given: the
    preset's (`data` for `small`)."""
    mc_mix: float | None = None
    """Share of the TD target taken from the data's own Monte-Carlo return (mixed Monte-Carlo targets,
    docs/training.md); none given: the preset's."""
    behaviour_prior: float | None = None
    """Acting weight tau of the behaviour prior in every evaluation of a wam model (`wam eval
    --behaviour-prior`; acting only, the training is unchanged); none given: the tau each model was trained
    with (its preset's)."""
    calibration_episodes: int = 2
    """Last episodes of each dataset held out of every training run: Q calibration on them is logged at every
    checkpoint step and `wam diagnose` reads them after training."""
    seeds: Annotated[list[int], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Training seeds of the fine-tuned and from-scratch runs, each also seeding its evaluation episodes (repeat
    the flag; none given: 0, 1 and 2)."""
    eval_episodes: int = 4
    """Evaluation episodes per game and seed."""
    plan_episodes: int = 2
    """Evaluation episodes per game and seed with planning (planning costs ~K*H model passes per step)."""
    eval_max_steps: int = 1000
    """Cap on the agent steps of an evaluation episode; the behaviour data is scored over as many steps."""
    beam_width: int = 2
    """Beam width K of the planner."""
    plan_horizon: int = 2
    """Imagined steps H of the planner."""
    parallel: int = 2
    """Training processes run at the same time (one torch thread each)."""
    workers: int = 2
    """Ray workers for collection and evaluation."""
    core: str = "transformer"
    """Sequence core of the world-action model."""
    baseline: bool = True
    """Train d3rlpy's DiscreteCQL on each game's data (the data and held-out episodes its agents train on; the
    held-out game's first --transitions), evaluate it like the agents and add "wam vs DiscreteCQL" to the
    claims. Needs `.venv-baselines` (`make baselines`); without it the stage is skipped with a note."""
    baseline_steps: int = 5000
    """Gradient steps of each DiscreteCQL run (about the wall-clock of one fine-tuning run on 2 CPU cores)."""
    fresh: bool = False
    """Delete a previous recipe directory first (otherwise finished work is reused)."""
    until: int = 5
    """Stop after this stage (1 collect, 2 tokenizer, 3 train, 4 evaluate, 5 claims + report); a later run
    with a higher --until resumes from there."""

    def __post_init__(self) -> None:
        # repeated flags replace these defaults rather than appending to them
        self.pretrain_games = list(self.pretrain_games) or ["Freeway", "Boxing"]
        self.seeds = list(self.seeds) or [0, 1, 2]
        if self.calibration_episodes < 0:
            raise WamError(f"--calibration-episodes must be >= 0, got {self.calibration_episodes}")
        if not 1 <= self.until <= 5:
            raise WamError(f"--until names a stage from 1 to 5, got {self.until}")


# ------------------------------------------------------------------------------------------ recipe
@dataclass
class Recipe:
    cfg: RecipeConfig

    def p(self, *parts: str) -> Path:
        return self.cfg.out.joinpath(*parts)

    @property
    def games(self) -> list[str]:
        return [*self.cfg.pretrain_games, self.cfg.finetune_game]

    def behaviour_data(self, game: str) -> Path:
        """The scripted (+ --epsilon random actions) dataset of a game: what every model trains on."""
        from wam.datasets.collect import dataset_name
        from wam.datasets.store import dataset_dir

        return dataset_dir(self.p("data"), game, dataset_name("scripted", self.cfg.epsilon))

    def collect(self) -> str:
        from wam.runs.demo import run_wam

        c = self.cfg
        for games, steps in ((c.pretrain_games, c.steps_per_game), ([c.finetune_game], c.finetune_game_steps)):
            flags = [a for g in games for a in ("--game", g)]
            run_wam("data", "collect", *flags, "--policy", "scripted", "--epsilon", c.epsilon,
                 "--steps", steps * len(games), "--workers", c.workers, "--seed", 0, "--out", self.p("data"))
        flags = [a for g in self.games for a in ("--game", g)]
        run_wam("data", "collect", *flags, "--policy", "random", "--steps", c.random_steps_per_game * len(self.games),
             "--workers", c.workers, "--seed", 1, "--out", self.p("data"))
        run_wam("data", "validate", self.p("data"))
        return f"{len(self.games)} games"

    def tokenizer(self) -> str:
        from wam.runs.demo import run_wam, tokenizer_summary
        from wam.worldmodel.tokenizer import load_tokenizer

        run = self.p("runs", "tokenizer")
        run_wam("tokenizer", "train", "--preset", self.cfg.tokenizer_preset, "--data", self.p("data"), "--out", run,
             "--steps", self.cfg.tokenizer_steps, *(["--resume"] if (run / "checkpoints").exists() else []))
        run_wam("tokenize", "--tokenizer", run, "--data", self.p("data"))
        probe = self.p("runs", "tokenizer-probe")
        if not (probe / "probe.json").is_file():  # the state probe (docs/probe.md), about 7 min on 2 cores
            run_wam("tokenizer", "probe", run, "--data", self.p("data"), "--out", probe)
        return tokenizer_summary(load_tokenizer(run).extra)

    def pretrain_run(self, seed: int) -> Path:
        """The pretraining that seed `seed` evaluates and fine-tunes from."""
        return self.p("runs", f"pretrain-seed{seed}" if self.cfg.seeded_pretraining else "pretrain")

    def pretrainings(self) -> dict[int, Path]:
        """Every pretraining the recipe trains, by its training seed: one per seed, or the one seed-0 run."""
        return {s: self.pretrain_run(s) for s in (self.cfg.seeds if self.cfg.seeded_pretraining else [0])}

    def training_jobs(self) -> list[Job]:
        """Pretraining (per seed, or once), then fine-tuning from it and from scratch for every seed (wam
        command lines)."""
        c = self.cfg
        tok = str(self.p("runs", "tokenizer"))
        common = ["--preset", c.preset, "--calibration-episodes", str(c.calibration_episodes)]
        if c.lambda_cql is not None:
            common += ["--lambda-cql", str(c.lambda_cql)]
        if c.n_step is not None:
            common += ["--n-step", str(c.n_step)]
        if c.double_q is not None:
            common.append("--double-q" if c.double_q else "--no-double-q")
        if c.bootstrap is not None:
            common += ["--bootstrap", c.bootstrap]
        if c.mc_mix is not None:
            common += ["--mc-mix", str(c.mc_mix)]
        pre_data = [a for g in c.pretrain_games for a in ("--data", str(self.behaviour_data(g)))]
        jobs = []
        for s, pre in self.pretrainings().items():
            jobs.append(Job(pre.name, ["pretrain", *common, *pre_data, "--tokenizer", tok, "--core", c.core,
                                       "--steps", str(c.pretrain_steps), "--seed", str(s), "--out", str(pre)],
                            pre, c.pretrain_steps))
        ft = ["--data", str(self.behaviour_data(c.finetune_game)), "--game", c.finetune_game,
              "--transitions", str(c.transitions), "--tokenizer", tok, "--steps", str(c.finetune_steps)]
        for s in c.seeds:
            run = self.p("runs", f"scratch-seed{s}")
            jobs.append(Job(f"scratch-seed{s}", ["finetune", "--from", "scratch", "--core", c.core, *common, *ft,
                                                  "--seed", str(s), "--out", str(run)], run, c.finetune_steps))
        for s in c.seeds:
            run, pre = self.p("runs", f"finetune-seed{s}"), self.pretrain_run(s)
            jobs.append(Job(f"finetune-seed{s}", ["finetune", "--from", str(pre), *common, *ft, "--seed", str(s),
                                                   "--out", str(run)], run, c.finetune_steps, after=(pre.name,)))
        if self.baseline_available():
            for g in self.games:
                run = self.p("runs", f"cql-{g.lower()}")
                cut = ["--transitions", str(c.transitions)] if g == c.finetune_game else []
                jobs.append(Job(f"cql-{g.lower()}", ["baseline", "train", "--algo", "discrete-cql", "--data",
                                                      str(self.behaviour_data(g)), *cut, "--hold-out-episodes",
                                                      str(c.calibration_episodes), "--steps", str(c.baseline_steps),
                                                      "--seed", "0", "--threads", "1", "--out", str(run)],
                                 run, c.baseline_steps, resumable=False))
        return jobs

    def baseline_available(self) -> bool:
        """Whether the d3rlpy baseline runs: asked for, and `.venv-baselines` exists (a note says why not)."""
        if not self.cfg.baseline:
            return False
        from wam.runs.baseline_cmds import baselines_python

        try:
            baselines_python()
        except WamError as e:
            print(f"note: the DiscreteCQL baseline is skipped: {e}")
            return False
        return True

    def train(self) -> str:
        jobs = self.training_jobs()
        # pretraining first: the fine-tuning runs wait for theirs, the from-scratch runs fill the free slots
        run_jobs(jobs, self.cfg.parallel)
        return f"{len(jobs)} runs"

    def _eval(self, name: str, agent: str | Path, games: list[str], episodes: int, seed: int,
              extra: Sequence[object] = (), model: bool = True) -> Path:
        """`wam eval` of `agent` into eval/NAME unless done already. A wam model (`model`) acts with
        --behaviour-prior when the recipe sets one; a finished evaluation made with another is refused."""
        from wam.runs.demo import run_wam

        out = self.p("eval", name)
        tau = self.cfg.behaviour_prior if model else None
        if (out / "results.json").exists():
            had = json.loads((out / "eval_config.json").read_text()).get("agent_kwargs", {}).get("behaviour_prior")
            if had != tau:
                def say(t: float | None) -> str:
                    return "the model's own" if t is None else str(t)
                raise WamError(f"{out} was evaluated with behaviour prior {say(had)} and this recipe asks for "
                               f"{say(tau)}; move {self.p('eval')}, {self.p('merged')} and {self.p('report')} "
                               "away to evaluate again, or pass the same --behaviour-prior")
        else:
            tau_flag = [] if tau is None else ["--behaviour-prior", tau]
            run_wam("eval", "--agent", agent, *[a for g in games for a in ("--game", g)], "--episodes", episodes,
                 "--workers", self.cfg.workers, "--envs-per-worker", 2, "--max-steps", self.cfg.eval_max_steps,
                 "--seed", seed, "--out", out, *extra, *tau_flag)
        return out

    def evaluate(self) -> str:
        c = self.cfg
        plan = ["--plan", "beam", "--beam-width", c.beam_width, "--horizon", c.plan_horizon]
        n = c.eval_episodes * len(c.seeds)
        self._eval("random", "random", self.games, n, 0, model=False)
        self._eval("behaviour", "scripted", self.games, n, 0, model=False)
        for s in c.seeds:
            self._eval(f"pretrained-seed{s}", self.pretrain_run(s), c.pretrain_games, c.eval_episodes, s)
            self._eval(f"pretrained-plan-seed{s}", self.pretrain_run(s), c.pretrain_games, c.plan_episodes, s, plan)
            for kind in ("finetune", "scratch"):
                self._eval(f"{kind}-seed{s}", self.p("runs", f"{kind}-seed{s}"), [c.finetune_game],
                           c.eval_episodes, s)
            self._eval(f"finetune-plan-seed{s}", self.p("runs", f"finetune-seed{s}"), [c.finetune_game],
                       c.plan_episodes, s, plan)
            for g in self.games:  # one trained baseline per game, its episodes seeded like the agents'
                run = self.p("runs", f"cql-{g.lower()}")
                if finished(run, c.baseline_steps):
                    self._eval(f"cql-{g.lower()}-seed{s}", run, [g], c.eval_episodes, s, model=False)
        self._merge()
        return f"{len(list(self.p('eval').iterdir()))} evaluations"

    def _merge(self) -> None:
        """One evaluation directory per agent (all seeds, all games) for `wam report`."""
        c = self.cfg
        groups = {
            "random": ["random"], "behaviour_policy": ["behaviour"],
            "wam": [n for s in c.seeds for n in (f"pretrained-seed{s}", f"finetune-seed{s}")],
            "wam_planning": [n for s in c.seeds for n in (f"pretrained-plan-seed{s}", f"finetune-plan-seed{s}")],
            "from_scratch": [f"scratch-seed{s}" for s in c.seeds],
            "d3rlpy_discrete_cql": [f"cql-{g.lower()}-seed{s}" for s in c.seeds for g in self.games],
        }
        for label, names in groups.items():
            rows = [r for n in names if self.p("eval", n, "episodes.csv").is_file() for r in episode_rows(self.p("eval", n))]
            if not rows:
                continue
            # episode indices must be unique per game within one evaluation
            count: dict[str, int] = {}
            for r in rows:
                r["episode"] = str(count.setdefault(r["game"], 0))
                count[r["game"]] += 1
            out = self.p("merged", label)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "episodes.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    def claims(self) -> dict[str, Any]:
        c = self.cfg
        cap = c.eval_max_steps

        def returns(name: str, game: str) -> np.ndarray:
            return np.asarray([float(r["return"]) for r in episode_rows(self.p("eval", name)) if r["game"] == game])

        def hns(name: str, game: str) -> np.ndarray:
            return np.asarray([float(r["hns"]) for r in episode_rows(self.p("eval", name)) if r["game"] == game])

        def agent_groups(game: str, plan: bool, fn=returns) -> list[np.ndarray]:
            kind = ("pretrained" if game in c.pretrain_games else "finetune") + ("-plan" if plan else "")
            return [fn(f"{kind}-seed{s}", game) for s in c.seeds]

        out: dict[str, Any] = {"cap_steps": cap, "seeds": list(c.seeds), "games": {}}
        beaten = beaten_ci = beaten_diff_ci = 0
        for g in self.games:
            data = behaviour_data_returns(self.behaviour_data(g), cap)
            agent = agent_groups(g, False)
            a_pt = seed_mean_ci(agent)
            d_pt = seed_mean_ci([data])
            diff = seed_diff_ci([data], agent)
            ok = diff[0] > 0
            beaten += ok
            beaten_ci += a_pt[1] > d_pt[0]  # the agent's CI above the data's mean (issue 18's target)
            beaten_diff_ci += diff[1] > 0  # stricter: the difference's CI, the data's own spread included
            out["games"][g] = {
                "role": "pretraining" if g in c.pretrain_games else "held out (fine-tuned)",
                "behaviour_data_return": d_pt, "behaviour_data_episodes": int(data.size),
                "agent_return": a_pt, "agent_episodes": int(sum(x.size for x in agent)),
                "agent_minus_data": diff, "verdict": verdict(diff[1], diff[0]),
                "agent_planning_return": seed_mean_ci(agent_groups(g, True)),
                "random_return": seed_mean_ci([returns("random", g)]),
                "behaviour_policy_return": seed_mean_ci([returns("behaviour", g)]),
            }
        out["beats_data"] = {"games_above": beaten, "of": len(self.games), "holds": beaten >= 2,
                             "games_above_with_ci": beaten_ci, "supported": beaten_ci >= 2,
                             "games_above_with_difference_ci": beaten_diff_ci}
        # planning: mean over games of (HNS with planning - HNS without); games fixed, seeds and episodes resampled
        with_p = [agent_groups(g, True, hns) for g in self.games]
        without = [agent_groups(g, False, hns) for g in self.games]
        d = seed_diff_ci(without, with_p)
        out["planning"] = {"hns_with_minus_without": d, "verdict": verdict(d[1], d[0], strict=False)}
        g = c.finetune_game
        d = seed_diff_ci([returns(f"scratch-seed{s}", g) for s in c.seeds], agent_groups(g, False))
        out["pretraining"] = {"finetuned_minus_scratch_return": d, "verdict": verdict(d[1], d[0]),
                              "finetuned_return": seed_mean_ci(agent_groups(g, False)),
                              "scratch_return": seed_mean_ci([returns(f"scratch-seed{s}", g) for s in c.seeds])}
        # the peer: d3rlpy DiscreteCQL on the same data (one training seed, its episodes seeded like the agents')
        peer: dict[str, Any] = {}
        for g in self.games:
            names = [f"cql-{g.lower()}-seed{s}" for s in c.seeds]
            if not all(self.p("eval", n, "episodes.csv").is_file() for n in names):
                continue
            cql = [returns(n, g) for n in names]
            d = seed_diff_ci(cql, agent_groups(g, False))
            peer[g] = {"cql_return": seed_mean_ci(cql), "agent_minus_cql": d,
                       "verdict": verdict(d[1], d[0], strict=False)}
        out["peer"] = {"games": peer, "steps": c.baseline_steps,
                       "holds": bool(peer) and len(peer) == len(self.games)
                       and all(v["agent_minus_cql"][0] >= 0 for v in peer.values())}
        return out

    def report(self) -> str:
        from wam.runs.demo import run_wam

        claims = self.claims()
        rdir = self.p("report")
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "claims.json").write_text(json.dumps(claims, indent=2))
        (rdir / "claims.md").write_text(claims_markdown(claims, self.cfg))
        c = self.cfg
        first = c.seeds[0]
        # every pretraining (each one's Q calibration), the first seed's fine-tuned and from-scratch models
        targets = [(run.name, c.pretrain_games) for run in self.pretrainings().values()] + [
            (f"finetune-seed{first}", [c.finetune_game]), (f"scratch-seed{first}", [c.finetune_game])]
        for name, games in targets:
            diag = rdir / f"diagnose-{name}"
            if not (diag / "diagnose.json").is_file():  # Q vs Monte-Carlo returns on the held-out episodes
                run_wam("diagnose", self.p("runs", name), *[a for g in games for a in ("--data", self.behaviour_data(g))],
                        "--episodes", max(1, c.calibration_episodes), "--out", diag)
        run_wam("report", *sorted(self.p("merged").iterdir()), self.p("runs"), "--out", rdir)
        probe = self.p("runs", "tokenizer-probe")
        for name in ("probe.md", "probe.json", "probe.png"):
            if (probe / name).is_file():
                shutil.copyfile(probe / name, rdir / name)
        return str(rdir / "claims.md")


def recipe(cfg: RecipeConfig) -> int:
    from wam.runs.demo import Stage, run_stages

    if cfg.finetune_game in cfg.pretrain_games:
        raise WamError(f"the held-out game {cfg.finetune_game} is also a pretraining game; hold out another one")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise WamError(f"--seeds repeats a seed: {cfg.seeds}")
    if cfg.fresh and cfg.out.exists():
        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    r = Recipe(cfg)
    stages = [
        Stage("1 collect (Ray workers)", r.collect),
        Stage("2 tokenizer train + tokenize", r.tokenizer),
        Stage(f"3 train ({cfg.parallel} at a time)", r.train),
        Stage("4 evaluate (Ray rollouts)", r.evaluate),
        Stage("5 claims + report", r.report),
    ]
    run_stages(stages[:cfg.until])
    if cfg.until < len(stages):
        print(f"\nstopped after stage {cfg.until} (--until {cfg.until}); rerun with a higher --until to go on")
        return 0
    print("\n" + (cfg.out / "report" / "claims.md").read_text())
    return 0
