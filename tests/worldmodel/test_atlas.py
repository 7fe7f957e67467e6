"""ATLAS core against a naive sequential reference written here in float64.

The reference walks the tokens one by one: an explicit short convolution, ℓ2-normalisation and
polynomial features, an explicit Omega window of the last c tokens, the memory gradient by
`torch.autograd.grad` of the window loss at the chunk-start weights, explicit momentum, explicit
Newton–Schulz-5 at the chunk end. The core's chunk-parallel form must match it for every option.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from wam.datasets.errors import WamError
from wam.worldmodel.cores import build_core
from wam.worldmodel.cores.atlas import AtlasCore, AtlasMixer
from wam.worldmodel.cores.atlas_ops import chunk_segments

D, B, T = 16, 2, 13


def make(seed: int = 0, n_layers: int = 1, **kw) -> AtlasCore:
    torch.manual_seed(seed)
    core = build_core("atlas", d_model=D, n_layers=n_layers, n_heads=2, **kw).double().eval()
    with torch.no_grad():  # move the memory off its init so every term of the update matters
        for p in core.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return core


def seq(t: int = T, seed: int = 1, batch: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, t, D, generator=g, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), f"max abs difference {err:.3g} > {tol:g}"


def ns5(g: torch.Tensor) -> torch.Tensor:
    """Newton–Schulz-5 (Muon's quintic coefficients) on one matrix, written out."""
    x = g if g.shape[0] <= g.shape[1] else g.T
    x = x / torch.sqrt((x * x).sum() + 1e-14)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x if g.shape[0] <= g.shape[1] else x.T


def memory_apply(ws: list[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """M(u) for one head: [W] linear, [W1, W2] residual MLP u + W2 silu(W1 u)."""
    if len(ws) == 1:
        return ws[0] @ u
    return u + ws[1] @ F.silu(ws[0] @ u)


def naive_inputs(mix: AtlasMixer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token by token: φ(q), φ(k), v [B, T, H, d] and the gates α, η, θ, γ [B, T, H]."""
    b, t, _ = x.shape
    h, d = mix.n_heads, mix.head_dim
    w = mix.conv1d.weight[:, 0]  # [C, K]
    k_len = w.shape[1]
    pre = [x[:, i] @ mix.qkv.weight.T for i in range(t)]  # each [B, C]
    coeffs = mix.poly_coeffs

    def phi(u: torch.Tensor) -> torch.Tensor:
        u = u / u.norm(dim=-1, keepdim=True)
        return coeffs[0] / math.sqrt(d) + sum(coeffs[i] * u ** i for i in range(1, len(coeffs)))

    out: dict[str, list[torch.Tensor]] = {n: [] for n in ("q", "k", "v", "alpha", "eta", "theta", "gamma")}
    for i in range(t):
        conv = mix.conv1d.bias.expand(b, -1).clone()
        for j in range(k_len):  # tap j sees the input K-1-j tokens back
            src = i - (k_len - 1 - j)
            if src >= 0:
                conv = conv + w[:, j] * pre[src]
        u = F.silu(conv).view(b, 3, h, d)
        out["q"].append(phi(u[:, 0]))
        out["k"].append(phi(u[:, 1]))
        out["v"].append(u[:, 2])
        raw = (x[:, i] @ mix.gates.weight.T + mix.gates.bias).view(b, len(mix.gate_names), h)
        gates = dict(zip(mix.gate_names, raw.unbind(1)))
        out["alpha"].append(torch.sigmoid(gates["alpha"]))
        out["eta"].append(torch.sigmoid(gates["eta"]) * mix.eta_max)
        out["theta"].append(torch.sigmoid(gates["theta"]) if mix.momentum else torch.zeros(b, h, dtype=x.dtype))
        out["gamma"].append(torch.sigmoid(gates["gamma"]) if mix.window > 1 else torch.ones(b, h, dtype=x.dtype))
    return {n: torch.stack(v, 1) for n, v in out.items()}


def finish(mix: AtlasMixer, y: torch.Tensor) -> torch.Tensor:
    """Memory reads [B, T, H, d] -> mixer output [B, T, D] (per-head RMSNorm, out projection)."""
    return mix.out_proj(mix.out_norm(y).flatten(2))


def naive_mixer(mix: AtlasMixer, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The ATLAS mixer token by token, one (row, head) memory at a time."""
    b, t, _ = x.shape
    h, c = mix.n_heads, mix.window
    inp = naive_inputs(mix, x)
    y = torch.zeros(b, t, h, mix.head_dim, dtype=x.dtype)
    for r, hd in itertools.product(range(b), range(h)):
        m_cur = [w[hd].detach().clone() for w in mix.mem_init]
        s = [torch.zeros_like(w) for w in m_cur]
        window: deque = deque(maxlen=c)
        for i in range(t):
            if i % chunk == 0:  # chunk start: gradients of this chunk are taken at this memory
                m_bar, delta, decay = [w.clone() for w in m_cur], [torch.zeros_like(w) for w in m_cur], 1.0
            window.append((inp["k"][r, i, hd], inp["v"][r, i, hd], inp["gamma"][r, i, hd]))
            with torch.enable_grad():
                ws = [w.detach().clone().requires_grad_(True) for w in m_bar]
                loss = sum(g_i * 0.5 * (memory_apply(ws, k_i) - v_i).pow(2).sum() for k_i, v_i, g_i in window)
                grads = torch.autograd.grad(loss, ws)
            theta, eta, alpha = inp["theta"][r, i, hd], inp["eta"][r, i, hd], inp["alpha"][r, i, hd]
            if mix.newton_schulz == "token":  # Eqs. 32-33: S_t = θ S + ∇ℓ, M_t = α M_{t-1} − η NS5(S_t)
                s = [theta * s_w + g_w for s_w, g_w in zip(s, grads)]
                delta = [alpha * d_w - eta * ns5(s_w) for d_w, s_w in zip(delta, s)]
            else:
                s = [theta * s_w - eta * g_w for s_w, g_w in zip(s, grads)]
                delta = [alpha * d_w + s_w for d_w, s_w in zip(delta, s)]
            decay = decay * alpha
            if (i + 1) % chunk == 0 and mix.newton_schulz == "chunk":
                m_cur = [decay * mb + ns5(d_w) for mb, d_w in zip(m_bar, delta)]
            else:
                m_cur = [decay * mb + d_w for mb, d_w in zip(m_bar, delta)]
            y[r, i, hd] = memory_apply(m_cur, inp["q"][r, i, hd])
    return finish(mix, y)


OPTIONS = [dict(memory_depth=depth, window=c, momentum=mom, newton_schulz=ns, chunk_size=chunk)
           for depth, c, mom, ns, chunk in itertools.product((1, 2), (1, 3), (True, False), ("token", "chunk", False),
                                                             (1, 4, 7))]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_mixer_matches_naive_reference(kw):
    p = 1 + OPTIONS.index(kw) % 3  # every degree with every other option over the grid
    core = make(poly_degree=p, **kw)
    mix = core.layers[0].mixer
    x = seq()
    with torch.no_grad():
        state = mix.init_state(B, "cpu", torch.float64)
        y_mix, _ = mix(x, state, core.segments(torch.zeros(B, dtype=torch.long), T, x.device))
    # Newton–Schulz amplifies rounding in near-zero singular directions: a looser (still tight) tolerance
    close(y_mix, naive_mixer(mix, x, kw["chunk_size"]), tol=1e-8 if kw["newton_schulz"] else 1e-10)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_feature_degrees_and_two_layers_match_naive(p):
    """The full core (blocks: RMSNorm, mixer, RMSNorm, MLP; final RMSNorm) with the naive mixer."""
    core = make(n_layers=2, poly_degree=p, window=3, chunk_size=4)
    assert torch.allclose(core.layers[0].mixer.poly_coeffs, torch.tensor(
        [1 / math.factorial(i) for i in range(p + 1)], dtype=torch.float64), atol=0.5), "coefficients ~ 1/i!"
    x = seq()
    with torch.no_grad():
        h = x
        for blk in core.layers:
            h = h + naive_mixer(blk.mixer, blk.norm1(h), 4)
            h = h + blk.mlp(blk.norm2(h))
        close(core(x)[0], core.norm_f(h))


def test_initial_feature_coefficients_are_inverse_factorials():
    torch.manual_seed(0)
    core = build_core("atlas", d_model=D, n_layers=1, poly_degree=3)
    want = torch.tensor([1.0, 1.0, 0.5, 1 / 6])
    assert torch.allclose(core.layers[0].mixer.poly_coeffs.detach(), want), "φ coefficients must start at 1/i!"


def test_delta_rule_special_case():
    """c = 1, linear memory, no NS, no momentum, chunk 1:  M_t = α_t M_{t-1} − η_t (M_{t-1} k_t − v_t) k_tᵀ."""
    core = make(memory_depth=1, window=1, momentum=False, newton_schulz=False, chunk_size=1, poly_degree=2)
    mix = core.layers[0].mixer
    x = seq()
    with torch.no_grad():
        inp = naive_inputs(mix, x)
        m = mix.mem_init[0].expand(B, -1, -1, -1).clone()  # [B, H, d, d]
        ys = []
        for i in range(T):
            k, v, q = inp["k"][:, i], inp["v"][:, i], inp["q"][:, i]  # [B, H, d]
            a, e = inp["alpha"][:, i, :, None, None], inp["eta"][:, i, :, None, None]
            err = torch.einsum("bhij,bhj->bhi", m, k) - v
            m = a * m - e * torch.einsum("bhi,bhj->bhij", err, k)
            ys.append(torch.einsum("bhij,bhj->bhi", m, q))
        want = finish(mix, torch.stack(ys, 1))
        state = mix.init_state(B, "cpu", torch.float64)
        close(mix(x, state, core.segments(torch.zeros(B, dtype=torch.long), T, x.device))[0], want)


@pytest.mark.parametrize("form", ["token", "chunk"])
def test_chunk_size_one_is_an_online_atlas_step(form):
    """chunk 1, gradients at M_{t-1}. The paper's Eqs. 32-33 (default, "token"): S_t = θ_t S_{t-1} + ∇ℓ_t,
    M_t = α_t M_{t-1} − η_t NS5(S_t). The "chunk" variant: S_t = θ_t S_{t-1} − η_t ∇ℓ_t, M_t = α_t M_{t-1} + NS5(S_t)."""
    core = make(memory_depth=2, window=3, chunk_size=1, newton_schulz=form)
    assert core.layers[0].mixer.newton_schulz == form
    mix = core.layers[0].mixer
    x = seq(9)
    inp = naive_inputs(mix, x)
    y = torch.zeros(B, 9, mix.n_heads, mix.head_dim, dtype=torch.float64)
    for r, hd in itertools.product(range(B), range(mix.n_heads)):
        m = [w[hd].detach().clone() for w in mix.mem_init]
        s = [torch.zeros_like(w) for w in m]
        for i in range(9):
            ws = [w.clone().requires_grad_(True) for w in m]
            loss = sum(inp["gamma"][r, j, hd] * 0.5 * (memory_apply(ws, inp["k"][r, j, hd]) - inp["v"][r, j, hd])
                       .pow(2).sum() for j in range(max(0, i - 2), i + 1))
            grads = torch.autograd.grad(loss, ws)
            theta, eta, alpha = inp["theta"][r, i, hd], inp["eta"][r, i, hd], inp["alpha"][r, i, hd]
            if form == "token":
                s = [theta * s_w + g for s_w, g in zip(s, grads)]
                m = [alpha * w - eta * ns5(s_w) for w, s_w in zip(m, s)]
            else:
                s = [theta * s_w - eta * g for s_w, g in zip(s, grads)]
                m = [alpha * w + ns5(s_w) for w, s_w in zip(m, s)]
            y[r, i, hd] = memory_apply(m, inp["q"][r, i, hd])
    with torch.no_grad():
        state = mix.init_state(B, "cpu", torch.float64)
        segs = core.segments(torch.zeros(B, dtype=torch.long), 9, x.device)
        close(mix(x, state, segs)[0], finish(mix, y).detach())


def test_rows_in_different_chunk_phases():
    """After resetting one row mid-chunk the rows' chunk boundaries differ; each row still equals its own run."""
    core = make(n_layers=2, chunk_size=4, window=3)
    x1, x2 = seq(5), seq(9, seed=2)
    with torch.no_grad():
        _, s = core(x1)
        s = core.reset_state(s, torch.tensor([True, False]))
        assert s.phase.tolist() == [0, 1], f"phases after reset: {s.phase.tolist()}"
        y, s_end = core(x2, s)
        close(y[:1], core(x2[:1])[0])  # row 0: fresh
        close(y[1:], core(torch.cat([x1[1:], x2[1:]], 1))[0][:, 5:])  # row 1: continued
        ys, _ = core(x2[:, :3], s)
        yt, _ = core(x2[:, 3:], _)
        close(torch.cat([ys, yt], 1), y)


def test_segments_cover_every_rows_boundaries():
    segs = chunk_segments([0, 3, 1], 10, 4)
    assert [(s, e) for s, e, _ in segs] == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9), (9, 10)]
    assert [i for i, (_, _, cl) in enumerate(segs) if cl[0]] == [2, 5], "row 0 closes at 4 and 8"
    assert [i for i, (_, _, cl) in enumerate(segs) if cl[1]] == [0, 3, 6], "row 1 closes at 1, 5, 9"


def test_gradients_equal_between_one_pass_split_and_step():
    """Chunk size is part of ATLAS's definition (gradients at the chunk-start memory), so gradients
    differ between chunk sizes; at a fixed chunk size they are the same however the sequence is fed."""
    core = make(n_layers=2, chunk_size=4, window=3)
    x = seq()

    def grads(run) -> list[torch.Tensor]:
        core.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = run(xx)
        (y.pow(2).mean() + y[:, -1].sum()).backward()
        return [xx.grad] + [p.grad.clone() for p in core.parameters()]

    def split(xx):
        y1, s = core(xx[:, :5])
        return torch.cat([y1, core(xx[:, 5:], s)[0]], 1)

    def steps(xx):
        s, ys = core.init_state(B), []
        for i in range(T):
            y, s = core.step(xx[:, i], s)
            ys.append(y)
        return torch.stack(ys, 1)

    one = grads(lambda xx: core(xx)[0])
    assert all(torch.isfinite(g).all() for g in one), "gradients must be finite"
    for other in (grads(split), grads(steps)):
        for a, b in zip(one, other):
            close(b, a, tol=1e-9)
    # and a different chunk size is a different model
    other_core = make(n_layers=2, chunk_size=5, window=3)
    with torch.no_grad():
        assert (other_core(x)[0] - core(x)[0]).abs().max() > 1e-6, "chunk size changes the outputs"


def test_memory_learns_in_context():
    """A linear delta-rule memory recalls a value stored earlier in the sequence better than chance:
    reading with a key equal to an earlier key returns (a decayed copy of) its value."""
    core = make(memory_depth=1, window=1, momentum=False, newton_schulz=False, chunk_size=1, poly_degree=1,
                eta_max=0.4)
    mix = core.layers[0].mixer
    with torch.no_grad():
        mix.gates.weight.zero_()
        mix.gates.bias.fill_(8.0)  # α ≈ 1, η ≈ η_max = 0.4 (‖φ(k)‖² ≈ 2: a stable delta-rule step)
        x = seq(6)
        inp = naive_inputs(mix, x)
        state = mix.init_state(B, "cpu", torch.float64)
        _, st = mix(x, state, core.segments(torch.zeros(B, dtype=torch.long), 6, x.device))
        w = st.mem_start[0]  # [B, H, d, d]
        recalled = torch.einsum("bhij,bhj->bhi", w, inp["k"][:, -1])
        err_last = (recalled - inp["v"][:, -1]).norm() / inp["v"][:, -1].norm()
        err_init = (torch.einsum("bhij,bhj->bhi", mix.mem_init[0].expand_as(w), inp["k"][:, -1])
                    - inp["v"][:, -1]).norm() / inp["v"][:, -1].norm()
    assert err_last < 0.5 * err_init, f"memory recall error {err_last:.3f} vs {err_init:.3f} before writing"


def test_default_is_the_papers_per_token_newton_schulz():
    core = build_core("atlas", d_model=D, n_layers=1)
    mix = core.layers[0].mixer
    assert mix.newton_schulz == "token" and mix.eta_max == pytest.approx(0.1)
    assert build_core("atlas", d_model=D, n_layers=1, newton_schulz=True).layers[0].mixer.newton_schulz == "token"
    omega = build_core("atlas", d_model=D, n_layers=1, newton_schulz=False, chunk_size=8).layers[0].mixer
    assert omega.newton_schulz is None and omega.eta_max == pytest.approx(1 / (4 * 8))


def test_token_form_training_memory_is_recomputed_not_stored():
    """Per-token NS5 materialises [B, H, L, |M|] per chunk; the autograd graph must not keep it (recomputed in
    backward): the saved tensors of a forward stay below one chunk's per-token memories times the chunks."""
    torch.manual_seed(0)
    core = build_core("atlas", d_model=32, n_layers=1, chunk_size=8)
    x = torch.randn(2, 32, 32, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = core(x)
    per_token_memories = 2 * 1 * 32 * (2 * 2 * 32 * 32)  # B·H·T·|M| (deep memory, E = 2, d = 32)
    assert sum(saved) < per_token_memories, f"{sum(saved)} saved elements >= {per_token_memories}"
    y.pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_options_are_user_errors():
    for kw in ({"memory_depth": 3}, {"window": 0}, {"chunk_size": 0}, {"n_heads": 3}, {"poly_degree": 0},
               {"newton_schulz": "sometimes"}):
        with pytest.raises(WamError, match="atlas"):
            build_core("atlas", d_model=D, n_layers=1, **kw)
