"""The plots of `wam report`: bar charts per game, the IQM with its interval, the actions played and the
training curves (matplotlib, Agg backend, imported only when a plot is drawn)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wam.runs.report import EvalInput, RunInput

MAX_CURVES = 8
"""Metrics plotted per training run (the first ones found, `loss`-like names first)."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path: Path, evals: list[EvalInput], games: list[str], key: str, ylabel: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(games) * max(1, len(evals)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(len(evals), 1)
    x = np.arange(len(games))
    for k, e in enumerate(evals):
        pts, errs = [], [[], []]
        for g in games:
            s = e.summary["games"].get(g)
            iv = (s or {}).get(key)
            if iv is None:
                pts.append(np.nan)
                errs[0].append(0.0)
                errs[1].append(0.0)
            else:
                pts.append(iv["point"])
                errs[0].append(iv["point"] - iv["low"])
                errs[1].append(iv["high"] - iv["point"])
        ax.bar(x + (k - (len(evals) - 1) / 2) * width, pts, width, yerr=errs, capsize=3, label=e.label)
    ax.set_xticks(x, games, rotation=20)
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize=7)
    ax.set_title(f"{ylabel} per game (mean, 95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def iqm_plot(path: Path, evals: list[EvalInput]) -> None:
    plt = _plt()
    rows = [(e.label, e.summary["hns_aggregates"]["iqm"]) for e in evals if e.summary["hns_aggregates"]]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    y = np.arange(len(rows))
    pts = [iv["point"] for _, iv in rows]
    err = [[iv["point"] - iv["low"] for _, iv in rows], [iv["high"] - iv["point"] for _, iv in rows]]
    ax.errorbar(pts, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y, [label for label, _ in rows])
    ax.set_xlabel("IQM human-normalised score (95% stratified-bootstrap CI)")
    ax.axvline(0.0, color="grey", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def action_plot(path: Path, shares: dict[str, dict[str, dict[str, float]]]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(shares), 1, figsize=(10, 2.8 * len(shares)), squeeze=False)
    for ax, (g, per) in zip(axes[:, 0], shares.items()):
        names = list(next(iter(per.values())))
        x = np.arange(len(names))
        width = 0.8 / len(per)
        for i, (label, row) in enumerate(per.items()):
            ax.bar(x + (i - (len(per) - 1) / 2) * width, list(row.values()), width, label=label)
        ax.set_xticks(x, names, rotation=60, fontsize=6)
        ax.set_ylabel("share of steps", fontsize=7)
        ax.set_title(f"{g}: actions played", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(("fg_psnr/", "fg_baseline_psnr/", "fg_gain/")):  # per game: in the fidelity table
                continue
            if k not in ("step", "time", "epoch", "wall_time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, None)
    ordered = sorted(keys, key=lambda k: (_curve_rank(k), k))
    return ordered[:MAX_CURVES]


_Q_CURVES = ("q_data", "td_target_mean", "q_gap_frequent")


def _curve_rank(key: str) -> int:
    """Which curves a report shows first: losses and held-out figures, then the Q diagnostics, then the rest."""
    if key in ("loss", "td_loss", "wm_loss", "bc_loss", "heldout_psnr", "fg_gain_min"):
        return 0
    if key in _Q_CURVES or key.startswith("q_mc_gap"):
        return 1
    if "loss" in key:
        return 2
    return 3 if key.endswith("_acc") or key.startswith("fg_") else 4


def curves_plot(path: Path, run: RunInput, keys: list[str]) -> None:
    plt = _plt()
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.5 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[k]) for i, r in enumerate(run.rows) if isinstance(r.get(k), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, linewidth=1)
        ax.set_title(k, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"training curves: {run.label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
