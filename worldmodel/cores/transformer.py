"""`transformer`: pre-norm GPT blocks with causal `scaled_dot_product_attention` and an explicit KV cache.

Positions: rotary embeddings (RoPE) of each token's absolute position, held per row in the state
(`KVCache.pos`). Keys are cached already rotated, and attention scores depend only on position
differences, so the parallel form, the step form and any split of a sequence give the same result,
also when the cache is bounded by a sliding window. `positions="none"` switches RoPE off for callers
that add their own position embeddings (the core is then permutation-equivariant up to the causal
mask).

Context: with `window=W` every token attends to itself and the W-1 tokens before it, in the parallel
form and in the cache alike (the cache keeps the last W-1 tokens, so any length can be streamed).
Without a window every token attends to all earlier tokens of its row; the cache then grows and may
hold at most `max_len` tokens (a `WamError` says so when exceeded: reset the rows or set a window).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wam.datasets.errors import WamError
from wam.worldmodel.cores.base import SequenceCore, register_core
from wam.worldmodel.cores.common import where_rows, work_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCache:
    """The transformer's state. Never mutated: every call returns a new one.

    keys, values: one tensor per layer, [B, H, L, Dh] (keys already rotated by RoPE);
    valid: [B, L] bool, slot l holds a token of the row's current episode (False after a reset);
    pos: [B] long, absolute position of the row's next token (0 after a reset).
    Slots are shared by all rows and advance one per token, so slot distance == token distance.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    pos: torch.Tensor

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KVCache:
        """Apply fn to every tensor (all have batch at dim 0), e.g. `lambda t: t[idx]` or `.detach()`."""
        return KVCache(tuple(fn(k) for k in self.keys), tuple(fn(v) for v in self.values),
                       fn(self.valid), fn(self.pos))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values, self.valid, self.pos))


def rope_tables(pos: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, Dh] for absolute positions pos [B, T]; angles computed in float64."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    ang = pos.to(torch.float64)[..., None] * inv_freq  # [B, T, Dh/2]
    ang = torch.cat([ang, ang], dim=-1)[:, None]  # [B, 1, T, Dh]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, Dh], computed in at least float32, returned in x's dtype."""
    h = x.to(cos.dtype)
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D]; past_k/v [B, H, L, Dh]; mask [B|1, 1, T, L+T] bool or None (= plain causal, L = 0).

        Returns y [B, T, D] and the keys/values over all L+T slots.
        """
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))  # [B, H, T, Dh]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = torch.cat([past_k.to(k.dtype), k], dim=2)  # [B, H, L+T, Dh]
        v = torch.cat([past_v.to(v.dtype), v], dim=2)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_dropout(self.c_proj(y)), k, v


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """nanoGPT's block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)


def init_linear(module: nn.Linear, init: str) -> None:
    """Xavier-uniform ("scaled") or N(0, 0.02) ("gpt2") weights, zero bias."""
    if init == "gpt2":
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    else:
        nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@register_core("transformer")
class TransformerCore(SequenceCore):
    """Pre-norm GPT stack (LayerNorm, causal SDPA attention, GELU MLP) with a KV-cache state.

    Args:
        d_model, n_layers: width and depth.
        n_heads: attention heads (d_model must divide by it; head dim must be even for RoPE).
        dropout: attention and residual dropout in training mode (0 keeps forward deterministic).
        max_len: most tokens the cache may hold when `window` is None.
        window: sliding-window size W (a token sees itself and the W-1 before it); None = full causal.
        positions: "rope" (rotary, absolute positions carried in the state) or "none".
        rope_base: RoPE frequency base.
        init: "scaled" (default): Xavier-uniform linear weights (std sqrt(2 / (fan_in + fan_out)), which
            follows the width: 0.088 for the attention input at d = 64, 0.026 at d = 768), the residual
            projections further divided by sqrt(2 n_layers); "gpt2": GPT-2's N(0, 0.02) whatever the width
            (residual projections 0.02 / sqrt(2 n_layers)), sized for d ~ 768: at d = 64-128 it leaves
            attention near-uniform for thousands of steps. Biases are zero either way.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int = 4, dropout: float = 0.0,
                 max_len: int = 4096, window: int | None = None,
                 positions: Literal["rope", "none"] = "rope", rope_base: float = 10000.0,
                 init: Literal["scaled", "gpt2"] = "scaled") -> None:
        super().__init__()
        if d_model % n_heads or (positions == "rope" and (d_model // n_heads) % 2):
            raise WamError(f"transformer: d_model={d_model} must split into n_heads={n_heads} heads of even size")
        if window is not None and window < 1:
            raise WamError(f"transformer: window must be >= 1 or None, got {window}")
        if positions not in ("rope", "none"):
            raise WamError(f"transformer: positions must be 'rope' or 'none', got {positions!r}")
        if init not in ("scaled", "gpt2"):
            raise WamError(f"transformer: init must be 'scaled' or 'gpt2', got {init!r}")
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.max_len, self.window, self.positions, self.rope_base = max_len, window, positions, rope_base
        self.h = nn.ModuleList(TransformerBlock(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.init = init
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m, init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                with torch.no_grad():
                    p.div_((2 * n_layers) ** 0.5)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache (L = 0) at position 0."""
        device = device if device is not None else self.ln_f.weight.device
        dtype = dtype or self.ln_f.weight.dtype
        hd = self.d_model // self.n_heads
        empty = torch.zeros(batch_size, self.n_heads, 0, hd, device=device, dtype=dtype)
        return KVCache(keys=(empty,) * self.n_layers, values=(empty,) * self.n_layers,
                       valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                       pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    def _mask(self, state: KVCache, t: int, device: torch.device) -> torch.Tensor | None:
        """[B|1, 1, T, L+T] bool (True = may attend), or None when plain causal attention is exact."""
        n = state.length
        if n == 0 and (self.window is None or self.window >= t):
            return None
        qi = torch.arange(t, device=device)[:, None] + n  # slot of each query
        kj = torch.arange(n + t, device=device)[None, :]
        allowed = kj <= qi
        if self.window is not None:
            allowed = allowed & (kj > qi - self.window)
        if n == 0 or bool(state.valid.all()):
            return allowed[None, None]  # [1, 1, T, L+T]
        valid = torch.cat([state.valid, torch.ones(state.valid.shape[0], t, dtype=torch.bool, device=device)], 1)
        return allowed[None, None] & valid[:, None, None, :]  # [B, 1, T, L+T]

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """x [B, T, D] -> y [B, T, D] and the cache after the last token."""
        assert x.dim() == 3 and x.shape[-1] == self.d_model, (
            f"expected x of shape [B, T, {self.d_model}], got {tuple(x.shape)}")
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.device, x.dtype)
        assert isinstance(state, KVCache) and len(state.keys) == self.n_layers, (
            f"state must be a KVCache with {self.n_layers} layers, got {type(state).__name__}")
        n = state.length
        if self.window is None and n + t > self.max_len:
            raise WamError(f"transformer: {n} cached + {t} new tokens exceed max_len={self.max_len}; "
                           "reset the state, raise max_len or set a sliding window")
        rope = None
        if self.positions == "rope":
            pos = state.pos[:, None] + torch.arange(t, device=x.device)  # [B, T]
            rope = rope_tables(pos, self.d_model // self.n_heads, self.rope_base, work_dtype(x.dtype))
        mask = self._mask(state, t, x.device)
        keep = n + t if self.window is None else min(n + t, self.window - 1)  # slots the new cache keeps
        h, keys, values = x, [], []
        for block, pk, pv in zip(self.h, state.keys, state.values):
            a, k, v = block.attn(block.ln_1(h), pk, pv, rope, mask)
            h = h + a
            h = h + block.mlp(block.ln_2(h))
            keys.append(k if keep == n + t else k[:, :, n + t - keep:].contiguous())
            values.append(v if keep == n + t else v[:, :, n + t - keep:].contiguous())
        valid = torch.cat([state.valid, torch.ones(b, t, dtype=torch.bool, device=x.device)], 1)[:, n + t - keep:]
        new = KVCache(tuple(keys), tuple(values), valid, state.pos + t)
        return self.ln_f(h), new

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """x_t [B, D] -> y_t [B, D]: the same computation as `forward` on a sequence of one token."""
        assert x_t.dim() == 2, f"step takes x_t of shape [B, D], got {tuple(x_t.shape)}"
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state

    def reset_state(self, state: KVCache, rows: torch.Tensor) -> KVCache:
        """Rows where `rows` [B] is True forget their cached tokens and restart at position 0.

        Slots that no row uses any more (a reset invalidates a prefix of each row) are dropped.
        """
        valid = where_rows(rows, torch.zeros_like(state.valid), state.valid)
        pos = where_rows(rows, torch.zeros_like(state.pos), state.pos)
        used = valid.any(0).nonzero()
        first = int(used[0]) if len(used) else valid.shape[1]  # leading slots unused by every row
        if first == 0:
            return KVCache(state.keys, state.values, valid, pos)
        return KVCache(tuple(k[:, :, first:].contiguous() for k in state.keys),
                       tuple(v[:, :, first:].contiguous() for v in state.values), valid[:, first:].contiguous(), pos)
