"""The probes of `wam tokenizer probe`: R², standardisation, ridge regression with its penalty chosen on a
validation split, and a small MLP, each fitting several masked targets at once (docs/probe.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

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


def spans(n: int, size: int):
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
        for a, b in spans(n, chunk):
            total += x[a:b].to(torch.float64).sum(0)
        mean = total * self.scale / n
        sq = torch.zeros(f, dtype=torch.float64)
        for a, b in spans(n, chunk):
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


def mask_groups(mask: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
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
        out = [self.std(x[a:b]) @ self.weight + self.bias for a, b in spans(len(x), chunk)]
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
    minimum along the grid; the error is normally unimodal in log α), which saves most factorisations.
    Targets sharing a mask are solved together: with more frames than features in the primal form (the
    F x F Gram of the group's rows, obtained as the Gram of all fitting rows minus that of the excluded
    ones), otherwise in the dual form (the n x n kernel); one Cholesky factorisation per α.
    """
    std = Standardizer(x_fit, scale)
    f, v_count = std.features, y_fit.shape[1]
    y_fit_t, y_val_t = torch.as_tensor(y_fit, dtype=torch.float64), torch.as_tensor(y_val, dtype=torch.float64)
    weight = torch.zeros(f, v_count, dtype=torch.float64)
    bias = torch.full((v_count,), float("nan"), dtype=torch.float64)
    chosen: list[float | None] = [None] * v_count

    def rows_gram(idx: np.ndarray, out: torch.Tensor, sign: float) -> None:
        for a, b in spans(len(idx), chunk):
            z = std(x_fit[torch.from_numpy(idx[a:b])])
            out.addmm_(z.T, z, alpha=sign)

    gram: torch.Tensor | None = None  # of all fitting rows, computed when a group first needs it
    for group_mask, cols in mask_groups(m_fit):
        rows = np.flatnonzero(group_mask)
        n = len(rows)
        if n < 2:
            continue
        y_g = y_fit_t[torch.from_numpy(rows)][:, cols]  # [n, Vg]
        ybar = y_g.mean(0)
        if n < f:  # dual form: the n x n kernel of the centred rows
            z = torch.cat([std(x_fit[torch.from_numpy(rows[a:b])]) for a, b in spans(n, chunk)])
            solve, mu = _dual_form(z, y_g - ybar)
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
            chunks = (std(x_fit[torch.from_numpy(rows[a:b])]) for a, b in spans(n, chunk))  # lazily: n may be large
            solve, mu = _primal_form(a_mat, chunks, y_g, ybar)
        def fitted(alpha: float, n=n, solve=solve, ybar=ybar, mu=mu) -> tuple[torch.Tensor, torch.Tensor]:
            w = solve(alpha * n)
            return w, ybar - mu @ w

        val_mask = torch.as_tensor(m_val[:, cols])
        for j, (c, (w, b0, alpha)) in enumerate(zip(cols, _search_alpha(
                fitted, std, x_val, y_val_t[:, cols], val_mask, alphas, chunk))):
            weight[:, c], bias[c], chosen[c] = w[:, j], b0[j], alpha
    return RidgeProbe(std=std, weight=weight, bias=bias, alpha=chosen)


def _dual_form(z: torch.Tensor, yc: torch.Tensor) -> tuple[Callable[[float], torch.Tensor], torch.Tensor]:
    """Ridge in the dual form on standardised rows z [n, F] and centred targets yc [n, V]: (solve, mean of z).

    `solve(lam)` gives the weights [F, V] for the penalty lam from the n x n kernel of the centred rows.
    """
    mu = z.mean(0)
    z -= mu
    kernel = z @ z.T

    def solve(lam: float) -> torch.Tensor:
        k = kernel.clone()
        k.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(k)
        dual = torch.cholesky_solve(yc, chol) if int(info) == 0 else torch.linalg.lstsq(k, yc).solution
        return z.T @ dual  # [F, V]
    return solve, mu


def _primal_form(a_mat: torch.Tensor, z_chunks: Iterable[torch.Tensor], y_g: torch.Tensor,
                 ybar: torch.Tensor) -> tuple[Callable[[float], torch.Tensor], torch.Tensor]:
    """Ridge in the primal form: (solve, mean of the rows) from the uncentred Gram a_mat [F, F] of the rows.

    z_chunks are the standardised rows in order, in chunks aligned with y_g [n, V]; a_mat is centred in place.
    """
    f, n = a_mat.shape[0], len(y_g)
    sx = torch.zeros(f, dtype=torch.float64)
    sxy = torch.zeros(f, y_g.shape[1], dtype=torch.float64)
    start = 0
    for z in z_chunks:
        sx += z.sum(0)
        sxy += z.T @ y_g[start:start + len(z)]
        start += len(z)
    mu = sx / n
    a_mat -= n * torch.outer(mu, mu)  # centred Gram: sum (z - mu)(z - mu)^T
    b_mat = sxy - n * torch.outer(mu, ybar)  # centred cross-products
    diag = a_mat.diagonal().clone()

    def solve(lam: float) -> torch.Tensor:
        a_mat.diagonal().copy_(diag + lam)
        chol, info = torch.linalg.cholesky_ex(a_mat)
        return (torch.cholesky_solve(b_mat, chol) if int(info) == 0
                else torch.linalg.lstsq(a_mat, b_mat).solution)  # [F, V]
    return solve, mu


def _search_alpha(fitted, std: Standardizer, x_val: torch.Tensor, y_val: torch.Tensor, val_mask: torch.Tensor,
                  alphas: Sequence[float], chunk: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per target column: (weights [F, V], intercepts [V], alpha) of the fit whose alpha has the lowest masked
    validation MSE for that column, `fitted(alpha) -> (w, b0)` solving all columns at once. The search starts
    at the middle of the sorted grid and tries the untried neighbour closest to it of any column's current best
    until every best has both neighbours tried; a column without validation rows takes the middle alpha."""
    has_val = val_mask.any(0).tolist()
    grid = sorted(alphas)
    first = len(grid) // 2
    tried: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # grid index -> (w, b0, val MSE)
    todo = first
    while True:
        w, b0 = fitted(grid[todo])
        if len(x_val):
            pred = torch.cat([std(x_val[a:b]) @ w + b0 for a, b in spans(len(x_val), chunk)])
            err = ((pred - y_val).square() * val_mask).sum(0) / val_mask.sum(0).clamp_min(1)
        else:
            err = torch.zeros(val_mask.shape[1], dtype=torch.float64)
        tried[todo] = (w, b0, err)
        # each column's best so far; go on until every best has both grid neighbours tried
        best = [min(tried, key=lambda k, j=j: (float(tried[k][2][j]), k)) if has_val[j] else first
                for j in range(val_mask.shape[1])]
        needed = {k for b in best for k in (b - 1, b + 1) if 0 <= k < len(grid) and k not in tried}
        if not needed:
            break
        todo = min(needed, key=lambda k: (abs(k - first), k))
    return [(tried[b][0], tried[b][1], float(grid[b])) for b in best]


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
            for a, b in spans(len(x), chunk):
                pred = self.net(self.std(x[a:b], torch.float32)) * self.y_std + self.y_mean
                out[a:b, cols] = pred[:, cols].double()
        return out.numpy()


def masked_mse(pred: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
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
    m = torch.as_tensor(m_fit, dtype=torch.float32)
    v_count = m.shape[1]
    yn, yv, y_mean, y_std = _standardized_targets(y_fit, m, y_val)
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
    fit_rows, val_rows = _standardized_rows(std, x_fit, len(x_val)), _standardized_rows(std, x_val, len(x_fit))

    @torch.no_grad()
    def val_losses() -> torch.Tensor:
        net.eval()
        preds = torch.cat([net(val_rows(slice(a, b))) for a, b in spans(len(x_val), 2048)])
        net.train()
        return masked_mse(preds, yv, mv)

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
            for a, b in spans(len(order), batch_size):
                idx = order[a:b]
                loss = masked_mse(net(fit_rows(idx)), yn[idx], m[idx]).mean()
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
    states, state_of = _kept_states(states, state_of)
    net.eval()
    return MlpProbe(std=std, net=net, y_mean=y_mean, y_std=y_std, states=states, state_of=state_of, epochs=done,
                    best_epoch=best_epoch)


def _standardized_rows(std: Standardizer, x: torch.Tensor, other_rows: int = 0
                       ) -> Callable[[torch.Tensor | slice], torch.Tensor]:
    """Rows of x, standardised, as float32: standardised once when they fit in PRECOMPUTE_BYTES beside
    `other_rows` more rows, else per call."""
    if (len(x) + other_rows) * std.features * 4 <= PRECOMPUTE_BYTES:
        z = (torch.cat([std(x[a:b], torch.float32) for a, b in spans(len(x), 4096)]) if len(x)
             else torch.zeros(0, std.features))
        return lambda idx: z[idx]
    return lambda idx: std(x[idx], torch.float32)


def _standardized_targets(y_fit: np.ndarray, m: torch.Tensor, y_val: np.ndarray
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fitting targets, validation targets, mean, std): each column standardised by the mean and std of its
    masked fitting rows (a constant column keeps std 1)."""
    y = torch.as_tensor(y_fit, dtype=torch.float32)
    count = m.sum(0).clamp_min(1)
    y_mean = (y * m).sum(0) / count
    y_std = (((y - y_mean).square() * m).sum(0) / count).sqrt()
    y_std = torch.where(y_std > 0, y_std, torch.ones_like(y_std))
    return (y - y_mean) / y_std, (torch.as_tensor(y_val, dtype=torch.float32) - y_mean) / y_std, y_mean, y_std


def _kept_states(states: list[dict[str, torch.Tensor]], state_of: list[int]
                 ) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The snapshots some variable kept, and each variable's index into them."""
    used = sorted(set(state_of))
    return [states[k] for k in used], [used.index(k) for k in state_of]

