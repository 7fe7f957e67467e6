"""`atlas`: the ATLAS layer (Behrouz et al., 2025) — a deep memory optimised during the forward pass
with the Omega rule, polynomial features, momentum and Newton–Schulz-5 (Muon) updates.

Per layer and head (head dim d, memory input/output dim d):

    q, k, v = SiLU(causal depthwise conv(W_qkv x))            # short conv as in Titans
    q, k    = l2-normalise(q), l2-normalise(k);  φ(u) = a_0/√d + Σ_{i=1..p} a_i u^i   (elementwise, a_i = 1/i! at init)
    M(u)    = W u                      (memory_depth=1)   |   u + W2 SiLU(W1 u)   (memory_depth=2)
    ℓ_t(M)  = Σ_{i=t-c+1..t} γ_i · ½‖M(φ(k_i)) − v_i‖²                     (Omega rule, window c)
    g_t     = ∇ℓ_t(M̄)            M̄ = the memory at the start of t's chunk (chunk-parallel training)
    newton_schulz="token" (default, the paper's Eqs. 32-33):
    S_t     = θ_t S_{t-1} + g_t                                            (momentum; θ = 0 without)
    M_t     = α_t M_{t-1} − η_t NS5(S_t)                                    every token
    newton_schulz="chunk" (NS5 once per chunk) / False (OmegaNet):
    S_t     = θ_t S_{t-1} − η_t g_t
    ΔM_t    = α_t ΔM_{t-1} + S_t,  A_t = α_t A_{t-1}   (ΔM = 0, A = 1 at a chunk start)
    M_t     = A_t M̄ + ΔM_t                           inside a chunk
    M_e     = A_e M̄ + NS5(ΔM_e)                       at the chunk's last token e ("chunk" only)
    y_t     = M_t(φ(q_t))  ->  per-head RMSNorm  ->  out projection

Without Newton–Schulz this is exactly M_t = α_t M_{t-1} + S_t (OmegaNet). The per-token form
materialises one chunk's momenta [B, H, L, |M|] at a time, orthogonalises them in one batched NS5 call
and is recomputed in the backward pass (torch.utils.checkpoint), so training stores no per-token
memory; it costs chunk_size x more NS5 than the "chunk" form (docs/atlas.md). Gates (per head, from the
block input): α = sigmoid, η = η_max·sigmoid (η_max = 0.1 with per-token NS5, else 1/(c·chunk_size)),
θ = sigmoid, γ = sigmoid (γ ≡ 1 when c = 1, where it would only rescale η). φ's constant term is a_0/√d
so that it counts once in φ(u)·φ(w).

Chunk-parallel form: inside a chunk every gradient is taken at M̄, so each window token i
contributes one rank-1 term γ_i δ_i x_iᵀ per weight matrix; the momentum and memory recurrences are
linear, so M_t = (scalars)·{M̄, ΔM_in, S_in} − Σ_i D_ti (δ_i x_iᵀ) with a [L, L+c-1] coefficient
matrix D, and reading M_t(φ(q_t)) is attention-like matmuls — nothing of size [T, |M|] is built.
Chunk boundaries are counted per row from its fresh state (`AtlasState.phase`), so splitting a
sequence anywhere and the step form (a segment of one token) give exactly the one-pass result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from wam.datasets.errors import WamError
from wam.worldmodel.cores.atlas_ops import (
    AtlasLayerState,
    AtlasState,
    chunk_segments,
    close_chunks,
    decay_matrix,
    newton_schulz5,
    poly_feature_map,
    silu_grad,
)
from wam.worldmodel.cores.base import SequenceCore, register_core
from wam.worldmodel.cores.common import RMSNorm, causal_depthwise_conv, where_rows, work_dtype
from wam.worldmodel.cores.transformer import MLP

log = logging.getLogger(__name__)

NS_FORMS: dict[bool | str, str | None] = {True: "token", "token": "token", "chunk": "chunk", False: None,
                                          "off": None}
"""`newton_schulz` values: "token" (True) Eqs. 32-33, NS5 of every token's momentum; "chunk" NS5 of each
chunk's accumulated update; "off" (False) OmegaNet."""
TOKEN_NS_ETA_MAX = 0.1
"""Default ceiling of η with per-token NS5 (docs/atlas.md)."""


class AtlasMixer(nn.Module):
    """The ATLAS token mixer (see the module docstring). Input/output [B, T, D]."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, window: int, poly_degree: int,
                 memory_depth: int, memory_expansion: int, momentum: bool, newton_schulz: str | None,
                 conv_kernel: int, eta_max: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, head_dim, window
        self.memory_depth, self.momentum = memory_depth, momentum
        self.newton_schulz = newton_schulz  # "token" (Eqs. 32-33), "chunk" (once per chunk) or None (OmegaNet)
        self.eta_max = eta_max
        h, d = n_heads, head_dim
        inner = 3 * h * d
        self.qkv = nn.Linear(d_model, inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, conv_kernel, groups=inner, bias=True)  # used via its weight
        self.poly_coeffs = nn.Parameter(torch.tensor([1.0 / math.factorial(i) for i in range(poly_degree + 1)]))
        # gates, per head: α (memory decay), η (step), θ (momentum, if on), γ (Omega window, if c > 1)
        self.gate_names = ["alpha", "eta"] + (["theta"] if momentum else []) + (["gamma"] if window > 1 else [])
        self.gates = nn.Linear(d_model, len(self.gate_names) * h)
        init_bias = {"alpha": 4.0, "eta": 0.0, "theta": 0.0, "gamma": 2.0}  # α≈0.98, η≈η_max/2, θ=0.5, γ≈0.88
        with torch.no_grad():
            self.gates.weight.mul_(0.1)
            self.gates.bias.copy_(torch.tensor([init_bias[n] for n in self.gate_names]).repeat_interleave(h))
        # the memory's initial weights M_0, learned (meta-learned across sequences), one per head
        if memory_depth == 1:
            shapes = [(h, d, d)]
        else:
            shapes = [(h, memory_expansion * d, d), (h, d, memory_expansion * d)]
        self.mem_init = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)
        if memory_depth == 2:  # W1 random, W2 = 0: M_0(u) = u
            nn.init.normal_(self.mem_init[0], std=d ** -0.5)
        self.out_norm = RMSNorm(d)
        self.out_proj = nn.Linear(h * d, d_model, bias=False)

    # ---- state ------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> AtlasLayerState:
        b, h, d, c = batch_size, self.n_heads, self.head_dim, self.window
        mem = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(b, *w.shape) for w in self.mem_init)
        zeros = tuple(torch.zeros(b, *w.shape, device=device, dtype=dtype) for w in self.mem_init)
        return AtlasLayerState(
            conv=torch.zeros(b, 3 * h * d, self.conv1d.kernel_size[0] - 1, device=device, dtype=dtype),
            mem_start=mem, mem_delta=zeros, momentum=zeros,
            decay=torch.ones(b, h, device=device, dtype=dtype),
            win_k=torch.zeros(b, h, c - 1, d, device=device, dtype=dtype),
            win_v=torch.zeros(b, h, c - 1, d, device=device, dtype=dtype),
            win_gamma=torch.zeros(b, h, c - 1, device=device, dtype=dtype))

    # ---- inputs -----------------------------------------------------------------------------

    def project(self, x: torch.Tensor, conv_state: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x [B, T, D] -> per-head inputs {q: φ(q), k: φ(k), v: [B, H, T, d]; log_alpha, eta, log_theta,
        gamma: [B, H, T]} and the new conv state."""
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        u, conv_state = causal_depthwise_conv(self.qkv(x).transpose(1, 2), conv_state, self.conv1d.weight,
                                              self.conv1d.bias)  # [B, 3Hd, T]
        wd = work_dtype(x.dtype)  # features and gates in >= float32 (also under autocast)
        u = F.silu(u).to(wd).view(b, 3, h, d, t).permute(1, 0, 2, 4, 3)  # [3, B, H, T, d]
        q, k = F.normalize(u[0], dim=-1), F.normalize(u[1], dim=-1)
        out = {"q": poly_feature_map(q, self.poly_coeffs), "k": poly_feature_map(k, self.poly_coeffs), "v": u[2]}
        g = self.gates(x).to(wd).view(b, t, len(self.gate_names), h).permute(2, 0, 3, 1)  # [G, B, H, T]
        raw = dict(zip(self.gate_names, g))
        out["log_alpha"] = F.logsigmoid(raw["alpha"])
        out["eta"] = torch.sigmoid(raw["eta"]) * self.eta_max
        if self.momentum:
            out["log_theta"] = F.logsigmoid(raw["theta"])
        out["gamma"] = torch.sigmoid(raw["gamma"]) if self.window > 1 else torch.ones_like(raw["eta"])
        return out, conv_state

    # ---- memory -----------------------------------------------------------------------------

    def _apply_memory(self, weights: Sequence[torch.Tensor], u: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """M(u) for inputs u [B, H, L, d] and materialised weights: one set for every token ([B, H, out, in]
        each) or, with `per_token`, token τ's own ([B, H, L, out, in] each)."""
        if per_token:
            def mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                return (w @ x[..., None]).squeeze(-1)
        else:
            def mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                return x @ w.mT

        if self.memory_depth == 1:
            return mv(weights[0], u)
        return u + mv(weights[1], F.silu(mv(weights[0], u)))

    @staticmethod
    def _orthogonalise(update: torch.Tensor) -> torch.Tensor:
        """NS5 of a chunk's update; when autograd records, its 5 iterations are recomputed in the backward
        pass instead of being stored (they were about half of the training memory)."""
        if torch.is_grad_enabled() and update.requires_grad:
            return torch.utils.checkpoint.checkpoint(newton_schulz5, update, use_reentrant=False)
        return newton_schulz5(update)

    def _grad_factors(self, mem: tuple[torch.Tensor, ...], xw: torch.Tensor, vw: torch.Tensor,
                      gw: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per window token i, ∇_W γ_i ½‖M(x_i) − v_i‖² at `mem` as rank-1 factors (left_i, right_i):
        the gradient of weight matrix w is left_i right_iᵀ. xw, vw [B, H, n, d]; gw [B, H, n]."""
        if self.memory_depth == 1:
            err = gw[..., None] * (xw @ mem[0].mT - vw)  # [B, H, n, d]
            return [(err, xw)]
        z = xw @ mem[0].mT  # [B, H, n, E·d]
        hid = F.silu(z)
        err = gw[..., None] * (xw + hid @ mem[1].mT - vw)  # [B, H, n, d]
        back = (err @ mem[1]) * silu_grad(z)  # [B, H, n, E·d]
        return [(back, xw), (err, hid)]

    def forward(self, x: torch.Tensor, state: AtlasLayerState,
                segments: list[tuple[int, int, torch.Tensor | None, bool]]
                ) -> tuple[torch.Tensor, AtlasLayerState]:
        """x [B, T, D] -> y [B, T, D]; `segments` as built by `AtlasCore.segments`."""
        b, t, _ = x.shape
        inp, conv = self.project(x, state.conv)
        st = state
        ys = []
        wd = work_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the memory recurrence runs in >= float32
            recompute = self.newton_schulz == "token" and torch.is_grad_enabled()
            for start, end, closes, chunk_start in segments:
                piece = {key: val[:, :, start:end].to(wd) for key, val in inp.items()}
                if recompute:  # the per-token memories are recomputed in backward, not stored (docs/atlas.md)
                    y, st = torch.utils.checkpoint.checkpoint(self._segment, piece, st, closes, chunk_start,
                                                              use_reentrant=False)
                else:
                    y, st = self._segment(piece, st, closes, chunk_start)
                ys.append(y)
        y = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]  # [B, H, T, d]
        y = self.out_norm(y).transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        st = AtlasLayerState(conv, st.mem_start, st.mem_delta, st.momentum, st.decay, st.win_k, st.win_v,
                             st.win_gamma)
        return self.out_proj(y), st

    def _segment(self, inp: dict[str, torch.Tensor], st: AtlasLayerState, closes: torch.Tensor | None,
                 chunk_start: bool) -> tuple[torch.Tensor, AtlasLayerState]:
        """Tokens of one chunk (or part of one) for every row: outputs [B, H, L, d] and the state after.
        chunk_start: every row starts a chunk here (ΔM_in = 0, skipped)."""
        qf, kf, v, eta, gamma = inp["q"], inp["k"], inp["v"], inp["eta"], inp["gamma"]
        state_dtype = st.decay.dtype
        wd = eta.dtype  # scalar coefficients in at least float32
        n_len = kf.shape[2]
        c = self.window
        xw = torch.cat([st.win_k.to(kf.dtype), kf], dim=2)  # [B, H, n, d], n = c-1+L
        vw = torch.cat([st.win_v.to(v.dtype), v], dim=2)
        gw = torch.cat([st.win_gamma.to(gamma.dtype), gamma], dim=2)  # [B, H, n]
        n = xw.shape[2]
        # band [L, n]: token τ (at window index τ+c-1) sees window tokens τ .. τ+c-1
        idx_t = torch.arange(n_len, device=xw.device)[:, None]
        idx_i = torch.arange(n, device=xw.device)[None, :]
        band = ((idx_i >= idx_t) & (idx_i <= idx_t + c - 1)).to(wd)
        # momentum: S_τ = Θ_τ S_in − Σ_i Q[τ, i] G_i
        if self.momentum:
            p_mat, theta_cum = decay_matrix(inp["log_theta"])  # [B, H, L, L], [B, H, L]
        else:
            p_mat = torch.eye(n_len, device=xw.device, dtype=wd).expand(*eta.shape, n_len)
            theta_cum = torch.zeros_like(eta)
        q_mat = (p_mat * eta[..., None, :]) @ band  # [B, H, L, n]
        # memory: ΔM_τ = Aseg_τ ΔM_in + b_τ S_in − Σ_i D[τ, i] G_i;  M_τ = A_in Aseg_τ M̄ + ΔM_τ
        r_mat, a_seg = decay_matrix(inp["log_alpha"])
        b_vec = (r_mat @ theta_cum[..., None]).squeeze(-1)  # [B, H, L]
        d_mat = r_mat @ q_mat  # [B, H, L, n]
        a_start = st.decay.to(wd)[..., None] * a_seg  # [B, H, L]
        factors = self._grad_factors(st.mem_start, xw, vw, gw)
        keep = c - 1
        win_k, win_v, win_g = (z[:, :, n - keep:].to(state_dtype) for z in (xw, vw, gw))
        if self.newton_schulz == "token":
            return self._segment_token_ns(qf, eta, p_mat @ band, theta_cum, r_mat, a_seg, a_start, factors, st,
                                          closes, chunk_start, (win_k, win_v, win_g))

        # the materialised pieces of M_τ: a_τ M̄ (+ Aseg_τ ΔM_in unless every row starts a chunk here)
        # (+ b_τ S_in with momentum), applied as one matmul over the stacked pieces
        pieces = [(a_start, st.mem_start)]
        if not chunk_start:
            pieces.append((a_seg, st.mem_delta))
        if self.momentum:
            pieces.append((b_vec, st.momentum))
        coef = torch.stack([p[0] for p in pieces], dim=-1)  # [B, H, L, P]
        stacked = [torch.cat([p[1][w] for p in pieces], dim=-1) if len(pieces) > 1 else pieces[0][1][w]
                   for w in range(len(factors))]  # [B, H, out, P·in]

        def read(w: int, u: torch.Tensor) -> torch.Tensor:
            """M_τ's weight w applied to u [B, H, L, in] -> [B, H, L, out]."""
            left, right = factors[w]
            u_cat = (coef[..., :, None] * u[..., None, :]).flatten(-2)  # [B, H, L, P·in]
            return u_cat @ stacked[w].mT - ((u @ right.mT) * d_mat) @ left

        if self.memory_depth == 1:
            y = read(0, qf)
        else:
            y = qf + read(1, F.silu(read(0, qf)))
        momentum, delta, decay = self._state_after(factors, st, q_mat[..., -1, :], d_mat[..., -1, :],
                                                   theta_cum[..., -1], a_seg[..., -1], b_vec[..., -1])
        mem_start = st.mem_start
        if closes is not None:  # rows whose chunk ends here: fold ΔM into M̄ (through NS5 if on)
            ns = self.newton_schulz == "chunk"
            full = tuple(decay[..., None, None] * m + (self._orthogonalise(dm) if ns else dm)
                         for m, dm in zip(mem_start, delta))
            if ns:  # the chunk's last token reads the orthogonalised memory
                y_last = self._apply_memory(full, qf[:, :, -1:].to(full[0].dtype)).to(y.dtype)
                if not bool(closes.all()):
                    y_last = torch.where(closes.view(-1, 1, 1, 1), y_last, y[:, :, -1:])
                y = torch.cat([y[:, :, :-1], y_last], dim=2)
            mem_start, delta, decay = close_chunks(closes, full, mem_start, delta, decay)
        new = AtlasLayerState(st.conv, mem_start, tuple(delta), tuple(momentum), decay, win_k, win_v, win_g)
        return y, new

    @staticmethod
    def _state_after(factors: list[tuple[torch.Tensor, torch.Tensor]], st: AtlasLayerState, q_last: torch.Tensor,
                     d_last: torch.Tensor, th: torch.Tensor, al: torch.Tensor, bl: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Momentum, ΔM and decay after a segment's last token (chunk form): q_last, d_last [B, H, n] are the
        last rows of Q and D; th, al, bl [B, H] its cumulative θ, α and momentum-to-memory coefficient."""
        state_dtype = st.decay.dtype
        momentum, delta = [], []
        for w, (left, right) in enumerate(factors):
            s_in, dm_in = st.momentum[w], st.mem_delta[w]
            lq = (left * q_last[..., None].to(left.dtype)).mT @ right  # [B, H, out, in]
            ld = (left * d_last[..., None].to(left.dtype)).mT @ right
            momentum.append((th[..., None, None] * s_in - lq).to(state_dtype))
            delta.append((al[..., None, None] * dm_in + bl[..., None, None] * s_in - ld).to(state_dtype))
        return momentum, delta, (st.decay * al).to(state_dtype)

    def _segment_token_ns(self, qf: torch.Tensor, eta: torch.Tensor, s_coef: torch.Tensor, theta_cum: torch.Tensor,
                          r_mat: torch.Tensor, a_seg: torch.Tensor, a_start: torch.Tensor,
                          factors: list[tuple[torch.Tensor, torch.Tensor]], st: AtlasLayerState,
                          closes: torch.Tensor | None, chunk_start: bool,
                          window: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                          ) -> tuple[torch.Tensor, AtlasLayerState]:
        """The paper's Eqs. 32-33 over one segment: every token's momentum S_τ = θ_τ S_{τ-1} + ∇ℓ_τ(M̄) is
        materialised ([B, H, L, out, in] per weight matrix), orthogonalised in one batched NS5 call, and
        M_τ = α_τ M_{τ-1} − η_τ NS5(S_τ) is read token by token. s_coef [B, H, L, n]: S_τ's weight of window
        gradient i (decayed momentum times the Omega band, without η)."""
        state_dtype = st.decay.dtype
        momentum, delta, mems = [], [], []
        for w, (left, right) in enumerate(factors):
            # S_τ = Θ_τ S_in + Σ_i s_coef[τ, i] left_i right_iᵀ
            s_all = (s_coef[..., None].to(left.dtype) * left[:, :, None]).mT @ right[:, :, None]  # [B,H,L,o,i]
            if self.momentum:
                s_all = s_all + theta_cum[..., None, None] * st.momentum[w][:, :, None].to(s_all.dtype)
            upd = -eta[..., None, None] * newton_schulz5(s_all)  # U_τ = −η_τ NS5(S_τ)
            # ΔM_τ = Aseg_τ ΔM_in + Σ_{j<=τ} R[τ, j] U_j;  M_τ = A_in Aseg_τ M̄ + ΔM_τ
            dm = (r_mat @ upd.flatten(-2)).view_as(upd)
            if not chunk_start:
                dm = dm + a_seg[..., None, None] * st.mem_delta[w][:, :, None].to(dm.dtype)
            mems.append(a_start[..., None, None] * st.mem_start[w][:, :, None].to(dm.dtype) + dm)
            momentum.append(s_all[:, :, -1].to(state_dtype))
            delta.append(dm[:, :, -1].to(state_dtype))
        y = self._apply_memory(mems, qf, per_token=True)
        decay = (st.decay * a_seg[..., -1]).to(state_dtype)
        mem_start = st.mem_start
        if closes is not None:  # rows whose chunk ends here: M̄ <- M_e (already orthogonalised per token)
            full = tuple(decay[..., None, None] * m + dm for m, dm in zip(mem_start, delta))
            mem_start, delta, decay = close_chunks(closes, full, mem_start, delta, decay)
        return y, AtlasLayerState(st.conv, mem_start, tuple(delta), tuple(momentum), decay, *window)



class AtlasBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm1(h)); h + mlp(norm2(h))."""

    def __init__(self, d_model: int, mixer: AtlasMixer, dropout: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model, dropout)


@register_core("atlas")
class AtlasCore(SequenceCore):
    """A stack of ATLAS blocks (RMSNorm, ATLAS mixer, RMSNorm, GELU MLP) and a final RMSNorm.

    Options (docs/atlas.md): n_heads (default: heads of 32 channels) / head_dim; window c (Omega rule,
    1 = delta rule); poly_degree p; memory_depth 1 (linear) or 2 (residual MLP, hidden memory_expansion·d);
    momentum; newton_schulz ("token", the paper's, default; "chunk"; False gives OmegaNet); chunk_size
    (part of the model's definition: gradients are taken at the chunk-start memory); conv_kernel; dropout
    (of the MLP).
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int | None = None, head_dim: int | None = None,
                 window: int = 4, poly_degree: int = 2, memory_depth: int = 2, memory_expansion: int = 2,
                 momentum: bool = True, newton_schulz: bool | str = "token", chunk_size: int = 64,
                 conv_kernel: int = 4, eta_max: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if n_heads is None:  # heads of 32 channels (cost grows with head_dim², see docs/atlas.md)
            n_heads = d_model // 32 if d_model >= 32 and d_model % 32 == 0 else 1
        if n_heads < 1 or (head_dim is None and d_model % n_heads):
            raise WamError(f"atlas: d_model={d_model} does not split into n_heads={n_heads} heads; "
                           "choose n_heads dividing d_model or set head_dim")
        checks = {"window": (window, 1), "poly_degree": (poly_degree, 1), "chunk_size": (chunk_size, 1),
                  "conv_kernel": (conv_kernel, 1), "memory_expansion": (memory_expansion, 1)}
        for name, (value, lowest) in checks.items():
            if int(value) != value or value < lowest:
                raise WamError(f"atlas: {name}={value} must be an integer >= {lowest}")
        if memory_depth not in (1, 2):
            raise WamError(f"atlas: memory_depth={memory_depth} must be 1 (linear) or 2 (residual MLP)")
        ns_form = NS_FORMS.get(newton_schulz if isinstance(newton_schulz, (bool, str)) else "?", "?")
        if ns_form == "?":
            raise WamError(f"atlas: newton_schulz={newton_schulz!r} must be 'token' (the paper's, default), "
                           "'chunk' (once per chunk) or False (OmegaNet)")
        self.d_model, self.n_layers, self.chunk_size = d_model, n_layers, chunk_size
        head_dim = head_dim or d_model // n_heads
        # η's ceiling: a chunk sums up to c·chunk_size gradients taken at one memory, without feedback
        # (per-token NS5 gives every update unit singular values whatever the gradients' size, so its
        # ceiling bounds the memory's norm instead: ‖M‖ <= η_max / (1 − α))
        if eta_max is None:
            eta_max = TOKEN_NS_ETA_MAX if ns_form == "token" else 1.0 / (window * chunk_size)
        self.layers = nn.ModuleList(
            AtlasBlock(d_model, AtlasMixer(d_model, n_heads, head_dim, window, poly_degree, memory_depth,
                                           memory_expansion, momentum, ns_form, conv_kernel, eta_max),
                       dropout)
            for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        log.info("atlas core: %d layers, %d heads x %d, window c=%d, p=%d, memory depth %d, momentum %s, "
                 "Newton-Schulz %s (chunks of %d)", n_layers, n_heads, head_dim, window, poly_degree,
                 memory_depth, momentum, ns_form or "off", chunk_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> AtlasState:
        device = device if device is not None else self.norm_f.weight.device
        dtype = dtype or self.norm_f.weight.dtype
        return AtlasState(tuple(blk.mixer.init_state(batch_size, device, dtype) for blk in self.layers),
                          torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, x: torch.Tensor, state: AtlasState | None = None) -> tuple[torch.Tensor, AtlasState]:
        """x [B, T, D] -> y [B, T, D] and the state after the last token."""
        assert x.dim() == 3 and x.shape[-1] == self.d_model, (
            f"expected x of shape [B, T, {self.d_model}], got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        assert isinstance(state, AtlasState) and len(state.layers) == self.n_layers, (
            f"state must be an AtlasState with {self.n_layers} layers, got {type(state).__name__}")
        t = x.shape[1]
        if t == 0:
            return x, state
        segments = self.segments(state.phase, t, x.device)
        h, new = x, []
        for blk, s in zip(self.layers, state.layers):
            y, s = blk.mixer(blk.norm1(h), s, segments)
            h = h + y
            h = h + blk.mlp(blk.norm2(h))
            new.append(s)
        return self.norm_f(h), AtlasState(tuple(new), (state.phase + t) % self.chunk_size)

    def segments(self, phase: torch.Tensor, t: int, device: torch.device
                 ) -> list[tuple[int, int, torch.Tensor | None, bool]]:
        """`chunk_segments` for rows at `phase` [B]: (start, end, closes [B] bool or None where no row's
        chunk ends, whether every row starts a chunk at `start`)."""
        phases = phase.tolist()
        out = []
        for start, end, closes in chunk_segments(phases, t, self.chunk_size):
            mask = torch.tensor(closes, device=device) if any(closes) else None
            out.append((start, end, mask, all((p + start) % self.chunk_size == 0 for p in phases)))
        return out

    def step(self, x_t: torch.Tensor, state: AtlasState) -> tuple[torch.Tensor, AtlasState]:
        """x_t [B, D] -> y_t [B, D]: a segment of one token (O(1) in the tokens seen)."""
        assert x_t.dim() == 2, f"expected x_t of shape [B, {self.d_model}], got {tuple(x_t.shape)}"
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state

    def reset_state(self, state: AtlasState, rows: torch.Tensor) -> AtlasState:
        """Rows where `rows` [B] is True get a fresh state (M_0, empty window, phase 0); others are kept."""
        fresh = self.init_state(state.phase.shape[0], state.phase.device, state.layers[0].decay.dtype)
        layers = []
        for f, o in zip(fresh.layers, state.layers):
            merged = [where_rows(rows, a, b) for a, b in zip(f.tensors(), o.tensors())]
            k = len(o.mem_start)
            layers.append(AtlasLayerState(merged[0], tuple(merged[1:1 + k]), tuple(merged[1 + k:1 + 2 * k]),
                                          tuple(merged[1 + 2 * k:1 + 3 * k]), *merged[1 + 3 * k:]))
        return AtlasState(tuple(layers), where_rows(rows, torch.zeros_like(state.phase), state.phase))
