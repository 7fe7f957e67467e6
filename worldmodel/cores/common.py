"""Pieces shared by the cores: RMSNorm (plain and gated), a depthwise causal convolution that carries
its state, row-wise state reset, dt initialisation, and the residual stack of the Mamba cores.

Everything here is pure PyTorch and never mutates a tensor it was given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wam.worldmodel.cores.base import SequenceCore


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype numerically delicate parts (norms, scans, RoPE) run in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale; `forward(x, z)` is mamba-ssm's gated form `rmsnorm(x * silu(z))`.

    `group_size` normalises each group of that many channels on its own (Mamba-2's `ngroups`).
    Computed in float32 (float64 stays float64) and cast back to the input dtype.
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or d
        assert d % self.group_size == 0, f"RMSNorm: {d} channels do not split into groups of {self.group_size}"
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(work_dtype(dtype))
        if z is not None:
            h = h * F.silu(z.to(h.dtype))
        shape = h.shape
        h = h.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.reshape(shape) * self.weight.to(h.dtype)).to(dtype)


def causal_depthwise_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution continuing from `conv_state`.

    x: [B, C, T]; conv_state: [B, C, K-1], the K-1 inputs that came before x (zeros at the start);
    weight: [C, 1, K] (an `nn.Conv1d(groups=C)` weight). Returns y [B, C, T] and the new state
    [B, C, K-1] (the last K-1 inputs). Works for any T >= 1, so it is also the step form.
    """
    k = weight.shape[-1]
    xs = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(xs, weight, bias, groups=weight.shape[0])  # [B, C, T]
    new_state = xs[..., xs.shape[-1] - (k - 1):].contiguous()  # [B, C, K-1]; a copy, not a view of xs
    return y, new_state


_LOGGED_PATHS: set[str] = set()


def log_path_once(logger: logging.Logger, path: str) -> None:
    """Log (INFO, once per process) which implementation path a core runs, e.g. a fused kernel or pure PyTorch."""
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info("sequence core path: %s", path)


def where_rows(rows: torch.Tensor, fresh: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Rows of `fresh` where `rows` [B] is True, of `old` elsewhere (a new tensor; batch is dim 0)."""
    assert rows.dtype == torch.bool and rows.shape == old.shape[:1], (
        f"rows must be a bool tensor of shape [{old.shape[0]}], got {rows.dtype} {tuple(rows.shape)}")
    mask = rows.to(old.device).view(-1, *([1] * (old.dim() - 1)))
    return torch.where(mask, fresh.to(old.dtype), old)


def inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1,
                        dt_floor: float = 1e-4) -> torch.Tensor:
    """Bias that makes softplus(bias) log-uniform in [dt_min, dt_max] (mamba-ssm's dt init). [n]"""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


# ---------------------------------------------------------------------------------------------
# The residual stack shared by the Mamba-1 and Mamba-2 cores (mamba-ssm's Block / MixerModel layout:
# `layers.{i}.norm`, `layers.{i}.mixer.*`, `norm_f`, so a reference backbone's state_dict maps).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixerState:
    """State of one Mamba(-2) mixer: conv [B, C, K-1] (last conv inputs), ssm (the SSM hidden state)."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass(frozen=True)
class SSMState:
    """State of a Mamba-family core: one `MixerState` per layer. Its size does not grow with time."""

    layers: tuple[MixerState, ...]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SSMState:
        """Apply fn to every tensor (all have batch at dim 0), e.g. `lambda t: t[idx]` or `.detach()`."""
        return SSMState(tuple(MixerState(fn(s.conv), fn(s.ssm)) for s in self.layers))

    def nbytes(self) -> int:
        return sum(s.conv.nbytes + s.ssm.nbytes for s in self.layers)


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, d_model: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.mixer = mixer


class ResidualMixerCore(SequenceCore):
    """A stack of `Block`s around a mixer with `init_state`, `forward(x, s)` and `step(x_t, s)`, then `norm_f`.

    Subclasses build the mixers (each with an `out_proj` Linear); this class threads the per-layer states.
    """

    def __init__(self, d_model: int, n_layers: int, make_mixer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_layers = n_layers
        self.layers = nn.ModuleList(Block(d_model, make_mixer()) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        for layer in self.layers:  # mamba-ssm's rescale of the residual output projections by 1/sqrt(n_layers)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(n_layers)

    def _param_dtype(self) -> torch.dtype:
        return self.norm_f.weight.dtype

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> SSMState:
        device = device if device is not None else self.norm_f.weight.device
        dtype = dtype or self._param_dtype()
        return SSMState(tuple(layer.mixer.init_state(batch_size, device, dtype) for layer in self.layers))

    def _check(self, x: torch.Tensor, state: Any, step: bool) -> SSMState:
        want = 2 if step else 3
        assert x.dim() == want and x.shape[-1] == self.d_model, (
            f"expected x of shape [B, {'' if step else 'T, '}{self.d_model}], got {tuple(x.shape)}")
        if state is None:
            return self.init_state(x.shape[0], x.device, x.dtype)
        assert isinstance(state, SSMState) and len(state.layers) == self.n_layers, (
            f"state must be an SSMState with {self.n_layers} layers, got {type(state).__name__}")
        return state

    def forward(self, x: torch.Tensor, state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """x [B, T, D] -> y [B, T, D] and the state after the last token."""
        state = self._check(x, state, step=False)
        h, new = x, []
        for layer, s in zip(self.layers, state.layers):
            y, s = layer.mixer(layer.norm(h), s)
            h = h + y
            new.append(s)
        return self.norm_f(h), SSMState(tuple(new))

    def step(self, x_t: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """x_t [B, D] -> y_t [B, D]; O(1) work and memory in the number of tokens seen."""
        state = self._check(x_t, state, step=True)
        h, new = x_t, []
        for layer, s in zip(self.layers, state.layers):
            y, s = layer.mixer.step(layer.norm(h), s)
            h = h + y
            new.append(s)
        return self.norm_f(h), SSMState(tuple(new))

    def reset_state(self, state: SSMState, rows: torch.Tensor) -> SSMState:
        """Rows where `rows` [B] is True start afresh (zero conv and SSM state); other rows are kept."""
        return state.map_tensors(lambda t: where_rows(rows, torch.zeros_like(t), t))
