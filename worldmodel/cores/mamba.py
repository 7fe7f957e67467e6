"""`mamba`: the Mamba-1 selective SSM (Gu & Dao 2023) in pure PyTorch, with a hand-written backward.

Per channel d and state index n (A is diagonal, [E·d, N]):
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]

The scan runs token by token on one [B, E, N] state, updated in place: on a CPU that state stays in cache,
which makes this ~5x faster than scanning all chunks of the sequence at once (the form used until
2026-12-07, whose per-position [B, chunks, E, N] tensors streamed through memory). Autograd would keep
every token's state ([B, T, E, N], 11x the transformer's activations at T=296), so backward is written out:
the forward keeps only the state entering every `chunk_size`-th token; the backward rebuilds one chunk's
states from it and runs the gradient recurrence g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1} backwards,
taking every input's gradient per token (docs/cores.md). Every exponent is <= 0, so nothing overflows.

Parameter names follow mamba-ssm's `Mamba` (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`,
`out_proj`) in its `layers.{i}.norm / layers.{i}.mixer / norm_f` layout, so the backbone of a
reference checkpoint (without its embedding and LM head) loads with `load_state_dict`.

mamba-ssm's `selective_scan_fn` (CUDA) replaces the pure scan when importable, the input is on a GPU
and `use_kernels=True`; that path is verified on GPU only when one is available (it does not import on
the CPU machines this project is developed on).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from wam.datasets.errors import WamError
from wam.worldmodel.cores.base import register_core
from wam.worldmodel.cores.common import (
    MixerState,
    ResidualMixerCore,
    causal_depthwise_conv,
    inverse_softplus_dt,
    log_path_once,
    work_dtype,
)

log = logging.getLogger(__name__)

try:  # optional fused kernel; verified on GPU only when one is available
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[import-not-found]
except ImportError:
    selective_scan_fn = None


def selective_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   h0: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan (see the module docstring), with a hand-written backward.

    x, dt: [Bt, T, E]; a: [E, N] (negative); b, c: [Bt, T, N]; h0: [Bt, E, N].
    Returns y [Bt, T, E] (without the D skip) and the final state [Bt, E, N].

    Nothing of size [Bt, T, E, N] is kept for backward: the forward saves its inputs and the state entering
    every `chunk_size`-th token; the backward rebuilds one chunk's states at a time from them.
    """
    return _SelectiveScan.apply(x, dt, a, b, c, h0, chunk_size)


class _SelectiveScan(torch.autograd.Function):
    """Token-by-token scan on a [Bt, E, N] state that stays in cache, with recomputation in backward."""

    @staticmethod
    def forward(ctx, x, dt, a, b, c, h0, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        bt, t, e = x.shape
        dtx = dt * x
        h = h0.to(x.dtype).clone()
        decay = torch.empty_like(h)
        y = torch.empty(t, bt, e, 1, dtype=x.dtype, device=x.device)  # time first: y[i] is contiguous
        entries = []
        for i in range(t):
            if i % chunk_size == 0:
                entries.append(h.clone())
            torch.mul(dt[:, i, :, None], a, out=decay).exp_()
            h.mul_(decay).addcmul_(dtx[:, i, :, None], b[:, i, None, :])
            torch.bmm(h, c[:, i, :, None], out=y[i])
        ctx.save_for_backward(x, dt, a, b, c, torch.stack(entries) if entries else h[None].clone())
        ctx.chunk_size, ctx.h0_dtype = chunk_size, h0.dtype
        return y[..., 0].transpose(0, 1), h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh_last):  # noqa: ANN001, ANN205
        x, dt, a, b, c, entries = ctx.saved_tensors
        ln = ctx.chunk_size
        bt, t, e = x.shape
        gy = torch.zeros_like(x) if gy is None else gy.to(x.dtype)
        dtx = dt * x
        g = torch.zeros_like(entries[0]) if gh_last is None else gh_last.to(x.dtype).clone()
        hs = torch.empty(min(ln, t), *g.shape, dtype=g.dtype, device=g.device)  # [L, Bt, E, N]
        decays, gs = torch.empty_like(hs), torch.empty_like(g)
        g_x, g_dt, g_b, g_c = torch.empty_like(x), torch.empty_like(x), torch.empty_like(b), torch.empty_like(c)
        g_a = torch.zeros_like(a)
        for k in range(len(entries) - 1, -1, -1):
            t0, t1 = k * ln, min(t, (k + 1) * ln)
            m = t1 - t0
            h = entries[k]  # rebuild the chunk's states h_t (into hs) and decays exp(dt_t A)
            for j in range(m):
                torch.mul(dt[:, t0 + j, :, None], a, out=decays[j]).exp_()
                h = torch.mul(h, decays[j], out=hs[j]).addcmul_(dtx[:, t0 + j, :, None], b[:, t0 + j, None, :])
            for j in range(m - 1, -1, -1):  # g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}, backwards in time
                i = t0 + j
                gj = torch.addcmul(g, gy[:, i, :, None], c[:, i, None, :], out=gs)  # [Bt, E, N]
                hj, b_i, dtx_i, dt_i = hs[j], b[:, i], dtx[:, i], dt[:, i]
                g_c[:, i] = (gy[:, i, None, :] @ hj)[:, 0]  # sum_e gy[e] h[e, n]
                g_b[:, i] = (dtx_i[:, None, :] @ gj)[:, 0]
                g_dtx = (gj @ b_i[:, :, None])[..., 0]  # [Bt, E]
                # d/d(dt_t A) of h_t = exp(dt_t A) h_{t-1} + dtx_t B_t is g_t * (h_t - dtx_t B_t)
                q = hj.addcmul_(dtx_i[:, :, None], b_i[:, None, :], value=-1.0).mul_(gj)
                g_dt[:, i] = torch.addcmul((q * a).sum(-1), g_dtx, x[:, i])
                g_a += (q.mul_(dt_i[:, :, None])).sum(0)
                g_x[:, i] = g_dtx * dt_i
                torch.mul(gj, decays[j], out=g)
        return g_x, g_dt, g_a, g_b, g_c, g.to(ctx.h0_dtype), None


def _kernel_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                 h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan` through mamba-ssm's CUDA kernel (verified on GPU only when available).

    The kernel starts from a zero state, so the initial state's (linear) contribution is added here.
    """
    y, last = selective_scan_fn(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), a.contiguous(),
                                b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(),
                                return_last_state=True)
    from_start = torch.exp(dt.cumsum(1)[..., None] * a)  # [Bt, T, E, N]
    y = y.transpose(1, 2) + ((from_start * h0[:, None]) @ c[..., None])[..., 0]
    last = last + torch.exp(dt.sum(1)[..., None] * a) * h0
    return y, last


class Mamba(nn.Module):
    """One Mamba-1 mixer. forward(u [B, T, D], state) -> (y [B, T, D], state); step for one token."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int | None,
                 chunk_size: int, use_kernels: bool, dt_scale: float = 1.0) -> None:
        super().__init__()
        if chunk_size < 1:
            raise WamError(f"mamba: chunk_size must be >= 1, got {chunk_size}")
        self.d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.chunk_size, self.use_kernels = chunk_size, use_kernels
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        bound = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner))
        # S4D-real init: A[d, n] = -(n + 1)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        return MixerState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=work_dtype(dtype)))

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., E] (after conv + SiLU) -> dt [..., E], B [..., N], C [..., N] in the work dtype, A [E, N]."""
        wd = work_dtype(x.dtype)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).to(wd) + self.dt_proj.bias.to(wd))
        return dt, b.to(wd), c.to(wd), -torch.exp(self.A_log.to(wd))

    def forward(self, u: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # [B, T, E] each
        x, conv = causal_depthwise_conv(x.transpose(1, 2), state.conv, self.conv1d.weight, self.conv1d.bias)
        x = F.silu(x).transpose(1, 2)  # [B, T, E]
        dt, b, c, a = self._ssm_inputs(x)
        xw = x.to(dt.dtype)
        if self.use_kernels and selective_scan_fn is not None and u.is_cuda:
            log_path_once(log, "mamba: mamba-ssm selective_scan_fn kernel")
            y, ssm = _kernel_scan(xw, dt, a, b, c, state.ssm.to(dt.dtype))
        else:
            log_path_once(log, "mamba: pure-PyTorch chunked selective scan")
            y, ssm = selective_scan(xw, dt, a, b, c, state.ssm, self.chunk_size)
        y = (y + xw * self.D.to(dt.dtype)) * F.silu(z.to(dt.dtype))
        return self.out_proj(y.to(u.dtype)), MixerState(conv, ssm)

    def step(self, u: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # [B, E] each
        x, conv = causal_depthwise_conv(x[..., None], state.conv, self.conv1d.weight, self.conv1d.bias)
        x = F.silu(x[..., 0])
        dt, b, c, a = self._ssm_inputs(x)
        xw = x.to(dt.dtype)
        h = torch.exp(dt[..., None] * a) * state.ssm.to(dt.dtype) + (dt * xw)[..., None] * b[:, None]  # [B, E, N]
        y = (h @ c[..., None])[..., 0] + xw * self.D.to(dt.dtype)
        y = y * F.silu(z.to(dt.dtype))
        return self.out_proj(y.to(u.dtype)), MixerState(conv, h)


@register_core("mamba")
class MambaCore(ResidualMixerCore):
    """Residual stack of Mamba-1 mixers with RMSNorm (mamba-ssm's MixerModel layout, no embedding).

    Args:
        d_model, n_layers: width and depth.
        d_state: SSM state size N per channel.
        d_conv: depthwise causal convolution width.
        expand: inner width E·d = expand * d_model.
        dt_rank: rank of the dt projection (None = ceil(d_model / 16)).
        chunk_size: tokens between the states the forward keeps for backward (memory only: T / chunk_size
            entry states are kept and chunk_size states rebuilt at a time; the result does not depend on it).
        use_kernels: use mamba-ssm's selective_scan_fn on GPU when importable.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, chunk_size: int = 32, use_kernels: bool = True) -> None:
        super().__init__(d_model, n_layers, lambda: Mamba(d_model, d_state, d_conv, expand, dt_rank,
                                                          chunk_size, use_kernels))
