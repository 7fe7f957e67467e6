"""How well can *any* predictor of the state tell the Monte-Carlo return? The floor under Q calibration.

`wam diagnose` compares E[Q] of the data actions with the discounted return that followed (G_t). A sampled
G_t carries the noise of everything that happens afterwards, so even a perfect Q leaves an absolute gap.
This script fits predictors of G_t directly, on the training episodes of one dataset, and scores them on
its last 2 episodes (the episodes `wam diagnose` and the training calibration read by default), from:

- `ram`: the console RAM (128 bytes, recorded by `wam data collect`), the action and the step index;
- `time`: the action and the step index only;
- `positions`: the probe's object coordinates for the game (`wam.worldmodel.probe.RAM_VARIABLES`), the action
  and the step index;
- `tokens`: the frame's tokens (codebook embeddings, as `wam tokenizer probe` reads them) and the action
  (needs --tokenizer; the step index is added too).

Each with ridge regression and a 2-layer MLP trained on the absolute error; the table gives the held-out
absolute gap and correlation of the best of them beside a constant's. Usage (docs/training.md):

    python docs/analysis/return_floor.py --data small_out/data/atari/boxing/scripted-eps30-v0 \
        --tokenizer small_out/runs/tokenizer --features ram time positions tokens
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from wam.datasets.returns import episode_mc_returns
from wam.datasets.store import TrajectoryStore
from wam.worldmodel.diagnostics import calibration_figures


def features(store: TrajectoryStore, kind: str, tokenizer=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from wam.worldmodel.probe import RAM_VARIABLES, token_features

    xs, ys, test = [], [], []
    for i in range(store.num_episodes):
        ep = store.read_episode(i, tokens=kind == "tokens")
        ret = episode_mc_returns(ep.rewards, bool(len(ep.truncations) and ep.truncations[-1]), 0.99, "sign")
        n = int((~np.isnan(ret)).sum())
        if n == 0:
            continue
        cols = [np.eye(18, dtype=np.float32)[ep.actions[:n]], (np.arange(n) / 2000.0)[:, None].astype(np.float32)]
        if kind == "ram":
            cols.append(ep.ram[:n].astype(np.float32) / 255.0)
        elif kind == "positions":
            addresses = [v.address for v in RAM_VARIABLES[store.game]]
            cols.append(ep.ram[:n, addresses].astype(np.float32) / 255.0)
        elif kind == "tokens":
            cols.append(token_features(tokenizer, ep.obs_tokens[:n]).numpy())
        xs.append(np.concatenate(cols, 1))
        ys.append(ret[:n])
        test.append(np.full(n, i >= store.num_episodes - 2))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(test)


def best_fit(x: np.ndarray, y: np.ndarray, test: np.ndarray, seed: int = 0) -> dict[str, float]:
    xtr, ytr, xte, yte = x[~test], y[~test], x[test], y[test]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    fits = []
    for lam in (1.0, 100.0, 1000.0):
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (ytr - ytr.mean()))
        fits.append(calibration_figures(b @ w + ytr.mean(), yte))
    torch.manual_seed(seed)
    at, yt, bt = torch.tensor(a), torch.tensor(ytr, dtype=torch.float32), torch.tensor(b)
    for wd in (1e-4, 1e-2):
        net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 256), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                  torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=wd)
        for step in range(1, 3001):
            idx = torch.randint(0, len(at), (256,))
            loss = (net(at[idx]).squeeze(1) - yt[idx]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in (500, 1500, 3000):
                net.eval()
                with torch.no_grad():
                    fits.append(calibration_figures(net(bt).squeeze(1).double().numpy(), yte))
                net.train()
    return min(fits, key=lambda f: f["q_mc_abs_gap"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="one dataset directory with recorded RAM")
    p.add_argument("--tokenizer", default="", help="tokenizer run (for --features tokens)")
    p.add_argument("--features", nargs="+", default=["ram", "time", "positions"])
    args = p.parse_args()
    torch.set_num_threads(1)
    store = TrajectoryStore.open(args.data)
    tokenizer = None
    if "tokens" in args.features:
        from wam.worldmodel.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    print(f"{store.game}: held-out = the last 2 episodes of {args.data}")
    print("| features | held-out steps | abs gap | a constant's | corr |")
    print("|---|---|---|---|---|")
    for kind in args.features:
        x, y, test = features(store, kind, tokenizer)
        f = best_fit(x, y, test)
        const = calibration_figures(np.full(int(test.sum()), y[~test].mean()), y[test])
        print(f"| {kind} | {int(test.sum())} | {f['q_mc_abs_gap']:.2f} | {const['q_mc_abs_gap']:.2f} | "
              f"{f.get('q_mc_corr', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
