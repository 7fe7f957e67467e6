"""The recipe's claims: the behaviour data's returns, the verdict wording and the claims table in markdown
(`wam recipe` computes the figures, docs/recipes.md explains each claim)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wam.runs.recipe import RecipeConfig


def episode_rows(path: Path) -> list[dict[str, Any]]:
    with open(path / "episodes.csv", newline="") as f:
        return list(csv.DictReader(f))


def behaviour_data_returns(data: Path, cap: int) -> np.ndarray:
    """Return of every behaviour-data episode over its first `cap` steps (episodes cut shorter by the end of
    collection, not by the game, are left out: their return is not comparable)."""
    from wam.datasets.store import TrajectoryStore

    store = TrajectoryStore.open(data)
    try:
        out = []
        for i, n in enumerate(store.episode_lengths()):
            n = int(n)
            if n < cap and not bool(store.read_window(i, n - 1, n, "terminations")[0]):
                continue
            out.append(float(store.read_window(i, 0, min(n, cap), "rewards").sum()))
        return np.asarray(out, dtype=np.float64)
    finally:
        store.close()


def verdict(low: float, point: float, threshold: float = 0.0, strict: bool = True) -> str:
    ok = point > threshold if strict else point >= threshold
    if not ok:
        return "does not hold"
    return "holds, supported by the CI" if low > threshold else "holds (point estimate; the CI includes 0)"


def _f(x: Sequence[float], digits: int = 1) -> str:
    return f"{x[0]:.{digits}f} [{x[1]:.{digits}f}, {x[2]:.{digits}f}]"


def claims_markdown(claims: dict[str, Any], cfg: RecipeConfig) -> str:
    """The claims of the `small` recipe as a Markdown section (tables with 95 % CIs and verdicts)."""
    cap = claims["cap_steps"]
    lines = [
        "# `small` recipe: does it learn?", "",
        f"Seeds {claims['seeds']}; every return is over the first {cap} agent steps of an episode (the evaluation "
        "cap), for the agents and for the behaviour data alike. Brackets: 95 % bootstrap CIs (seeds resampled, "
        "then episodes within each seed, so they carry seed-to-seed variance; 3 seeds make them coarse). Agent = the model pretrained on "
        f"{' + '.join(cfg.pretrain_games)} (those games; "
        f"{'one pretraining per seed' if cfg.seeded_pretraining else 'one pretraining, seed 0, for every seed'}) "
        f"or fine-tuned from it on {cfg.finetune_game}, acting "
        "greedily on its Q (ε = 0.001).", "",
        "## 1. Agent vs its behaviour data", "",
        "| game | role | random | behaviour policy (ε = 0.001) | behaviour data | agent | agent with planning "
        "| agent − data | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, r in claims["games"].items():
        lines.append(f"| {g} | {r['role']} | {_f(r['random_return'])} | {_f(r['behaviour_policy_return'])} | "
                     f"{_f(r['behaviour_data_return'])} (n={r['behaviour_data_episodes']}) | "
                     f"{_f(r['agent_return'])} (n={r['agent_episodes']}) | {_f(r['agent_planning_return'])} | "
                     f"{_f(r['agent_minus_data'])} | {r['verdict']} |")
    b = claims["beats_data"]
    lines += ["", f"**Claim: above its data on at least 2 of 3 games — "
              f"{'HOLDS' if b['holds'] else 'DOES NOT HOLD'}** ({b['games_above']} of {b['of']} on the point "
              f"estimate; {b.get('games_above_with_ci', '?')} of {b['of']} with the agent's CI's lower bound "
              f"above the data's mean, the target of issue 18; {b.get('games_above_with_difference_ci', '?')} of "
              f"{b['of']} with the CI of agent − data above 0, which adds the data's own spread).", "",
              "## 2. Planning vs no planning", "",
              f"Mean over games of HNS with − without planning (beam K = {cfg.beam_width}, H = {cfg.plan_horizon}): "
              f"{_f(claims['planning']['hns_with_minus_without'], 3)}.", "",
              f"**Claim: planning at least as good as no planning on average — "
              f"{claims['planning']['verdict']}.**", "",
              "## 3. Pretrained + fine-tuned vs from scratch", "",
              f"On {cfg.finetune_game} ({cfg.transitions} transitions, {cfg.finetune_steps} steps each): "
              f"fine-tuned {_f(claims['pretraining']['finetuned_return'])}, from scratch "
              f"{_f(claims['pretraining']['scratch_return'])}, difference "
              f"{_f(claims['pretraining']['finetuned_minus_scratch_return'])}.", "",
              f"**Claim: pretrained + fine-tuned above from scratch — "
              f"{claims['pretraining']['verdict']}.**", ""]
    peer = claims.get("peer", {})
    lines += ["## 4. wam vs d3rlpy DiscreteCQL on the same data", ""]
    if not peer.get("games"):
        lines += ["Not measured: the baseline needs `.venv-baselines` (`make baselines`) and `--baseline`.", ""]
    else:
        lines += [f"DiscreteCQL (d3rlpy 2.8.1, its Atari settings, {peer['steps']} gradient steps, one training seed; "
                  "docs/baselines.md) on the data each agent trains on, scored by the same evaluation.", "",
                  "| game | DiscreteCQL | agent − DiscreteCQL | verdict |", "|---|---|---|---|"]
        lines += [f"| {g} | {_f(v['cql_return'])} | {_f(v['agent_minus_cql'])} | {v['verdict']} |"
                  for g, v in peer["games"].items()]
        lines += ["", f"**Claim: at or above DiscreteCQL on every game — "
                  f"{'HOLDS' if peer['holds'] else 'DOES NOT HOLD'}.**", ""]
    return "\n".join(lines)
