"""The heads of the world-action model: the IRIS-style MLP head and the distributional (C51) Q heads, with
the calibrated start that puts E[Q] at a chosen value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from wam.worldmodel.model import WorldActionModelConfig

NUM_ACTIONS = 18
"""The full Atari action space every Q head scores."""


def mlp_head(d_in: int, d_out: int) -> nn.Sequential:
    """IRIS-style head: Linear, ReLU, Linear."""
    return nn.Sequential(nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))


class C51Head(nn.Module):
    """Distributional Q head: MLP with LayerNorm + Mish -> logits [.., 18, n_atoms]."""

    def __init__(self, d_model: int, hidden: int, n_actions: int, n_atoms: int) -> None:
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, n_atoms
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), nn.LayerNorm(hidden), nn.Mish(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.Mish(),
            nn.Linear(hidden, n_actions * n_atoms),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).unflatten(-1, (self.n_actions, self.n_atoms))  # [..., 18, n_atoms]


class QEnsemble(nn.Module):
    """E independent C51 heads; output [..., E, 18, n_atoms]."""

    def __init__(self, cfg: WorldActionModelConfig) -> None:
        super().__init__()
        hidden = cfg.q_hidden_mult * cfg.d_model
        self.heads = nn.ModuleList(C51Head(cfg.d_model, hidden, NUM_ACTIONS, cfg.n_atoms) for _ in range(cfg.q_ensemble))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(h) for head in self.heads], dim=-3)

    @torch.no_grad()
    def calibrate(self, support: torch.Tensor, value: float) -> None:
        """Start every head at expected value `value` for every action and input: output weights small
        (std 0.05 / sqrt(fan_in), so the logits vary by a few hundredths), output bias the logits of
        `mean_logits(support, value)` (all actions alike)."""
        logits = mean_logits(support, value)
        for head in self.heads:
            last = head.net[-1]
            nn.init.normal_(last.weight, mean=0.0, std=0.05 / last.in_features ** 0.5)
            last.bias.copy_(logits.to(last.bias).repeat(head.n_actions))


def mean_logits(support: torch.Tensor, value: float) -> torch.Tensor:
    """Logits [n_atoms] of the maximum-entropy distribution on `support` whose mean is `value`.

    p_i is proportional to exp(beta z_i) (uniform for beta = 0); beta is found by bisection (the mean
    rises monotonically with it). A value outside the open support interval is clipped just inside it.
    """
    z = support.detach().double().cpu()
    lo_v, hi_v = float(z[0]), float(z[-1])
    margin = 1e-3 * (hi_v - lo_v)
    value = min(max(float(value), lo_v + margin), hi_v - margin)
    zn = (z - lo_v) / (hi_v - lo_v)  # [0, 1], so beta in [-200, 200] reaches means within 0.5 % of the ends

    def mean(beta: float) -> float:
        return float((torch.softmax(beta * zn, 0) * z).sum())

    lo, hi = -200.0, 200.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean(mid) < value:
            lo = mid
        else:
            hi = mid
    beta = 0.5 * (lo + hi)
    logits = beta * zn
    return (logits - logits.max()).float()
