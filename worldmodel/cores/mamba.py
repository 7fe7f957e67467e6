"""`mamba`: the Mamba-1 selective SSM (Gu & Dao 2023) with a chunked scan in pure PyTorch.

Per channel d and state index n (A is diagonal, [E·d, N]):
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] x_t[d]

Chunked scan (training never loops over every token): the sequence is cut into chunks of
`chunk_size` tokens. (1) Local scans run inside all chunks at once, one vectorised step per position
in the chunk (chunk_size steps, each over every chunk). (2) The chunk-end states are carried across
chunks with each chunk's total decay exp(sum dt · A) (T / chunk_size small steps). (3) The state
entering a chunk reaches its tokens through exp(cumsum(dt) · A). Python steps: chunk_size + T/chunk_size
instead of T; every exponent is <= 0, so nothing overflows for any dt or A.

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
    """The chunked selective scan (see the module docstring).

    x, dt: [Bt, T, E]; a: [E, N] (negative); b, c: [Bt, T, N]; h0: [Bt, E, N].
    Returns y [Bt, T, E] (without the D skip) and the final state [Bt, E, N].
    """
    bt, t, e = x.shape
    n = a.shape[1]
    ln = chunk_size
    pad = (-t) % ln
    if pad:  # dt = 0 and x = 0: no decay and no input, so the final state is the state at T
        x, dt, b, c = (F.pad(z, (0, 0, 0, pad)) for z in (x, dt, b, c))
    nc = (t + pad) // ln
    dtc = dt.view(bt, nc, ln, e)  # [Bt, C, L, E]
    dtx = dtc * x.view(bt, nc, ln, e)  # [Bt, C, L, E]
    bc = b.view(bt, nc, ln, 1, n)
    cc = c.view(bt, nc, ln, n, 1)

    # (1) local scans, all chunks at once. The [Bt, C, E, N] decay and input of each position are made
    # inside the loop from [Bt, C, E] slices, so no [Bt, T, E, N] tensor is stacked or unbound (backward).
    h = torch.zeros(bt, nc, e, n, dtype=x.dtype, device=x.device)
    ys = []
    for dt_j, dtx_j, b_j, c_j in zip(dtc.unbind(2), dtx.unbind(2), bc.unbind(2), cc.unbind(2)):
        h = torch.exp(dt_j[..., None] * a) * h + dtx_j[..., None] * b_j  # [Bt, C, E, N]
        ys.append(h @ c_j)  # [Bt, C, E, 1]
    y = torch.cat(ys, -1).transpose(2, 3)  # [Bt, C, L, E]

    # (2) carry the state across chunks
    total = torch.exp(dtc.sum(2)[..., None] * a)  # [Bt, C, E, N]
    entering, s = [], h0.to(x.dtype)
    for tot_c, end_c in zip(total.unbind(1), h.unbind(1)):
        entering.append(s)
        s = tot_c * s + end_c
    ent = torch.stack(entering, 1)  # [Bt, C, E, N]

    # (3) the entering state's contribution to each token of its chunk
    from_start = torch.exp(dtc.cumsum(2)[..., None] * a)  # [Bt, C, L, E, N]
    y = y + ((from_start * ent[:, :, None]) @ cc)[..., 0]
    return y.reshape(bt, nc * ln, e)[:, :t], s


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
        chunk_size: scan chunk length (speed/memory only; the result does not depend on it).
        use_kernels: use mamba-ssm's selective_scan_fn on GPU when importable.
    """

    def __init__(self, d_model: int, n_layers: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, chunk_size: int = 32, use_kernels: bool = True) -> None:
        super().__init__(d_model, n_layers, lambda: Mamba(d_model, d_state, d_conv, expand, dt_rank,
                                                          chunk_size, use_kernels))
