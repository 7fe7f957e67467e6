"""`wam diagnose`: is a trained world-action model's Q any good on real episodes?

    wam diagnose RUN --data DIR... --out DIR [--episodes 2]

For the last `--episodes` episodes of every dataset whose game the model knows (the episodes the tokenizer
and `wam recipe` hold out come last), it reads E[Q] of every action at every step the way greedy acting
does (`wam.worldmodel.diagnostics.episode_q`) and reports, per game:

- **calibration**: mean E[Q] of the data's actions against their discounted Monte-Carlo return (rewards
  transformed and discounted as in training; of an episode cut by a cap, its last 1,000 steps are left
  out, whose returns miss the rewards after the cut), the mean gap
  (> 0 over-estimates) and the mean absolute gap;
- **frequent-action gap**: E[Q] of the data's most frequent action minus the mean E[Q] of the other legal
  actions (what grows when Q drifts towards copying the data);
- **action histograms**: the data's actions next to the greedy actions (argmax of E[Q] over the legal
  ones) on the same states, and how often they agree.

Writes `diagnose.json`, `diagnose.md` and `diagnose.png` (Q against the return along the first episode, and
the two histograms, per game).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tyro

from wam.datasets.errors import WamError

log = logging.getLogger(__name__)


@dataclass
class DiagnoseArgs:
    """Q calibration against Monte-Carlo returns, the frequent-action Q gap and greedy vs data action histograms."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """World-action model run directory (its newest checkpoint) or checkpoint file."""
    data: tuple[str, ...] = ()
    """Dataset directories or roots (tokenized by the model's tokenizer); games the model does not know are skipped."""
    out: str = ""
    """Output directory for diagnose.json, diagnose.md and diagnose.png."""
    episodes: int = 2
    """Last episodes of each dataset to read (the held-out ones of the tokenizer and of `wam recipe`)."""
    device: str = "cpu"
    """cpu, cuda or auto."""


def diagnose_model(model, ckpt: dict[str, Any], data: tuple[str, ...], episodes: int) -> dict[str, Any]:
    """The figures of the module docstring, per game (see `diagnose`)."""
    from wam.datasets.atari import ACTION_NAMES, legal_action_mask
    from wam.datasets.store import TrajectoryStore, find_datasets
    from wam.worldmodel.diagnostics import EpisodeTokens, calibration_figures, episode_q, mc_returns

    loss_cfg = ckpt.get("config", {}).get("loss", {})
    gamma, transform = float(loss_cfg.get("gamma", 0.99)), loss_cfg.get("reward_transform", "sign")
    tid = ckpt.get("tokenizer", {}).get("id")
    per_game: dict[str, dict[str, list]] = {}
    for path in find_datasets(list(data)):
        store = TrajectoryStore.open(path)
        if store.game not in model.cfg.games:
            log.info("%s: the model does not know %s; skipped", path, store.game)
            continue
        if store.tokenizer_id() != tid:
            raise WamError(f"{path} holds tokens of tokenizer {store.tokenizer_id()}, not of the model's {tid}; run "
                           f"`wam tokenize --tokenizer <the model's tokenizer> --data {path}`")
        gid = model.cfg.games.index(store.game)
        acc = per_game.setdefault(store.game, {"q": [], "ret": [], "data": [], "greedy": [], "gap": []})
        legal = legal_action_mask(store.game)
        for i in range(max(0, store.num_episodes - episodes), store.num_episodes):
            ep = EpisodeTokens.from_store(store, i, gid)
            q = episode_q(model, ep)  # [T, 18]
            acts = np.asarray(ep.actions, np.int64)
            acc["data"].append(acts)
            acc["greedy"].append(np.where(legal, q, -np.inf).argmax(1))
            acc["gap"].append(q)
            ret = mc_returns(ep, gamma, transform)  # a capped episode loses its last TRUNCATION_MARGIN steps
            if len(ret):
                acc["q"].append(q[np.arange(len(ret)), acts[:len(ret)]])
                acc["ret"].append(ret)
    if not per_game:
        raise WamError(f"no dataset of a game the model knows ({', '.join(model.cfg.games)}) among {list(data)}")
    out: dict[str, Any] = {"gamma": gamma, "reward_transform": transform, "games": {}}
    for game, acc in per_game.items():
        legal = legal_action_mask(game)
        data_a, greedy_a = np.concatenate(acc["data"]), np.concatenate(acc["greedy"])
        q_all = np.concatenate(acc["gap"])
        counts = np.bincount(data_a, minlength=18)
        frequent = int(counts.argmax())
        others = legal.copy()
        others[frequent] = False
        row: dict[str, Any] = {
            "steps": int(len(data_a)), "frequent_action": ACTION_NAMES[frequent],
            "q_gap_frequent": float((q_all[:, frequent] - q_all[:, others].mean(1)).mean()) if others.any() else 0.0,
            "greedy_agrees_with_data": float((greedy_a == data_a).mean()),
            "data_histogram": {ACTION_NAMES[a]: float((data_a == a).mean()) for a in np.flatnonzero(legal)},
            "greedy_histogram": {ACTION_NAMES[a]: float((greedy_a == a).mean()) for a in np.flatnonzero(legal)},
        }
        if acc["q"]:
            q, ret = np.concatenate(acc["q"]), np.concatenate(acc["ret"])
            row.update(calibration_figures(q, ret), q_mc_steps=int(len(q)),
                       trace_q=acc["q"][0].tolist(), trace_return=acc["ret"][0].tolist())
        else:
            row["note"] = "every episode read was cut by a cap within 1,000 steps: no Monte-Carlo return to compare with"
        out["games"][game] = row
    return out


def _markdown(result: dict[str, Any], title: str) -> str:
    lines = [f"# Q diagnostics: {title}", "",
             f"Discount {result['gamma']}, rewards transformed by `{result['reward_transform']}` as in training. "
             "E[Q] is read like greedy acting (a window of the last H frames). Gap > 0: over-estimation. A constant's "
             "abs gap: that of predicting the mean return everywhere; an abs gap near it, and a correlation near 0, "
             "mean Q does not follow the state.", "",
             "| game | steps | E[Q] data actions | MC return | mean gap | mean abs gap | a constant's abs gap | "
             "corr(Q, return) | frequent action | its Q gap | greedy = data |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for game, r in result["games"].items():
        cal = [f"{r[k]:+.2f}" if k in r else "n/a" for k in ("q_data_mean", "mc_return_mean", "q_mc_gap")]
        cal += [f"{r[k]:.2f}" if k in r else "n/a" for k in ("q_mc_abs_gap", "mc_abs_dev", "q_mc_corr")]
        lines.append(f"| {game} | {r['steps']} | {' | '.join(cal)} | {r['frequent_action']} | "
                     f"{r['q_gap_frequent']:+.2f} | {r['greedy_agrees_with_data']:.0%} |")
    lines += ["", "Action histograms (share of steps), data / greedy on the same states:", ""]
    for game, r in result["games"].items():
        pairs = ", ".join(f"{a} {r['data_histogram'][a]:.0%}/{r['greedy_histogram'][a]:.0%}"
                          for a in r["data_histogram"])
        lines.append(f"- {game}: {pairs}")
    return "\n".join(lines) + "\n"


def _plot(path: Path, result: dict[str, Any]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from wam.datasets.files import atomic_write_bytes

    games = list(result["games"])
    fig = Figure(figsize=(11, 3.0 * len(games)), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(games), 2, squeeze=False)
    for row, game in enumerate(games):
        r = result["games"][game]
        ax = axes[row][0]
        if "trace_q" in r:
            ax.plot(r["trace_q"], label="E[Q] of the data action", linewidth=0.8)
            ax.plot(r["trace_return"], label="discounted return", linewidth=0.8)
            ax.legend(fontsize=7)
        ax.set_title(f"{game}: Q vs Monte-Carlo return (first episode)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax = axes[row][1]
        names = list(r["data_histogram"])
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r["data_histogram"][a] for a in names], 0.4, label="data")
        ax.bar(x + 0.2, [r["greedy_histogram"][a] for a in names], 0.4, label="greedy")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, fontsize=6)
        ax.set_title(f"{game}: actions (greedy = data on {r['greedy_agrees_with_data']:.0%} of steps)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def diagnose(args: DiagnoseArgs) -> int:
    """`wam diagnose`."""
    from wam.datasets.files import atomic_write_json
    from wam.worldmodel.device import resolve_device
    from wam.worldmodel.model import WorldActionModel

    if not args.out:
        raise WamError("give the output directory with --out DIR")
    if not args.data:
        raise WamError("give the datasets with --data DIR (tokenized by the model's tokenizer)")
    if args.episodes < 1:
        raise WamError(f"--episodes must be at least 1, got {args.episodes}")
    if not Path(args.run).exists():
        raise WamError(f"{args.run}: no such run directory or checkpoint")
    t0 = time.perf_counter()
    model, ckpt = WorldActionModel.from_checkpoint(args.run, map_location=resolve_device(args.device))
    model.eval()
    result = diagnose_model(model, ckpt, tuple(args.data), args.episodes)
    result["run"], result["seconds"] = str(args.run), time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "diagnose.json", result)
    (out / "diagnose.md").write_text(_markdown(result, str(args.run)))
    _plot(out / "diagnose.png", result)
    parts = [f"{g} gap {r['q_mc_gap']:+.2f} (|gap| {r['q_mc_abs_gap']:.2f}), frequent-action Q gap "
             f"{r['q_gap_frequent']:+.2f}, greedy = data {r['greedy_agrees_with_data']:.0%}"
             if "q_mc_gap" in r else f"{g}: no uncapped episode" for g, r in result["games"].items()]
    print(f"Q vs Monte-Carlo return: {'; '.join(parts)}; wrote {out / 'diagnose.md'}")
    return 0


__all__ = ["DiagnoseArgs", "diagnose", "diagnose_model"]
