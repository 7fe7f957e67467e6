"""`wam report DIR... --out REPORT_DIR`: tables and plots from evaluation and training run directories.

Inputs are searched recursively: a directory holding `episodes.csv` is an evaluation (`wam eval`), one
holding `metrics.jsonl` is a training run, and the last (by name) PNG whose name contains `recon`
inside a run is its tokenizer reconstruction grid. Any subset may be present. Written to the output directory:

- `report.md`: evaluations (agent, settings, IQM / mean / median HNS and optimality gap with 95 %
  stratified-bootstrap CIs), per-game raw returns and HNS with CIs, a game x evaluation comparison,
  planning vs no planning and agent-vs-agent IQM differences with CIs, training curves, reconstruction
  grids, links to videos;
- `report.json`: the same numbers, machine-readable;
- PNG plots (matplotlib Agg): `per_game_return.png`, `per_game_hns.png`, `iqm.png`,
  `curves_<run>.png`, and copies of the reconstruction grids.

Every figure is recomputed from the per-episode CSVs (`wam.agents.metrics`), so a report is a pure
function of its inputs and `--seed`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tyro

from wam.datasets.errors import WamError
from wam.runs.report_plots import action_plot, bar_plot, curve_keys, curves_plot, iqm_plot

log = logging.getLogger(__name__)

@dataclass
class ReportConfig:
    """Write report.md (tables, plots, links to videos) from `wam eval` directories and training run directories."""

    dirs: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Evaluation and/or run directories (searched recursively)."""
    out: Path = Path("report")
    """Output directory for report.md, report.json and the PNG plots."""
    bootstrap_reps: int = 2000
    """Stratified-bootstrap replicates for every confidence interval."""
    seed: int = 0
    """Seed of the bootstrap."""


@dataclass
class EvalInput:
    path: Path
    label: str
    records: list
    summary: dict[str, Any]
    status: str
    videos: list[Path]

    @property
    def first(self):
        return self.records[0]

    def plan_label(self) -> str:
        r = self.first
        return "none" if r.plan == "none" else f"{r.plan} K={r.beam_width} H={r.horizon}"


@dataclass
class RunInput:
    path: Path
    label: str
    rows: list[dict[str, Any]]
    recon_grids: list[Path]


# --------------------------------------------------------------------------------------- discovery
def _labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with parents added until the labels are unique."""
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth > 6:
            return labels
        depth += 1


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped (a run killed while writing leaves one)", path, n)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def discover(dirs: list[Path]) -> tuple[list[EvalInput], list[RunInput]]:
    """Evaluations and training runs found under `dirs`."""
    from wam.agents.metrics import read_episodes

    eval_dirs: list[Path] = []
    run_dirs: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise WamError(f"{d} does not exist; give evaluation (`wam eval --out`) or run directories")
        if d.is_file():
            d = d.parent
        eval_dirs += sorted(p.parent for p in [d / "episodes.csv", *d.rglob("*/episodes.csv")] if p.is_file())
        run_dirs += sorted(p.parent for p in [d / "metrics.jsonl", *d.rglob("*/metrics.jsonl")] if p.is_file())
    eval_dirs = list(dict.fromkeys(p.resolve() for p in eval_dirs))
    run_dirs = list(dict.fromkeys(p.resolve() for p in run_dirs))
    evals = []
    for p, label in zip(eval_dirs, _labels(eval_dirs)):
        records = read_episodes(p)
        if not records:
            log.warning("%s has no finished episode; left out", p)
            continue
        status = "complete"
        if (p / "results.json").is_file():
            status = json.loads((p / "results.json").read_text()).get("status", "complete")
        videos = sorted([*p.glob("videos/*.mp4"), *p.glob("videos/*.gif")])
        evals.append(EvalInput(p, label, records, {}, status, videos))
    runs = []
    for p, label in zip(run_dirs, _labels(run_dirs)):
        grids = sorted(g for g in p.rglob("*.png") if "recon" in g.name.lower())[-1:]  # the latest by name
        runs.append(RunInput(p, label, _read_metrics(p / "metrics.jsonl"), grids))
    return evals, runs


# ------------------------------------------------------------------------------------------ tables
def _fmt_iv(iv: dict[str, float] | None, digits: int) -> str:
    if not iv:
        return "n/a"
    return f"{iv['point']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _difference(a: EvalInput, b: EvalInput, games: list[str], reps: int, seed: int) -> dict[str, float]:
    """IQM HNS of b minus a over `games`, with a percentile CI from independent stratified bootstraps."""
    from wam.agents.metrics import bootstrap_replicates, point_estimate, scores_by_game, stat_iqm

    sa = {g: x for g, x in scores_by_game(a.records, "hns").items() if g in games}
    sb = {g: x for g, x in scores_by_game(b.records, "hns").items() if g in games}
    diff = bootstrap_replicates(sb, stat_iqm, reps, seed) - bootstrap_replicates(sa, stat_iqm, reps, seed + 1)
    low, high = np.percentile(diff, [2.5, 97.5])
    return {"point": point_estimate(sb, stat_iqm) - point_estimate(sa, stat_iqm), "low": float(low),
            "high": float(high)}


def _plan_changed_share(records) -> float | None:
    """Share of the agent steps at which planning chose another action than greedy acting would have
    (None when the table does not record it: no planner, or written before `plan_changed` existed)."""
    known = [r for r in records if r.plan_changed is not None]
    steps = sum(r.length for r in known)
    return sum(r.plan_changed for r in known) / steps if known and steps else None


def _common_hns_games(a: EvalInput, b: EvalInput) -> list[str]:
    return sorted(set(a.summary["games_with_hns"]) & set(b.summary["games_with_hns"]))


def _plan_pairs(evals: list[EvalInput]) -> list[tuple[EvalInput, EvalInput]]:
    """(without planning, with planning) pairs of the same agent, checkpoints and protocol."""
    pairs = []
    for a, b in itertools.permutations(evals, 2):
        fa, fb = a.first, b.first
        if fa.plan == "none" and fb.plan != "none" and fa.agent_spec == fb.agent_spec and \
                fa.protocol == fb.protocol and fa.checkpoint_id == fb.checkpoint_id:
            pairs.append((a, b))
    return pairs


# ------------------------------------------------------------------------------------------ helpers
def _action_shares(evals: list, games: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """game -> evaluation label -> legal action name -> share of the steps played (only evaluations whose
    episodes.csv records action counts)."""
    from wam.datasets.atari import ACTION_NAMES, legal_action_mask

    out: dict[str, dict[str, dict[str, float]]] = {}
    for g in games:
        legal = np.flatnonzero(legal_action_mask(g))
        for e in evals:
            counts = [r.action_counts for r in e.records if r.game == g and r.action_counts is not None]
            if not counts:
                continue
            total = np.sum(counts, axis=0).astype(np.float64)
            share = total / max(total.sum(), 1.0)
            out.setdefault(g, {})[e.label] = {ACTION_NAMES[a]: float(share[a]) for a in legal}
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


# ------------------------------------------------------------------------------------------ report
def write_report(dirs: list[Path], out: Path, reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Write report.md, report.json and the plots into `out`; returns the report's numbers."""
    from wam.agents.metrics import summarize

    evals, runs = discover(dirs)
    if not evals and not runs:
        raise WamError(f"no evaluation (episodes.csv) or training run (metrics.jsonl) under {', '.join(map(str, dirs))}")
    out.mkdir(parents=True, exist_ok=True)
    for e in evals:
        e.summary = summarize(e.records, reps=reps, seed=seed)
    data: dict[str, Any] = {"inputs": [str(d) for d in dirs], "evaluations": {}, "runs": {},
                            "bootstrap": {"reps": reps, "seed": seed, "confidence": 0.95}}
    md = ["# wam report", "", f"Generated by `wam report` from {', '.join(f'`{d}`' for d in dirs)}. "
          f"Intervals are 95 % stratified-bootstrap percentile CIs ({reps} replicates, seed {seed}); "
          "HNS = (score - random) / (human - random); IQM = 25 % trimmed mean of all (episode, game) HNS "
          "(see docs/evaluation.md).", ""]

    if evals:
        games = sorted({g for e in evals for g in e.summary["games"]})
        md += _evaluations_md(evals, out, data)
        md += _per_game_md(evals, games, out)
        md += _actions_md(evals, games, out, data)
        md += _planning_md(evals, data, reps, seed)
        md += _comparisons_md(evals, data, reps, seed)
        md += _videos_md(evals, out)
    if runs:
        md += _runs_md(runs, out, data)

    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    log.info("wrote %s", out / "report.md")
    return data


def _evaluations_md(evals: list[EvalInput], out: Path, data: dict[str, Any]) -> list[str]:
    """The table of evaluations with their HNS aggregates, the notes on capped episodes and missing references,
    and the IQM plot."""
    md: list[str] = []
    md += ["## Evaluations", ""]
    rows = []
    for e in evals:
        f, agg = e.first, e.summary["hns_aggregates"]
        n_games = len(e.summary["games"])
        rows.append([e.label + ("" if e.status == "complete" else f" ({e.status})"), f.agent,
                     f"`{f.checkpoint_id}`" if f.checkpoint_id else "-", f.protocol, f"{f.epsilon:g}",
                     e.plan_label(), str(f.max_steps), str(n_games), str(len(e.records)),
                     _fmt_iv(agg.get("iqm"), 3), _fmt_iv(agg.get("mean"), 3), _fmt_iv(agg.get("median"), 3),
                     _fmt_iv(agg.get("optimality_gap"), 3)])
        data["evaluations"][e.label] = {"path": str(e.path), "status": e.status, "agent": f.agent,
                                        "agent_spec": f.agent_spec, "checkpoint_id": f.checkpoint_id,
                                        "protocol": f.protocol, "epsilon": f.epsilon, "plan": e.plan_label(),
                                        "max_steps": f.max_steps, "summary": e.summary}
    md += _md_table(["evaluation", "agent", "checkpoint", "protocol", "ε", "planning", "cap", "games",
                     "episodes", "IQM HNS", "mean HNS", "median HNS", "optimality gap"], rows)
    from wam.datasets.atari import PROTOCOLS

    capped = [e for e in evals if e.first.protocol in PROTOCOLS
              and e.first.max_steps < PROTOCOLS[e.first.protocol].max_agent_steps]
    for e in capped:
        md += [f"**{e.label}: episodes capped at {e.first.max_steps} agent steps** (protocol "
               f"{e.first.protocol}: {PROTOCOLS[e.first.protocol].max_agent_steps}); its scores are not "
               "comparable with full-length evaluations or published numbers.", ""]
    missing = sorted({g for e in evals for g in e.summary["games_without_hns"]})
    if missing:
        md += [f"No human/random reference for {', '.join(missing)}: raw scores only, left out of HNS "
               "aggregates.", ""]
    if any(e.summary["hns_aggregates"] for e in evals):
        iqm_plot(out / "iqm.png", evals)
        md += ["![IQM HNS](iqm.png)", ""]
    return md


def _per_game_md(evals: list[EvalInput], games: list[str], out: Path) -> list[str]:
    """Per game: each evaluation's returns and HNS, the game x evaluation table and the bar plots."""
    md: list[str] = []
    md += ["## Per-game scores", ""]
    for g in games:
        rows = []
        for e in evals:
            s = e.summary["games"].get(g)
            if s is None:
                continue
            r = s["return"]
            rows.append([e.label, str(s["episodes"]), _fmt_iv(r, 2), f"{r['median']:.2f}", f"{r['std']:.2f}",
                         _fmt_iv(s["hns"], 3), f"{s['length_mean']:.1f}", str(s["truncated"])])
        md += [f"### {g}", ""]
        md += _md_table(["evaluation", "episodes", "mean return", "median", "std", "HNS", "mean length",
                         "capped"], rows)
    if len(evals) > 1:
        md += ["### Mean return, game x evaluation", ""]
        rows = [[g] + [f"{e.summary['games'][g]['return']['point']:.2f}" if g in e.summary["games"] else "-"
                       for e in evals] for g in games]
        md += _md_table(["game"] + [e.label for e in evals], rows)
    bar_plot(out / "per_game_return.png", evals, games, "return", "raw return")
    md += ["![per-game returns](per_game_return.png)", ""]
    if any(e.summary["games_with_hns"] for e in evals):
        bar_plot(out / "per_game_hns.png", evals, [g for g in games if any(
            g in e.summary["games_with_hns"] for e in evals)], "hns", "HNS")
        md += ["![per-game HNS](per_game_hns.png)", ""]
    return md


def _actions_md(evals: list[EvalInput], games: list[str], out: Path, data: dict[str, Any]) -> list[str]:
    """The share of each legal action each evaluation played, per game, with its plot."""
    md: list[str] = []
    shares = _action_shares(evals, games)
    if shares:
        data["action_shares"] = shares
        md += ["## Actions played", "",
               "Share of each legal action over every step of the evaluation's episodes (ε's random actions "
               "included). An agent that copies its data's most frequent action, or sticks to one, shows here.",
               ""]
        for g, per in shares.items():
            names = list(next(iter(per.values())))
            md += [f"### {g}", ""]
            md += _md_table(["evaluation", *names], [[label, *(f"{v:.0%}" for v in row.values())]
                                                     for label, row in per.items()])
        action_plot(out / "actions.png", shares)
        md += ["![actions played](actions.png)", ""]
    return md


def _planning_md(evals: list[EvalInput], data: dict[str, Any], reps: int, seed: int) -> list[str]:
    """Each agent with planning against the same agent without: the IQM difference and the decisions changed."""
    md: list[str] = []
    pairs = _plan_pairs(evals)
    if pairs:
        md += ["## Planning vs no planning", ""]
        rows = []
        data["planning"] = []
        for a, b in pairs:
            common = _common_hns_games(a, b)
            if not common:
                continue
            d = _difference(a, b, common, reps, seed)
            per_game = ", ".join(f"{g}: {a.summary['games'][g]['return']['point']:.1f} → "
                                 f"{b.summary['games'][g]['return']['point']:.1f}" for g in common)
            changed = _plan_changed_share(b.records)
            rows.append([a.first.agent_spec, b.plan_label(), a.label, b.label, _fmt_iv(d, 3), per_game,
                         "-" if changed is None else f"{100 * changed:.1f} %"])
            data["planning"].append({"without": a.label, "with": b.label, "iqm_difference": d, "games": common,
                                     "plan_changed_share": changed})
        md += _md_table(["agent", "planning", "without", "with", "Δ IQM HNS (with − without)",
                         "mean return per game (without → with)", "decisions planning changed"], rows)
    return md


def _comparisons_md(evals: list[EvalInput], data: dict[str, Any], reps: int, seed: int) -> list[str]:
    """The IQM HNS difference of every pair of evaluations over their common games."""
    md: list[str] = []
    if len(evals) > 1:
        md += ["## Agent comparisons", "",
               "IQM HNS of the column evaluation minus the row evaluation over their common games "
               "(95 % CI from independent stratified bootstraps; an interval excluding 0 is a difference "
               "the episodes support).", ""]
        rows = []
        data["comparisons"] = []
        for a, b in itertools.combinations(evals, 2):
            common = _common_hns_games(a, b)
            if not common:
                continue
            d = _difference(a, b, common, reps, seed)
            rows.append([a.label, b.label, str(len(common)), _fmt_iv(d, 3)])
            data["comparisons"].append({"a": a.label, "b": b.label, "games": common, "iqm_difference": d})
        md += _md_table(["a", "b", "games", "IQM HNS b − a"], rows)
    return md


def _videos_md(evals: list[EvalInput], out: Path) -> list[str]:
    """Links to the recorded videos."""
    md: list[str] = []
    videos = [(e, v) for e in evals for v in e.videos]
    if videos:
        md += ["## Videos", ""]
        md += [f"- {e.label}: [{v.name}]({os.path.relpath(v, out.resolve())})" for e, v in videos]
        md += [""]
    return md


def _runs_md(runs: list[RunInput], out: Path, data: dict[str, Any]) -> list[str]:
    """Training runs: final values, curves, the tokenizer's fidelity and its reconstruction grids."""
    md: list[str] = []
    md += ["## Training runs", ""]
    rows = []
    for run in runs:
        keys = curve_keys(run.rows)
        last = run.rows[-1] if run.rows else {}
        final = ", ".join(f"{k}={last[k]:.4g}" for k in keys if isinstance(last.get(k), (int, float)))
        rows.append([run.label, str(len(run.rows)), str(last.get("step", len(run.rows))), final or "-"])
        data["runs"][run.label] = {"path": str(run.path), "records": len(run.rows), "final": {
            k: last[k] for k in keys if isinstance(last.get(k), (int, float))}}
    md += _md_table(["run", "records", "last step", "final values"], rows)
    for run in runs:
        keys = curve_keys(run.rows)
        if keys:
            name = f"curves_{_slug(run.label)}.png"
            curves_plot(out / name, run, keys)
            md += [f"![training curves of {run.label}]({name})", ""]
    fidelity = _tokenizer_fidelity(runs)
    if fidelity:
        from wam.worldmodel.tokenizer_train import gains_text

        data["tokenizer_fidelity"] = fidelity
        md += ["## Tokenizer fidelity (held-out frames)", "",
               "Foreground: pixels more than 24 grey levels from the game's median training frame (the objects); "
               "the gain is the reconstruction's PSNR on them minus the median frame's (docs/tokenizer.md).", ""]
        md += _md_table(["run", "step", "PSNR (dB)", "mean frame (dB)", "foreground gain over the median frame"],
                        [[f["run"], f["step"], f"{f['heldout_psnr']:.2f}", f"{f['baseline_psnr']:.2f}",
                          gains_text(f["fg_gain"]) or "n/a"]
                         for f in fidelity])
    grids = [(run, g) for run in runs for g in run.recon_grids]
    if grids:
        md += ["## Tokenizer reconstructions", ""]
        for run, g in grids:
            name = f"recon_{_slug(run.label)}_{g.name}"
            shutil.copyfile(g, out / name)
            md += [f"{run.label}: ![{g.name}]({name})", ""]
    return md


def _tokenizer_fidelity(runs: list[RunInput]) -> list[dict[str, Any]]:
    """The last held-out evaluation of each tokenizer run (rows with `heldout_psnr`): PSNR, mean-frame baseline
    and the per-game foreground gain over the median frame (`fg_gain/<game>`; absent in runs before it existed)."""
    from wam.worldmodel.tokenizer_train import fg_gains

    out = []
    for run in runs:
        evals = [r for r in run.rows if "heldout_psnr" in r]
        if not evals:
            continue
        last = evals[-1]
        out.append({"run": run.label, "step": last.get("step"), "heldout_psnr": last["heldout_psnr"],
                    "baseline_psnr": last.get("baseline_psnr", float("nan")),
                    "fg_gain": fg_gains(last)})
    return out


def report(cfg: ReportConfig) -> int:
    if not cfg.dirs:
        raise WamError("give at least one evaluation or run directory: wam report DIR... --out REPORT_DIR")
    write_report(cfg.dirs, cfg.out, reps=cfg.bootstrap_reps, seed=cfg.seed)
    print(f"wrote {cfg.out / 'report.md'}")
    return 0
