"""The parts of the ATLAS core that are plain functions of tensors, and its recurrent state.

`newton_schulz5` (Muon's orthogonalisation), `poly_feature_map` (φ), `silu_grad`, `decay_matrix` (the
gates' products inside a chunk), `chunk_segments` / `close_chunks` (rows at different chunk phases), and the
`AtlasLayerState` / `AtlasState` records. `atlas.py` builds the mixer and the core from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wam.worldmodel.cores.common import where_rows

NS5_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton–Schulz coefficients (a, b, c)

def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's Newton–Schulz-5 orthogonalisation of the matrices in g [..., m, n] (same shape back).

    X = G / ‖G‖_F (a smooth norm sqrt(‖G‖² + eps²), so an all-zero G has finite gradients); then
    `steps` times X <- aX + (bA + cA²)X with A = XXᵀ, on the wide orientation (m <= n).
    """
    a, b, c = NS5_COEFFS
    wide = g.shape[-2] <= g.shape[-1]
    x = g if wide else g.mT
    x = x / torch.sqrt(x.pow(2).sum(dim=(-2, -1), keepdim=True) + eps * eps)
    for _ in range(steps):
        gram = x @ x.mT  # [..., m, m]
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x if wide else x.mT


def poly_feature_map(u: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """φ(u) = coeffs[0]/√d + Σ_{i=1..p} coeffs[i] · u^i, elementwise (the dimension d is kept).

    u [..., d], coeffs [p+1]. The constant is divided by √d so that it adds coeffs[0]² (once) to φ(u)·φ(w).
    """
    coeffs = coeffs.to(u.dtype)
    out = torch.zeros_like(u) + coeffs[0] * u.shape[-1] ** -0.5
    power = u
    for i in range(1, coeffs.shape[0]):
        out = out + coeffs[i] * power
        if i + 1 < coeffs.shape[0]:
            power = power * u
    return out


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz SiLU(z) = σ(z) (1 + z (1 − σ(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def decay_matrix(log_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From log-gates [..., L]: R [..., L, L] with R[τ, j] = Π_{j<l<=τ} a_l (j <= τ, else 0) and the
    cumulative products [..., L] Π_{l<=τ} a_l."""
    cum = log_a.cumsum(-1)
    n = log_a.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=log_a.device).tril()
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf"))
    return diff.exp(), cum.exp()


def chunk_segments(phases: list[int], t: int, chunk: int) -> list[tuple[int, int, list[bool]]]:
    """Split t tokens into segments at every row's chunk boundary.

    phases[b] = tokens row b has already seen in its current chunk. Returns (start, end, closes)
    with closes[b] True where row b's chunk ends at `end`; no segment crosses any row's boundary.
    """
    ends = {t}
    for p in set(phases):
        ends.update(range(chunk - p, t + 1, chunk))
    out, start = [], 0
    for end in sorted(e for e in ends if 0 < e <= t):
        out.append((start, end, [(p + end) % chunk == 0 for p in phases]))
        start = end
    return out


def close_chunks(closes: torch.Tensor, full: tuple[torch.Tensor, ...], mem_start: tuple[torch.Tensor, ...],
                  delta: list[torch.Tensor], decay: torch.Tensor
                  ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor], torch.Tensor]:
    """Rows where `closes` [B] is True start a new chunk: M̄ <- `full` (their memory at the chunk's end), ΔM <- 0,
    A <- 1; other rows keep (mem_start, delta, decay). Every row closing (the usual case in training) needs no
    per-row selection."""
    if bool(closes.all()):
        return full, [torch.zeros_like(dm) for dm in delta], torch.ones_like(decay)
    return (tuple(where_rows(closes, f, m) for f, m in zip(full, mem_start)),
            [where_rows(closes, torch.zeros_like(dm), dm) for dm in delta],
            where_rows(closes, torch.ones_like(decay), decay))


@dataclass(frozen=True)
class AtlasLayerState:
    """One ATLAS layer's state (batch at dim 0 everywhere; never mutated).

    conv: [B, 3·H·d, K-1] last inputs of the short convolution;
    mem_start: memory weights at the current chunk's start, M̄ (one tensor per weight matrix,
      [B, H, out, in]); mem_delta: ΔM accumulated in the chunk; momentum: S (same shapes);
    decay: [B, H] A = Π α since the chunk start;
    win_k, win_v: [B, H, c-1, d] the last c-1 φ(k), v; win_gamma: [B, H, c-1] their γ (0 = no token).
    """

    conv: torch.Tensor
    mem_start: tuple[torch.Tensor, ...]
    mem_delta: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]
    decay: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_gamma: torch.Tensor

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AtlasLayerState:
        return AtlasLayerState(fn(self.conv), tuple(map(fn, self.mem_start)), tuple(map(fn, self.mem_delta)),
                               tuple(map(fn, self.momentum)), fn(self.decay), fn(self.win_k), fn(self.win_v),
                               fn(self.win_gamma))

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv, *self.mem_start, *self.mem_delta, *self.momentum, self.decay, self.win_k,
                self.win_v, self.win_gamma]


@dataclass(frozen=True)
class AtlasState:
    """The ATLAS core's state: one `AtlasLayerState` per layer and phase [B] long, the number of tokens
    each row has seen in its current chunk (0 after a reset). Its size does not grow with time."""

    layers: tuple[AtlasLayerState, ...]
    phase: torch.Tensor

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AtlasState:
        """Apply fn to every tensor (all have batch at dim 0), e.g. `lambda t: t[idx]` or `.detach()`."""
        return AtlasState(tuple(s.map_tensors(fn) for s in self.layers), fn(self.phase))

    def nbytes(self) -> int:
        return self.phase.nbytes + sum(t.nbytes for s in self.layers for t in s.tensors())


__all__ = ["NS5_COEFFS", "AtlasLayerState", "AtlasState", "chunk_segments", "close_chunks", "decay_matrix",
           "newton_schulz5", "poly_feature_map", "silu_grad"]
