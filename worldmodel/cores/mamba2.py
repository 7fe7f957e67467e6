"""`mamba2`: the Mamba-2 mixer (Dao & Gu 2024) computed with the SSD chunked algorithm in pure PyTorch.

Per head h (scalar decay), with head dim P and state size N:
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        h_t: [P, N]
    y_t = h_t C_t + D_h x_t
SSD splits the sequence into chunks of `chunk_size` tokens: inside a chunk the output is a masked
(decay-weighted) attention-like matmul, C B^T ⊙ L, applied to dt·x; the chunk-end states are carried
across chunks with their total decay (a small recurrence over chunks). This is mamba-ssm's
`ssd_minimal_discrete`, extended with groups (B, C shared by `nheads / ngroups` heads) and with an
initial state. The step form is the recurrence above.

Parameter names follow mamba-ssm's `Mamba2` (`in_proj` split z, x, B, C, dt; `conv1d` over x, B, C;
`dt_bias`, `A_log`, `D` per head; gated RMSNorm `norm`; `out_proj`) inside mamba-ssm's
`layers.{i}.norm / layers.{i}.mixer / norm_f` layout.

mamba-ssm's fused `mamba_chunk_scan_combined` (CUDA/Triton) runs instead of the pure scan when it is
importable, the input is on a GPU and `use_kernels=True`; that path is verified on GPU only when one is
available (it is not importable on the CPU machines this project is developed on).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from wam.datasets.errors import WamError
from wam.worldmodel.cores.base import register_core
from wam.worldmodel.cores.common import (
    MixerState,
    ResidualMixerCore,
    RMSNorm,
    causal_depthwise_conv,
    inverse_softplus_dt,
    log_path_once,
    work_dtype,
)

log = logging.getLogger(__name__)

try:  # optional fused kernels; verified on GPU only when one is available
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # type: ignore[import-not-found]
except ImportError:
    mamba_chunk_scan_combined = None


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above. [..., T, T]"""
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)  # [..., T(i), T(j)] holding a[i]
    below = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    s = a.masked_fill(~below, 0).cumsum(-2)
    return s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             chunk_size: int, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD chunked scan.

    x: [Bt, T, H, P]; dt: [Bt, T, H] (after softplus); a: [H] (negative); b, c: [Bt, T, G, N] with
    H divisible by G (head h uses group h // (H/G)); h0: [Bt, H, P, N] or None (zeros).
    Returns y [Bt, T, H, P] (without the D skip) and the final state [Bt, H, P, N].
    """
    bt, t, nh, p = x.shape
    g, n = b.shape[2], b.shape[3]
    k = nh // g  # heads per group
    pad = (-t) % chunk_size
    if pad:  # zero dt and x: no decay and no input, so the final state is the state at T
        x, dt, b, c = (F.pad(z, (0, 0) * (z.dim() - 2) + (0, pad)) for z in (x, dt, b, c))
    nc, ln = (t + pad) // chunk_size, chunk_size
    xdt = (x * dt[..., None]).view(bt, nc, ln, g, k, p)  # [Bt, C, L, G, K, P]
    adt = (dt * a).view(bt, nc, ln, nh).permute(0, 3, 1, 2)  # [Bt, H, C, L]
    bc, cc = b.view(bt, nc, ln, g, n), c.view(bt, nc, ln, g, n)
    a_cum = adt.cumsum(-1)  # [Bt, H, C, L]

    # 1. inside each chunk: y_diag = (C B^T ⊙ L) (dt x)
    decay = torch.exp(segsum(adt)).view(bt, g, k, nc, ln, ln)  # [Bt, G, K, C, L(i), L(j)]
    cb = torch.einsum("bclgn,bcsgn->bgcls", cc, bc)  # [Bt, G, C, L, L]
    scores = cb[:, :, None] * decay  # [Bt, G, K, C, L, L]
    y = torch.einsum("bgkcls,bcsgkp->bclgkp", scores, xdt)

    # 2. each chunk's end state from its own inputs
    to_end = torch.exp(a_cum[..., -1:] - a_cum).view(bt, g, k, nc, ln)  # [Bt, G, K, C, L]
    states = torch.einsum("bclgn,bgkcl,bclgkp->bcgkpn", bc, to_end, xdt)  # [Bt, C, G, K, P, N]

    # 3. carry states across chunks: state entering chunk c = sum_z decay(z..c) * states[z]
    if h0 is None:
        h0 = torch.zeros(bt, nh, p, n, dtype=x.dtype, device=x.device)
    states = torch.cat([h0.view(bt, 1, g, k, p, n).to(states.dtype), states], 1)  # [Bt, C+1, G, K, P, N]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0)))).view(bt, g, k, nc + 1, nc + 1)
    carried = torch.einsum("bgkzc,bcgkpn->bzgkpn", chunk_decay, states)  # [Bt, C+1, G, K, P, N]
    entering, final = carried[:, :-1], carried[:, -1]

    # 4. the entering state's contribution to every token of the chunk
    from_start = torch.exp(a_cum).view(bt, g, k, nc, ln)  # [Bt, G, K, C, L]
    y = y + torch.einsum("bclgn,bcgkpn,bgkcl->bclgkp", cc, entering, from_start)
    y = y.reshape(bt, nc * ln, nh, p)[:, :t]
    return y, final.reshape(bt, nh, p, n)


class Mamba2(nn.Module):
    """One Mamba-2 mixer. forward(u [B, T, D], state) -> (y [B, T, D], state); step for one token."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, headdim: int, ngroups: int,
                 chunk_size: int, use_kernels: bool, a_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise WamError(f"mamba2: expand*d_model={self.d_inner} must be a multiple of headdim={headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise WamError(f"mamba2: {self.nheads} heads do not split into ngroups={ngroups}")
        if chunk_size < 1:
            raise WamError(f"mamba2: chunk_size must be >= 1, got {chunk_size}")
        self.d_state, self.d_conv, self.headdim, self.ngroups = d_state, d_conv, headdim, ngroups
        self.chunk_size, self.use_kernels = chunk_size, use_kernels
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*a_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        return MixerState(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=work_dtype(dtype)))

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def forward(self, u: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        bt, t, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, conv = causal_depthwise_conv(xbc.transpose(1, 2), state.conv, self.conv1d.weight, self.conv1d.bias)
        xbc = F.silu(xbc).transpose(1, 2)  # [B, T, conv_dim]
        x, b, c = xbc.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        wd = work_dtype(x.dtype)
        x = x.reshape(bt, t, self.nheads, self.headdim)  # [B, T, H, P]
        b = b.reshape(bt, t, self.ngroups, self.d_state).to(wd)  # [B, T, G, N]
        c = c.reshape(bt, t, self.ngroups, self.d_state).to(wd)
        dt = F.softplus(dt.to(wd) + self.dt_bias.to(wd))  # [B, T, H]
        a = -torch.exp(self.A_log.to(wd))  # [H]
        if self.use_kernels and mamba_chunk_scan_combined is not None and u.is_cuda:
            log_path_once(log, "mamba2: mamba-ssm mamba_chunk_scan_combined kernel")
            y, ssm = mamba_chunk_scan_combined(x, dt, a, b, c, self.chunk_size, initial_states=state.ssm,
                                               return_final_states=True)
        else:
            log_path_once(log, "mamba2: pure-PyTorch SSD chunked scan")
            y, ssm = ssd_scan(x.to(wd), dt, a, b, c, self.chunk_size, state.ssm)
        y = y + x.to(wd) * self.D.to(wd)[:, None]  # [B, T, H, P]
        y = self.norm(y.reshape(bt, t, self.d_inner), z)
        return self.out_proj(y.to(u.dtype)), MixerState(conv, ssm)

    def step(self, u: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        bt = u.shape[0]
        g, k, p, n = self.ngroups, self.nheads // self.ngroups, self.headdim, self.d_state
        z, xbc, dt = self._split(self.in_proj(u))
        xbc, conv = causal_depthwise_conv(xbc[..., None], state.conv, self.conv1d.weight, self.conv1d.bias)
        xbc = F.silu(xbc[..., 0])  # [B, conv_dim]
        x, b, c = xbc.split([self.d_inner, g * n, g * n], dim=-1)
        wd = work_dtype(x.dtype)
        x = x.to(wd).view(bt, g, k, p)
        b, c = b.to(wd).view(bt, g, n), c.to(wd).view(bt, g, n)
        dt = F.softplus(dt.to(wd) + self.dt_bias.to(wd)).view(bt, g, k)  # [B, G, K]
        decay = torch.exp(dt * -torch.exp(self.A_log.to(wd)).view(g, k))  # [B, G, K]
        h = state.ssm.to(wd).view(bt, g, k, p, n)
        h = h * decay[..., None, None] + (x * dt[..., None])[..., None] * b[:, :, None, None, :]  # [B, G, K, P, N]
        y = torch.einsum("bgkpn,bgn->bgkp", h, c) + x * self.D.to(wd).view(g, k, 1)
        y = self.norm(y.reshape(bt, self.d_inner), z)
        return self.out_proj(y.to(u.dtype)), MixerState(conv, h.reshape(bt, self.nheads, p, n))


@register_core("mamba2")
class Mamba2Core(ResidualMixerCore):
    """Residual stack of Mamba-2 mixers with RMSNorm (mamba-ssm's MixerModel layout, no embedding).

    Args:
        d_model, n_layers: width and depth.
        d_state: SSM state size N per head.
        d_conv: depthwise causal convolution width (over x, B, C).
        expand: inner width = expand * d_model.
        headdim: head dim P; heads = expand * d_model / headdim.
        ngroups: groups of heads sharing B and C.
        chunk_size: SSD chunk length (speed/memory only; the result does not depend on it).
        use_kernels: use mamba-ssm's fused kernel on GPU when importable.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, ngroups: int = 1, chunk_size: int = 64, use_kernels: bool = True) -> None:
        super().__init__(d_model, n_layers, lambda: Mamba2(d_model, d_state, d_conv, expand, headdim, ngroups,
                                                           chunk_size, use_kernels))
