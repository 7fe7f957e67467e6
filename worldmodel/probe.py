"""State probes: how much of the game state do a frozen tokenizer's tokens keep?

The AtariARI evaluation (Anand et al. 2019, "Unsupervised State Representation Learning in Atari")
applied to the frame tokenizer: on datasets with recorded console RAM, regress object coordinates read
from RAM (the AtariARI addresses, `RAM_VARIABLES`) from

- the **tokens**: each frame's 36 tokens looked up in the codebook (`tokenizer.quantizer.lookup`, the
  unit-norm code vectors the decoder reads), [36, D] flattened to 36·D features;
- the **pixels**: the raw 84×84 frame /255, flattened to 7,056 features (what the tokens are made from);
- a **constant**: the training mean (R² ≈ 0 or below: the floor).

with two probes each, fitted on training episodes and scored by R² on held-out episodes:

- **ridge**: closed form in float64 on standardised inputs (features constant on the fitting frames are
  dropped), intercept unpenalised, the penalty α (per frame, `λ = α · n`) chosen per variable on a
  validation split of the training episodes from `RIDGE_ALPHAS`;
- **MLP**: one hidden ReLU layer, Adam on minibatches, standardised inputs and targets, early stopping on
  the validation split (each variable keeps the weights of its best validation epoch; the zero-initialised
  output layer makes epoch 0 the training mean), seeded.

Splits follow the tokenizer's convention (`split_episodes`): the last `holdout_fraction` of each
dataset's episodes are held out (by default the tokenizer run's own fraction, so the held-out frames are
ones the tokenizer never trained on when it was trained on these datasets); of the remaining training
episodes the last `val_fraction` are the validation split (the last frames of the episode when a dataset
has a single training episode). Training frames (fit + validation) are subsampled uniformly to
`max_frames` per game, held-out frames evenly to `max_heldout_frames`. Datasets of the same game are
pooled into one probe per game.

Absent objects: some RAM coordinates hold a meaningless value when the object is not on screen (Pong's
ball y is 0 when no ball is in play, its x is then stale; the same in Breakout). Such a variable has a
`present_address`, and frames where that byte is 0 are excluded from its fitting, validation and
R² (they are counted and reported).

`probe_tokenizer(run, data, out)` writes `probe.json`, `probe.md` (table) and `probe.png` (bars);
docs/probe.md describes them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wam.datasets.errors import DataError, WamError
from wam.datasets.files import atomic_write_bytes
from wam.datasets.store import TrajectoryStore, find_datasets
from wam.worldmodel.tokenizer import VQTokenizer
from wam.worldmodel.tokenizer_train import split_episodes

log = logging.getLogger(__name__)

__all__ = ["PROBES", "RAM_VARIABLES", "RIDGE_ALPHAS", "GameData", "MlpProbe", "ProbeConfig", "ProbeReport",
           "RamVariable", "RidgeProbe", "Standardizer", "fit_mlp", "fit_ridge", "load_game_data", "probe_game",
           "probe_tokenizer", "r2_score", "token_features"]


# ------------------------------------------------------------------------------------ RAM variables
@dataclass(frozen=True)
class RamVariable:
    """One object coordinate in the console RAM (an AtariARI annotation)."""

    name: str
    """AtariARI's name, e.g. `ball_x`."""
    address: int
    """RAM byte (0..127) holding it."""
    present_address: int | None = None
    """When set, frames whose byte at this address is 0 have no such object: they are excluded (masked)."""

    def mask(self, ram: np.ndarray) -> np.ndarray:
        """bool [N]: the frames (RAM rows uint8 [N, 128]) where the variable is defined."""
        if self.present_address is None:
            return np.ones(len(ram), dtype=bool)
        return ram[:, self.present_address] != 0

    def describe_mask(self) -> str | None:
        return None if self.present_address is None else f"frames with RAM[{self.present_address}] == 0 excluded (no object)"


# AtariARI `atariari/benchmark/ram_annotations.py`. The scripted policies (wam.datasets.policies, where the
# addresses were checked against the live emulator) read the same bytes; a test keeps the two equal (they
# are not imported from there so that the `wam tokenizer` commands do not load the emulator).
RAM_VARIABLES: dict[str, tuple[RamVariable, ...]] = {
    "Pong": (
        RamVariable("player_y", 51),
        RamVariable("enemy_y", 50),
        # ball_y is 0 while no ball is in play (between points); ball_x is then stale (0, 52, 205, ...)
        RamVariable("ball_x", 49, present_address=54),
        RamVariable("ball_y", 54, present_address=54),
    ),
    "Breakout": (
        RamVariable("player_x", 72),
        # ball_y is 0 while no ball is in play (before FIRE); ball_x is then stale
        RamVariable("ball_x", 99, present_address=101),
        RamVariable("ball_y", 101, present_address=101),
    ),
    "Boxing": (
        RamVariable("player_x", 32),
        RamVariable("player_y", 34),
        RamVariable("enemy_x", 33),
        RamVariable("enemy_y", 35),
    ),
    "Freeway": (RamVariable("player_y", 14),),  # the chicken
}
"""Per game (canonical CamelCase name), the object coordinates probed."""

PROBES = ("token_ridge", "token_mlp", "pixel_ridge", "pixel_mlp", "constant")
"""The probes of every variable, in table order."""
RIDGE_ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge penalties per frame on standardised inputs (λ = α · n). The search starts in the middle of the grid
and tries neighbours until each variable's best α on the validation split has both its neighbours tried
(a local minimum of the validation error along the grid)."""
PRECOMPUTE_BYTES = 1 << 30
"""The MLP standardises its inputs once when they fit in this many bytes (float32), else every minibatch."""
MIN_FIT_FRAMES = 10
"""A variable defined on fewer fitting frames (or on fewer than 2 held-out frames) is not probed."""


@dataclass
class ProbeConfig:
    """Probe settings (the `wam tokenizer probe` flags)."""

    max_frames: int = 20_000
    """Training frames per game (fit + validation), drawn uniformly from the training episodes when there are more."""
    max_heldout_frames: int = 5_000
    """Held-out frames per game, spread evenly over the held-out episodes when there are more."""
    holdout_fraction: float | None = None
    """Fraction of each dataset's episodes (the last ones) held out; default: the tokenizer run's own."""
    val_fraction: float = 0.15
    """Fraction of the training episodes (the last ones of each dataset) used to choose α and stop the MLP."""
    hidden: int = 256
    """Hidden units of the MLP probe (one ReLU layer)."""
    epochs: int = 30
    """Most MLP epochs (passes over the fitting frames)."""
    patience: int = 3
    """Stop the MLP after this many epochs without a better validation loss."""
    batch_size: int = 256
    """MLP minibatch size."""
    lr: float = 1e-3
    """MLP Adam learning rate."""
    pixels: bool = True
    """Also probe the raw pixels (the reference; most of the run time)."""
    seed: int = 0
    """Seed of the frame subsample and of the MLPs."""

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_heldout_frames", "hidden", "epochs", "patience", "batch_size"):
            if getattr(self, name) <= 0:
                raise WamError(f"{name} must be positive, got {getattr(self, name)}")
        if self.holdout_fraction is not None and not 0.0 < self.holdout_fraction < 1.0:
            raise WamError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise WamError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise WamError(f"lr must be positive, got {self.lr}")


# ------------------------------------------------------------------------------------ probe math
def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SSE / SST on the given frames (SST around their own mean); NaN when y is constant or empty."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    sst = float(((y - y.mean()) ** 2).sum())
    if sst <= 0.0:
        return float("nan")
    return 1.0 - float(((y - pred) ** 2).sum()) / sst


def _spans(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


class Standardizer:
    """Per-feature mean / std of the fitting rows (float64, chunked); features with std <= `eps` are dropped.

    `x` is any [N, F] tensor (uint8 pixels included); `scale` multiplies it first (1/255 for pixels).
    """

    def __init__(self, x: torch.Tensor, scale: float = 1.0, eps: float = 1e-8, chunk: int = 4096):
        self.scale = float(scale)
        n, f = x.shape
        if n == 0:
            raise ValueError("cannot standardise zero rows")
        total = torch.zeros(f, dtype=torch.float64)
        for a, b in _spans(n, chunk):
            total += x[a:b].to(torch.float64).sum(0)
        mean = total * self.scale / n
        sq = torch.zeros(f, dtype=torch.float64)
        for a, b in _spans(n, chunk):
            sq += (x[a:b].to(torch.float64) * self.scale - mean).square().sum(0)
        std = (sq / n).sqrt()
        self.keep = torch.nonzero(std > eps).squeeze(1)
        self.mean, self.std = mean[self.keep], std[self.keep]
        self.in_features = f

    @property
    def features(self) -> int:
        return int(self.keep.numel())

    def __call__(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standardised [n, features] of raw rows x [n, F]."""
        z = (x[:, self.keep].to(torch.float64) * self.scale - self.mean) / self.std
        return z.to(dtype)


def _mask_groups(mask: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
    """The distinct columns of bool [N, V], each with the variables (columns) that share it."""
    groups: dict[bytes, tuple[np.ndarray, list[int]]] = {}
    for v in range(mask.shape[1]):
        col = np.ascontiguousarray(mask[:, v])
        groups.setdefault(col.tobytes(), (col, []))[1].append(v)
    return list(groups.values())


@dataclass
class RidgeProbe:
    """A fitted ridge probe: `predict(x) = standardise(x) @ weight + bias`, one column per variable."""

    std: Standardizer
    weight: torch.Tensor  # [F_kept, V] float64
    bias: torch.Tensor  # [V] float64
    alpha: list[float | None]
    """The penalty chosen per variable (None: not fitted)."""

    def predict(self, x: torch.Tensor, chunk: int = 2048) -> np.ndarray:
        out = [self.std(x[a:b]) @ self.weight + self.bias for a, b in _spans(len(x), chunk)]
        if not out:
            return np.zeros((0, len(self.bias)))
        return torch.cat(out).numpy()


def fit_ridge(x_fit: torch.Tensor, y_fit: np.ndarray, m_fit: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray,
              m_val: np.ndarray, scale: float = 1.0, alphas: Sequence[float] = RIDGE_ALPHAS,
              chunk: int = 2048) -> RidgeProbe:
    """Ridge regressions of every target column of y [N, V] on x [N, F], each on its own frames (mask [N, V]).

    Inputs are standardised on the fitting rows; the intercept is not penalised. For each variable the
    α of the grid `alphas` with the lowest validation MSE (on its masked validation rows) is kept (the middle
    one when it has no validation rows). The search starts at the middle α and tries the untried neighbour
    closest to it of any variable's current best until every best has both neighbours tried (a local
    minimum along the grid; the error is normally unimodal in log α), which saves most factorisations. Targets sharing a mask are solved together: with more frames than
    features in the primal form (the F x F Gram of the group's rows, obtained as the Gram of all fitting
    rows minus that of the excluded ones), otherwise in the dual form (the n x n kernel); one Cholesky
    factorisation per α.
    """
    std = Standardizer(x_fit, scale)
    f, v_count = std.features, y_fit.shape[1]
    y_fit_t, y_val_t = torch.as_tensor(y_fit, dtype=torch.float64), torch.as_tensor(y_val, dtype=torch.float64)
    weight = torch.zeros(f, v_count, dtype=torch.float64)
    bias = torch.full((v_count,), float("nan"), dtype=torch.float64)
    chosen: list[float | None] = [None] * v_count

    def rows_gram(idx: np.ndarray, out: torch.Tensor, sign: float) -> None:
        for a, b in _spans(len(idx), chunk):
            z = std(x_fit[torch.from_numpy(idx[a:b])])
            out.addmm_(z.T, z, alpha=sign)

    gram: torch.Tensor | None = None  # of all fitting rows, computed when a group first needs it
    for group_mask, cols in _mask_groups(m_fit):
        rows = np.flatnonzero(group_mask)
        n = len(rows)
        if n < 2:
            continue
        y_g = y_fit_t[torch.from_numpy(rows)][:, cols]  # [n, Vg]
        ybar = y_g.mean(0)
        if n < f:  # dual form: the n x n kernel of the centred rows
            z = torch.cat([std(x_fit[torch.from_numpy(rows[a:b])]) for a, b in _spans(n, chunk)])
            mu = z.mean(0)
            z -= mu
            kernel = z @ z.T
            yc = y_g - ybar

            def solve(lam: float, z=z, kernel=kernel, yc=yc) -> torch.Tensor:
                k = kernel.clone()
                k.diagonal().add_(lam)
                chol, info = torch.linalg.cholesky_ex(k)
                dual = torch.cholesky_solve(yc, chol) if int(info) == 0 else torch.linalg.lstsq(k, yc).solution
                return z.T @ dual  # [F, Vg]
        else:  # primal form: the F x F Gram of the group's rows, centred
            excluded = np.flatnonzero(~group_mask)
            if len(excluded) <= n:  # the Gram of all rows minus that of the (few) excluded ones
                if gram is None:
                    gram = torch.zeros(f, f, dtype=torch.float64)
                    rows_gram(np.arange(len(x_fit)), gram, 1.0)
                a_mat = gram.clone()
                rows_gram(excluded, a_mat, -1.0)
            else:
                a_mat = torch.zeros(f, f, dtype=torch.float64)
                rows_gram(rows, a_mat, 1.0)
            sx = torch.zeros(f, dtype=torch.float64)
            sxy = torch.zeros(f, len(cols), dtype=torch.float64)
            for a, b in _spans(n, chunk):
                z = std(x_fit[torch.from_numpy(rows[a:b])])
                sx += z.sum(0)
                sxy += z.T @ y_g[a:b]
            mu = sx / n
            a_mat -= n * torch.outer(mu, mu)  # centred Gram: sum (z - mu)(z - mu)^T
            b_mat = sxy - n * torch.outer(mu, ybar)  # centred cross-products
            diag = a_mat.diagonal().clone()

            def solve(lam: float, a_mat=a_mat, b_mat=b_mat, diag=diag) -> torch.Tensor:
                a_mat.diagonal().copy_(diag + lam)
                chol, info = torch.linalg.cholesky_ex(a_mat)
                return (torch.cholesky_solve(b_mat, chol) if int(info) == 0
                        else torch.linalg.lstsq(a_mat, b_mat).solution)  # [F, Vg]
        val_mask = torch.as_tensor(m_val[:, cols])
        has_val = val_mask.any(0).tolist()
        grid = sorted(alphas)
        first = len(grid) // 2
        tried: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # grid index -> (w, b0, val MSE)
        todo = first
        while True:
            w = solve(grid[todo] * n)
            b0 = ybar - mu @ w
            if len(x_val):
                pred = torch.cat([std(x_val[a:b]) @ w + b0 for a, b in _spans(len(x_val), chunk)])
                err = ((pred - y_val_t[:, cols]).square() * val_mask).sum(0) / val_mask.sum(0).clamp_min(1)
            else:
                err = torch.zeros(len(cols), dtype=torch.float64)
            tried[todo] = (w, b0, err)
            # each variable's best so far; go on until every best has both grid neighbours tried
            best = [min(tried, key=lambda k, j=j: (float(tried[k][2][j]), k)) if has_val[j] else first
                    for j in range(len(cols))]
            needed = {k for b in best for k in (b - 1, b + 1) if 0 <= k < len(grid) and k not in tried}
            if not needed:
                break
            todo = min(needed, key=lambda k: (abs(k - first), k))
        for j, c in enumerate(cols):
            w, b0, _ = tried[best[j]]
            weight[:, c], bias[c], chosen[c] = w[:, j], b0[j], float(grid[best[j]])
    return RidgeProbe(std=std, weight=weight, bias=bias, alpha=chosen)


@dataclass
class MlpProbe:
    """A fitted MLP probe (one hidden ReLU layer) on standardised inputs, trained on all variables at once.

    Early stopping is per variable: variable v is predicted with the weights of its best validation epoch
    (`best_epoch[v]`; `states` holds each distinct snapshot, `state_of[v]` indexes it).
    """

    std: Standardizer
    net: nn.Sequential | None
    """None when every input feature is constant on the fitting frames: the probe predicts the mean."""
    y_mean: torch.Tensor  # [V] float32
    y_std: torch.Tensor  # [V] float32
    states: list[dict[str, torch.Tensor]]
    state_of: list[int]
    epochs: int
    """Epochs trained."""
    best_epoch: list[int]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 2048) -> np.ndarray:
        out = self.y_mean.double().expand(len(x), -1).clone()
        if self.net is None:
            return out.numpy()
        self.net.eval()
        for k, state in enumerate(self.states):
            cols = [v for v, s in enumerate(self.state_of) if s == k]
            self.net.load_state_dict(state)
            for a, b in _spans(len(x), chunk):
                pred = self.net(self.std(x[a:b], torch.float32)) * self.y_std + self.y_mean
                out[a:b, cols] = pred[:, cols].double()
        return out.numpy()


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[V]: each variable's MSE on its own frames (0 for a variable without frames)."""
    return ((pred - y).square() * m).sum(0) / m.sum(0).clamp_min(1)


def fit_mlp(x_fit: torch.Tensor, y_fit: np.ndarray, m_fit: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray,
            m_val: np.ndarray, scale: float = 1.0, hidden: int = 256, epochs: int = 30, patience: int = 3,
            batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> MlpProbe:
    """An MLP regressing every column of y [N, V] (each on its frames, mask [N, V]) from x [N, F].

    Inputs and targets are standardised on the fitting rows; the loss is the mean over variables of their
    masked MSE. The output layer starts at zero, so the untrained network (epoch 0) predicts the training
    mean. Adam on shuffled minibatches. Before training and after each epoch every variable's validation MSE
    is computed; each variable keeps the weights of its best epoch (0 when training never beats the mean),
    and training stops when no variable has improved for `patience` epochs (without validation rows all
    `epochs` are trained and the last weights kept). Weights and shuffles come from `seed` (the global
    RNGs are left as they were).
    """
    std = Standardizer(x_fit, scale)
    y = torch.as_tensor(y_fit, dtype=torch.float32)
    m = torch.as_tensor(m_fit, dtype=torch.float32)
    v_count = y.shape[1]
    count = m.sum(0).clamp_min(1)
    y_mean = (y * m).sum(0) / count
    y_std = (((y - y_mean).square() * m).sum(0) / count).sqrt()
    y_std = torch.where(y_std > 0, y_std, torch.ones_like(y_std))
    yn = (y - y_mean) / y_std
    yv = (torch.as_tensor(y_val, dtype=torch.float32) - y_mean) / y_std
    mv = torch.as_tensor(m_val, dtype=torch.float32)
    if std.features == 0:
        return MlpProbe(std=std, net=None, y_mean=y_mean, y_std=y_std, states=[], state_of=[], epochs=0,
                        best_epoch=[0] * v_count)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(std.features, hidden), nn.ReLU(), nn.Linear(hidden, v_count))
    nn.init.zeros_(net[2].weight)  # untrained, the probe predicts the training mean (epoch 0 = the constant)
    nn.init.zeros_(net[2].bias)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    has_val = mv.any(0)  # [V]
    # standardise once when the float32 copies fit in PRECOMPUTE_BYTES, else per batch
    if (len(x_fit) + len(x_val)) * std.features * 4 <= PRECOMPUTE_BYTES:
        z_fit = torch.cat([std(x_fit[a:b], torch.float32) for a, b in _spans(len(x_fit), 4096)])
        z_val = torch.cat([std(x_val[a:b], torch.float32) for a, b in _spans(len(x_val), 4096)]) if len(x_val) \
            else torch.zeros(0, std.features)

        def inputs(x: torch.Tensor, idx: torch.Tensor | slice, pre: torch.Tensor) -> torch.Tensor:
            return pre[idx]
    else:
        z_fit = z_val = torch.zeros(0)

        def inputs(x: torch.Tensor, idx: torch.Tensor | slice, pre: torch.Tensor) -> torch.Tensor:
            return std(x[idx], torch.float32)

    @torch.no_grad()
    def val_losses() -> torch.Tensor:
        net.eval()
        preds = torch.cat([net(inputs(x_val, slice(a, b), z_val)) for a, b in _spans(len(x_val), 2048)])
        net.train()
        return _masked_mse(preds, yv, mv)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: t.detach().clone() for k, t in net.state_dict().items()}

    best = torch.full((v_count,), math.inf)
    states: list[dict[str, torch.Tensor]] = []
    state_of, best_epoch = [-1] * v_count, [0] * v_count
    since, done = 0, 0
    net.train()
    for epoch in range(0, epochs + 1):
        if epoch > 0:
            order = torch.randperm(len(x_fit), generator=gen)
            for a, b in _spans(len(order), batch_size):
                idx = order[a:b]
                loss = _masked_mse(net(inputs(x_fit, idx, z_fit)), yn[idx], m[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            done = epoch
        if not bool(has_val.any()) or len(x_val) == 0:
            continue
        current = val_losses()
        improved = [v for v in range(v_count) if bool(has_val[v]) and bool(current[v] < best[v])]
        if improved:
            states.append(snapshot())
            for v in improved:
                best[v], state_of[v], best_epoch[v] = current[v], len(states) - 1, epoch
            since = 0
        else:
            since += 1
            if since >= patience:
                break
    missing = [v for v in range(v_count) if state_of[v] < 0]  # no validation rows: the last weights
    if missing:
        states.append(snapshot())
        for v in missing:
            state_of[v], best_epoch[v] = len(states) - 1, done
    used = sorted(set(state_of))  # drop snapshots no variable kept
    states = [states[k] for k in used]
    state_of = [used.index(k) for k in state_of]
    net.eval()
    return MlpProbe(std=std, net=net, y_mean=y_mean, y_std=y_std, states=states, state_of=state_of, epochs=done,
                    best_epoch=best_epoch)


# ------------------------------------------------------------------------------------ data
@dataclass
class Split:
    """Frames of one split of one game with their RAM and tokens."""

    frames: np.ndarray  # uint8 [N, 84, 84]
    ram: np.ndarray  # uint8 [N, 128]
    tokens: np.ndarray  # int64 [N, K] (K tokens a frame: 36 or 121)

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class GameData:
    """A game's probe data: fitting, validation and held-out frames, pooled over its datasets."""

    game: str
    datasets: list[str]
    fit: Split
    val: Split
    heldout: Split
    episodes: dict[str, int]
    """Episodes per split: train (fit + val episodes), val, heldout."""
    training_frames: int
    """Frames in the training episodes before subsampling to `max_frames`."""
    heldout_total: int
    """Frames in the held-out episodes before subsampling to `max_heldout_frames`."""
    tokens_from: str
    """"cache" (every dataset held this tokenizer's token cache), "encoded" or "cache+encoded"."""


def token_features(tokenizer: VQTokenizer, tokens: np.ndarray | torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """float32 [N, 36·D]: each frame's tokens looked up in the codebook (`quantizer.lookup`) and flattened."""
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64) if isinstance(tokens, np.ndarray) else tokens)
    out = []
    with torch.no_grad():
        for a, b in _spans(len(t), chunk):
            out.append(tokenizer.quantizer.lookup(t[a:b].to(tokenizer.device)).flatten(1).float().cpu())
    if not out:
        return torch.zeros(0, t.shape[1] * tokenizer.cfg.codebook_dim)
    return torch.cat(out)


def _rows_of(store: TrajectoryStore, episodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(episode id, frame index) of every frame of `episodes`."""
    lengths = store.episode_lengths()[episodes] + 1
    ep = np.repeat(episodes, lengths)
    t = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)
    return ep.astype(np.int64), t.astype(np.int64)


def _read_rows(store: TrajectoryStore, ep: np.ndarray, t: np.ndarray, tid: str, encode: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[Split, bool]:
    """Frames, RAM and tokens of rows (ep, t) in that order; (split, whether the token cache was used)."""
    cached = store.tokenizer_id() == tid and store.has_tokens()
    frames = np.empty((len(ep), 84, 84), dtype=np.uint8)
    ram = np.empty((len(ep), 128), dtype=np.uint8)
    tokens = np.empty((len(ep), store.tokens_per_frame if cached else 0), dtype=np.int64)
    for e in np.unique(ep).tolist():
        at = np.flatnonzero(ep == e)
        lo, hi = int(t[at].min()), int(t[at].max()) + 1
        local = t[at] - lo
        frames[at] = store.read_window(e, lo, hi, "observations")[local]
        ram[at] = store.read_window(e, lo, hi, "ram")[local]
        if cached:
            tokens[at] = store.read_window(e, lo, hi, "obs_tokens")[local]
    if not cached and len(ep):
        tokens = np.asarray(encode(frames), dtype=np.int64)
    return Split(frames, ram, tokens), cached


def _concat(splits: Sequence[Split]) -> Split:
    if not splits:
        return Split(np.zeros((0, 84, 84), np.uint8), np.zeros((0, 128), np.uint8), np.zeros((0, 36), np.int64))
    return Split(*(np.concatenate([getattr(s, k) for s in splits]) for k in ("frames", "ram", "tokens")))


def load_game_data(stores: Sequence[TrajectoryStore], tokenizer: VQTokenizer, cfg: ProbeConfig,
                   holdout_fraction: float, encode_batch: int = 256) -> GameData:
    """The probe data of one game from its datasets `stores` (see the module docstring for the splits)."""
    game = stores[0].game
    if all(s.num_episodes < 2 for s in stores):
        raise DataError(f"{game}: the probe holds out whole episodes, but every dataset of the game has fewer than "
                        f"2 episodes ({', '.join(str(s.directory) for s in stores)}); collect more episodes")
    splits = split_episodes(stores, holdout_fraction)
    rng = np.random.default_rng(cfg.seed)
    tid = tokenizer.tokenizer_id()

    def encode(frames: np.ndarray) -> np.ndarray:
        return tokenizer.encode(frames, batch_size=encode_batch).cpu().numpy()

    # every training frame: (dataset, episode, t, is_val)
    table, n_train_eps, n_val_eps, n_held_eps = [], 0, 0, 0
    for d, (s, (train, held)) in enumerate(zip(stores, splits)):
        n_train_eps, n_held_eps = n_train_eps + len(train), n_held_eps + len(held)
        if len(train) == 0:
            continue
        ep, t = _rows_of(s, train)
        if len(train) >= 2:
            n_val = min(len(train) - 1, max(1, round(cfg.val_fraction * len(train))))
            is_val = np.isin(ep, train[-n_val:])
            n_val_eps += n_val
        else:  # one training episode: its last frames validate
            cut = len(t) - max(1, round(cfg.val_fraction * len(t)))
            is_val = t >= cut
        table.append(np.stack([np.full(len(ep), d), ep, t, is_val.astype(np.int64)], axis=1))
    rows = np.concatenate(table)
    training_frames = len(rows)
    if len(rows) > cfg.max_frames:
        rows = rows[np.sort(rng.choice(len(rows), size=cfg.max_frames, replace=False))]

    held_rows = []
    for d, (s, (_, held)) in enumerate(zip(stores, splits)):
        if len(held):
            ep, t = _rows_of(s, held)
            held_rows.append(np.stack([np.full(len(ep), d), ep, t], axis=1))
    held = np.concatenate(held_rows)
    heldout_total = len(held)
    if len(held) > cfg.max_heldout_frames:
        held = held[np.unique(np.linspace(0, len(held) - 1, cfg.max_heldout_frames).round().astype(np.int64))]

    parts: dict[str, list[Split]] = {"fit": [], "val": [], "heldout": []}
    used_cache: set[bool] = set()
    for d, s in enumerate(stores):
        for name, sel in (("fit", rows[(rows[:, 0] == d) & (rows[:, 3] == 0)]),
                          ("val", rows[(rows[:, 0] == d) & (rows[:, 3] == 1)]),
                          ("heldout", held[held[:, 0] == d])):
            if len(sel):
                split, cached = _read_rows(s, sel[:, 1], sel[:, 2], tid, encode)
                parts[name].append(split)
                used_cache.add(cached)
    tokens_from = "+".join(k for k, on in (("cache", True in used_cache), ("encoded", False in used_cache)) if on)
    return GameData(game=game, datasets=[str(s.directory) for s in stores], fit=_concat(parts["fit"]),
                    val=_concat(parts["val"]), heldout=_concat(parts["heldout"]),
                    episodes={"train": n_train_eps, "val": n_val_eps, "heldout": n_held_eps},
                    training_frames=training_frames, heldout_total=heldout_total, tokens_from=tokens_from)


# ------------------------------------------------------------------------------------ one game
def _targets(variables: Sequence[RamVariable], ram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 [N, V], defined bool [N, V]) of the variables in RAM rows [N, 128]."""
    y = np.stack([ram[:, v.address].astype(np.float64) for v in variables], axis=1) if len(ram) else \
        np.zeros((0, len(variables)))
    m = np.stack([v.mask(ram) for v in variables], axis=1) if len(ram) else np.zeros((0, len(variables)), bool)
    return y, m


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def probe_game(data: GameData, tokenizer: VQTokenizer, cfg: ProbeConfig,
               say: Callable[[str], None] = lambda s: None) -> dict:
    """Fit every probe of `data`'s game and score it on the held-out frames; the game's entry of probe.json."""
    variables = RAM_VARIABLES[data.game]
    y_fit, m_fit = _targets(variables, data.fit.ram)
    y_val, m_val = _targets(variables, data.val.ram)
    y_ho, m_ho = _targets(variables, data.heldout.ram)
    usable = [m_fit[:, j].sum() >= MIN_FIT_FRAMES and m_ho[:, j].sum() >= 2 for j in range(len(variables))]
    preds: dict[str, np.ndarray] = {}
    alphas: dict[str, list[float | None]] = {}
    epochs: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    features: dict[str, int] = {}
    kinds: list[tuple[str, Callable[[Split], torch.Tensor], float]] = [
        ("token", lambda s: token_features(tokenizer, s.tokens), 1.0)]
    if cfg.pixels:
        kinds.append(("pixel", lambda s: torch.from_numpy(s.frames.reshape(len(s), -1)), 1.0 / 255.0))
    cols = [j for j, ok in enumerate(usable) if ok]
    if cols:
        for kind, feats, scale in kinds:
            x_fit, x_val, x_ho = feats(data.fit), feats(data.val), feats(data.heldout)
            t0 = time.perf_counter()
            ridge = fit_ridge(x_fit, y_fit[:, cols], m_fit[:, cols], x_val, y_val[:, cols], m_val[:, cols], scale)
            seconds[f"{kind}_ridge"] = time.perf_counter() - t0
            say(f"{data.game}: {kind} ridge on {ridge.std.features} features fitted in {seconds[f'{kind}_ridge']:.1f} s")
            t0 = time.perf_counter()
            mlp = fit_mlp(x_fit, y_fit[:, cols], m_fit[:, cols], x_val, y_val[:, cols], m_val[:, cols], scale,
                          hidden=cfg.hidden, epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                          lr=cfg.lr, seed=cfg.seed)
            seconds[f"{kind}_mlp"] = time.perf_counter() - t0
            say(f"{data.game}: {kind} MLP trained {mlp.epochs} epochs (best per variable {mlp.best_epoch}) in "
                f"{seconds[f'{kind}_mlp']:.1f} s")
            preds[f"{kind}_ridge"], preds[f"{kind}_mlp"] = ridge.predict(x_ho), mlp.predict(x_ho)
            alphas[kind], epochs[kind], features[kind] = ridge.alpha, mlp.best_epoch, ridge.std.features
    rows = []
    for j, var in enumerate(variables):
        fit_mask, ho_mask = m_fit[:, j], m_ho[:, j]
        entry = {"name": var.name, "address": var.address, "mask": var.describe_mask(),
                 "frames": {"fit": int(fit_mask.sum()), "val": int(m_val[:, j].sum()), "heldout": int(ho_mask.sum())},
                 "masked_frames": {"fit": int((~fit_mask).sum()), "val": int((~m_val[:, j]).sum()),
                                   "heldout": int((~ho_mask).sum())},
                 "r2": dict.fromkeys(PROBES), "ratio": None, "ridge_alpha": {}, "note": None}
        if not usable[j]:
            entry["note"] = (f"not probed: the object is defined on {int(fit_mask.sum())} fitting and "
                             f"{int(ho_mask.sum())} held-out frames (need {MIN_FIT_FRAMES} and 2)")
            rows.append(entry)
            continue
        k = cols.index(j)
        y = y_ho[ho_mask, j]
        r2 = {p: r2_score(y, preds[p][ho_mask, k]) for p in preds}
        r2["constant"] = r2_score(y, np.full(len(y), y_fit[fit_mask, j].mean()))
        if not math.isfinite(r2["constant"]):
            entry["note"] = "the variable is constant on the held-out frames: R² undefined"
        entry["r2"] = {p: _nan_to_none(r2.get(p)) for p in PROBES}
        entry["ridge_alpha"] = {kind: alphas[kind][k] for kind in alphas}
        entry["mlp_best_epoch"] = {kind: epochs[kind][k] for kind in epochs}
        token_best = max(r2["token_ridge"], r2["token_mlp"])
        if "pixel_ridge" in r2:
            pixel_best = max(r2["pixel_ridge"], r2["pixel_mlp"])
            if math.isfinite(token_best) and math.isfinite(pixel_best) and pixel_best > 0:
                entry["ratio"] = token_best / pixel_best
        rows.append(entry)
    return {"game": data.game, "datasets": data.datasets, "episodes": data.episodes,
            "frames": {"fit": len(data.fit), "val": len(data.val), "heldout": len(data.heldout),
                       "training_total": data.training_frames, "heldout_total": data.heldout_total},
            "tokens_from": data.tokens_from, "features": features,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "variables": rows}


# ------------------------------------------------------------------------------------ outputs
@dataclass
class ProbeReport:
    """What `probe_tokenizer` wrote and found."""

    out: Path
    result: dict = field(repr=False)
    """The contents of probe.json."""
    seconds: float

    def summary_line(self) -> str:
        parts = []
        for g in self.result["games"]:
            for v in g["variables"]:
                r = v["r2"]
                tok = _best(r["token_ridge"], r["token_mlp"])
                pix = _best(r["pixel_ridge"], r["pixel_mlp"])
                parts.append(f"{g['game']} {v['name']} {_fmt(tok)}" + (f"/{_fmt(pix)}" if pix is not None else ""))
        what = "tokens/pixels" if self.result["config"]["pixels"] else "tokens"
        return (f"probe of tokenizer {self.result['tokenizer']['id']}: held-out R² ({what}, best of ridge and MLP) "
                f"{'; '.join(parts)}; {self.seconds:.0f} s; wrote {self.out}/probe.md")


def _best(a: float | None, b: float | None) -> float | None:
    vals = [x for x in (a, b) if x is not None]
    return max(vals) if vals else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_markdown(path: Path, result: dict) -> None:
    tok = result["tokenizer"]
    cfg = result["config"]
    lines = [
        "# State probe of a frozen tokenizer", "",
        f"Tokenizer `{tok['id']}` (`{tok['checkpoint']}`, step {tok['step']}, codebook {tok['codebook_size']} × "
        f"{tok['codebook_dim']}). Held-out R² of object coordinates read from RAM (AtariARI addresses), regressed "
        f"from the frame's {tok.get('tokens_per_frame', 36)} code vectors (tokens), from the raw 84×84 pixels, and by the training mean "
        f"(constant). Ratio = best token R² / best pixel R² (blank when the pixel R² is not positive).", "",
        "| game | variable | token ridge R² | token MLP R² | pixel ridge R² | pixel MLP R² | constant R² | "
        "ratio token-best/pixel-best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for g in result["games"]:
        for v in g["variables"]:
            r = v["r2"]
            ratio = "" if v["ratio"] is None else f"{v['ratio']:.2f}"
            lines.append(f"| {g['game']} | {v['name']} (RAM[{v['address']}]) | "
                         + " | ".join(_fmt(r[p]) for p in PROBES) + f" | {ratio} |")
            if v["mask"]:
                m = v["masked_frames"]
                notes.append(f"- {g['game']} {v['name']}: {v['mask']} — {m['fit']} fitting, {m['val']} validation "
                             f"and {m['heldout']} held-out frames left out.")
            if v["note"]:
                notes.append(f"- {g['game']} {v['name']}: {v['note']}.")
    lines += ["", "## Data", ""]
    for g in result["games"]:
        f, e = g["frames"], g["episodes"]
        lines.append(f"- {g['game']}: {len(g['datasets'])} dataset(s); {e['train']} training episodes ({e['val']} of "
                     f"them for validation), {e['heldout']} held out; {f['fit']} fitting + {f['val']} validation frames "
                     f"(of {f['training_total']} training frames), {f['heldout']} held-out frames (of "
                     f"{f['heldout_total']}); tokens {g['tokens_from']}; features: "
                     + ", ".join(f"{k} {n}" for k, n in g["features"].items())
                     + "; seconds: " + ", ".join(f"{k} {s:.1f}" for k, s in g["seconds"].items()) + ".")
    if notes:
        lines += ["", "## Masked frames and notes", "", *notes]
    lines += ["", "## Settings", "",
              f"- Held out: the last {cfg['holdout_fraction']:.0%} of each dataset's episodes (at least one); "
              f"validation: the last {cfg['val_fraction']:.0%} of the training episodes.",
              f"- Ridge: float64 closed form on standardised inputs, α per frame chosen on the validation split from "
              f"{', '.join(f'{a:g}' for a in cfg['ridge_alphas'])}; fitted on the fitting frames only.",
              f"- MLP: {cfg['hidden']} ReLU hidden units, Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, at most "
              f"{cfg['epochs']} epochs, early stopping (patience {cfg['patience']}) on the validation split, seed "
              f"{cfg['seed']}.",
              f"- Frames: at most {cfg['max_frames']} training and {cfg['max_heldout_frames']} held-out frames per game.",
              f"- Total time {result['seconds']:.1f} s.", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())


def plot_probe(path: Path, result: dict) -> None:
    """Grouped bars of held-out R², one group per game variable, one bar per probe (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values = [], []
    for g in result["games"]:
        for v in g["variables"]:
            labels.append(f"{g['game']}\n{v['name']}")
            values.append([v["r2"][p] for p in PROBES])
    arr = np.array([[np.nan if x is None else x for x in row] for row in values], dtype=np.float64).reshape(-1, len(PROBES))
    floor = -0.5
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels) + 1.5), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(PROBES)
    colours = ("#1f77b4", "#6baed6", "#d62728", "#fc9272", "#7f7f7f")
    x = np.arange(len(labels))
    for k, (name, colour) in enumerate(zip(PROBES, colours)):
        ax.bar(x + (k - (len(PROBES) - 1) / 2) * width, np.clip(arr[:, k], floor, None), width,
               label=name.replace("_", " ").replace("mlp", "MLP"), color=colour)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(floor, 1.05)
    ax.set_ylabel(f"held-out R² (clipped at {floor})")
    ax.set_title(f"state probe of tokenizer {result['tokenizer']['id']}", fontsize=10)
    ax.legend(fontsize=7, ncol=len(PROBES), loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------ the command
def _check_datasets(stores: Sequence[TrajectoryStore]) -> None:
    no_ram = [s for s in stores if not s.has_ram]
    if no_ram:
        detail = "; ".join(f"{s.directory} ({s.num_episodes_with_ram} of {s.num_episodes} episodes have RAM)"
                           if hasattr(s, "num_episodes_with_ram") else str(s.directory) for s in no_ram)
        raise DataError(f"the probe reads object coordinates from recorded RAM (infos/ram), which these datasets lack: "
                        f"{detail}. `wam data collect` records RAM; DQN-Replay and Minari imports have none")
    unknown = sorted({s.game for s in stores if s.game not in RAM_VARIABLES})
    if unknown:
        raise WamError(f"no RAM annotations for {', '.join(unknown)}; the probe knows "
                       f"{', '.join(sorted(RAM_VARIABLES))} (wam.worldmodel.probe.RAM_VARIABLES)")


def probe_tokenizer(run: str | Path, data: Sequence[str | Path], out: str | Path, cfg: ProbeConfig | None = None,
                    device: str = "cpu", say: Callable[[str], None] = lambda s: None) -> ProbeReport:
    """Probe the newest checkpoint of tokenizer run `run` on the datasets `data`; write probe.json/.md/.png to `out`."""
    from wam.worldmodel.tokenizer import load_tokenizer
    from wam.worldmodel.trainer import resolve_device

    cfg = cfg or ProbeConfig()
    t_start = time.perf_counter()
    if not data:
        raise WamError("no datasets given; pass --data DIR (dataset directories or roots holding them)")
    stores = [TrajectoryStore.open(p) for p in find_datasets(list(data))]
    _check_datasets(stores)
    tokenizer = load_tokenizer(run, device=resolve_device(device))
    holdout = cfg.holdout_fraction if cfg.holdout_fraction is not None else tokenizer.cfg.holdout_fraction
    by_game: dict[str, list[TrajectoryStore]] = {}
    for s in stores:
        by_game.setdefault(s.game, []).append(s)
    games = []
    for game, group in by_game.items():
        t0 = time.perf_counter()
        gd = load_game_data(group, tokenizer, cfg, holdout)
        say(f"{game}: {len(gd.fit)} fitting, {len(gd.val)} validation, {len(gd.heldout)} held-out frames "
            f"(tokens {gd.tokens_from}) loaded in {time.perf_counter() - t0:.1f} s")
        entry = probe_game(gd, tokenizer, cfg, say)
        entry["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        games.append(entry)
    extra = getattr(tokenizer, "extra", {})
    result = {
        "kind": "tokenizer_probe",
        "tokenizer": {"id": tokenizer.tokenizer_id(), "checkpoint": extra.get("checkpoint", str(run)),
                      "step": extra.get("step"), "codebook_size": tokenizer.cfg.codebook_size,
                      "codebook_dim": tokenizer.cfg.codebook_dim, "tokens_per_frame": tokenizer.cfg.tokens_per_frame},
        "config": {**dataclasses.asdict(cfg), "holdout_fraction": holdout, "ridge_alphas": list(RIDGE_ALPHAS)},
        "probes": list(PROBES),
        "games": games,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "probe.json", (json.dumps(result, indent=1, allow_nan=False) + "\n").encode())
    write_markdown(out / "probe.md", result)
    plot_probe(out / "probe.png", result)
    return ProbeReport(out=out, result=result, seconds=result["seconds"])

