"""The vector quantizer of the tokenizer: nearest-code lookup in fp32, EMA codebook updates and dead-code
restarts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- quantizer
@dataclass
class Quantized:
    """Output of `VectorQuantizer`: straight-through codes, indices and the quantization losses."""

    z_q: torch.Tensor
    """[N, D] fp32: z + sg(e - z); the forward value is the codebook entry, the gradient flows to z."""
    indices: torch.Tensor
    """[N] int64 codebook indices."""
    commitment: torch.Tensor
    """Scalar ||z - sg(e)||^2 (mean over elements)."""
    codebook: torch.Tensor
    """Scalar ||sg(z) - e||^2 (zero-gradient constant when the codebook is learned by EMA)."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of [N, D] vectors against a [K, D] codebook (fp32).

    Codebook upkeep in training mode (`self.training`): a data-dependent initialisation on the first
    batch (codes = random encoder outputs), EMA updates when `ema_decay > 0`, and dead-code restarts when
    `dead_code_threshold > 0`. All of it is driven by torch's global RNG, which checkpoints save.
    """

    def __init__(self, codebook_size: int, dim: int, ema_decay: float, usage_decay: float,
                 dead_code_threshold: float, normalize: bool):
        super().__init__()
        self.normalize = normalize
        self.codebook_size, self.dim = codebook_size, dim
        self.ema_decay, self.usage_decay, self.dead_code_threshold = ema_decay, usage_decay, dead_code_threshold
        self.use_ema = ema_decay > 0
        self.embedding = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim),
                                      requires_grad=not self.use_ema)  # [K, D]
        # Running number of assignments per batch of each code (dead-code detection).
        self.register_buffer("usage", torch.ones(codebook_size))  # [K]
        # EMA statistics (kept but unused when the codebook is learned by gradient).
        self.register_buffer("ema_count", torch.ones(codebook_size))  # [K]
        self.register_buffer("ema_sum", self.embedding.detach().clone())  # [K, D]
        self.register_buffer("initialized", torch.tensor(False))
        self.restarts = 0
        """Codes restarted since construction (logging only; not saved)."""

    @staticmethod
    def _nearest(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """[N] int64: index of the nearest codebook row (squared L2) of each row of z; fp32, chunked over N."""
        e_sq = codebook.pow(2).sum(1)  # [K]
        out = []
        for zc in z.split(chunk):
            # ||z||^2 is the same for every code, so argmin(||e||^2 - 2 z.e) is the nearest code.
            dist = torch.addmm(e_sq, zc, codebook.t(), beta=1.0, alpha=-2.0)  # [n, K]
            out.append(dist.argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def codes(self) -> torch.Tensor:
        """[K, D] fp32 codebook as used for search and lookup (unit rows when `normalize`)."""
        e = self.embedding.float()
        return F.normalize(e, dim=1) if self.normalize else e

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[...] int64 -> [..., D] fp32 codebook rows."""
        return F.embedding(indices, self.codes())

    def forward(self, z: torch.Tensor) -> Quantized:
        """z: [N, D] (any float dtype; computed in fp32, l2-normalised first when `normalize`)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.normalize:
                z = F.normalize(z, dim=1)
            if self.training and not bool(self.initialized):
                self._init_from(z.detach())
            indices = self._nearest(z.detach(), self.codes().detach())  # [N]
            e = self.lookup(indices)  # [N, D]
            commitment = F.mse_loss(z, e.detach())
            codebook = F.mse_loss(z.detach(), e) if not self.use_ema else z.new_zeros(())
            z_q = z + (e - z).detach()  # straight-through: forward = e, backward = identity into z
            if self.training:
                self._update(z.detach(), indices)
        return Quantized(z_q=z_q, indices=indices, commitment=commitment, codebook=codebook)

    @torch.no_grad()
    def _random_rows(self, z: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of z drawn at random (with replacement when z has fewer than n rows)."""
        if z.shape[0] >= n:
            rows = z[torch.randperm(z.shape[0], device=z.device)[:n]]
        else:
            rows = z[torch.randint(0, z.shape[0], (n,), device=z.device)]
            rows = rows + 1e-3 * z.std() * torch.randn_like(rows)
        return rows

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor) -> None:
        """Data-dependent initialisation: every code starts at a random encoder output."""
        rows = self._random_rows(z, self.codebook_size)
        self.embedding.copy_(rows)
        self.ema_sum.copy_(rows)
        self.ema_count.fill_(1.0)
        self.usage.fill_(1.0)
        self.initialized.fill_(True)
        log.debug("codebook initialised from %d encoder outputs", z.shape[0])

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """EMA codebook update and dead-code restarts from one training batch."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # [K]
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        if self.use_ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, z)  # [K, D]
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace smoothing, [K]
            self.embedding.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(z)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Move every code used less than `dead_code_threshold` times per batch onto a random row of z [N, D].

        Returns the number of codes restarted. A restarted code starts with a usage of 1 batch-assignment.
        """
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)  # [n_dead]
        if dead.numel() == 0:
            return 0
        rows = self._random_rows(z, dead.numel())
        self.embedding[dead] = rows
        self.ema_sum[dead] = rows
        self.ema_count[dead] = 1.0
        self.usage[dead] = 1.0
        self.restarts += dead.numel()
        return int(dead.numel())
