"""The shared suite every sequence core passes, plus core-specific checks against naive references.

Parametrised over `available_cores()` (a newly registered core is picked up automatically, with its
default kwargs unless VARIANTS lists tiny ones) and the key option variants below. Parity checks run
in float64 with tight tolerances.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from wam.datasets.errors import WamError
from wam.worldmodel.cores import available_cores, build_core

D, LAYERS, B, T = 16, 2, 3, 13
CHUNK = 4  # chunked cores use this chunk size; T = 13 spans chunk boundaries at 4, 8, 12

# Tiny configurations per core; a core missing here is tested with its defaults.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "transformer": [{"n_heads": 2}, {"n_heads": 2, "window": 5}, {"n_heads": 2, "positions": "none"}],
    "mamba": [{"d_state": 4, "chunk_size": CHUNK}],
    "mamba2": [{"d_state": 4, "headdim": 8, "chunk_size": CHUNK},
               {"d_state": 4, "headdim": 8, "chunk_size": CHUNK, "ngroups": 2}],
    "atlas": [{"n_heads": 2, "chunk_size": CHUNK}],
}
# Cores whose chunk size only changes speed, not the result (ATLAS's chunk size is part of its math:
# inside a chunk the memory's gradients are taken at the chunk-start memory).
CHUNK_INVARIANT = ("mamba", "mamba2")


def _cases() -> list[Any]:
    cases = []
    for name in available_cores():
        for kw in VARIANTS.get(name, [{}]):
            tag = ",".join(f"{k}={v}" for k, v in kw.items())
            cases.append(pytest.param(name, kw, id=f"{name}[{tag}]" if tag else name))
    return cases


CASES = _cases()


def make(name: str, kw: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    return build_core(name, d_model=D, n_layers=LAYERS, **kw).to(dtype).eval()


def seq(t: int = T, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, t, D, generator=g, dtype=dtype)


def run_steps(core, x: torch.Tensor, state) -> tuple[torch.Tensor, Any]:
    ys = []
    for t in range(x.shape[1]):
        y, state = core.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), f"max abs difference {err:.3g} > {tol:g}"


@pytest.mark.parametrize("name,kw", CASES)
def test_parallel_equals_step(name, kw):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        y, s_par = core(x)
        y_step, s_step = run_steps(core, x, core.init_state(B, dtype=torch.float64))
        close(y_step, y)
        # the final states agree too: continuing from either gives the same outputs
        x2 = seq(5, seed=2)
        close(core(x2, s_step)[0], core(x2, s_par)[0])


@pytest.mark.parametrize("name,kw", CASES)
def test_split_and_carry_equals_one_pass(name, kw):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        y, _ = core(x)
        for cut in sorted({1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, T - 1}):
            y1, s = core(x[:, :cut])
            y2, _ = core(x[:, cut:], s)
            close(torch.cat([y1, y2], 1), y)
        # three pieces, the middle one of a single token
        ya, s = core(x[:, :3])
        yb, s = core(x[:, 3:4], s)
        yc, _ = core(x[:, 4:], s)
        close(torch.cat([ya, yb, yc], 1), y)


@pytest.mark.parametrize("name,kw", CASES)
def test_causal(name, kw):
    core = make(name, kw)
    x = seq()
    x2 = x.clone()
    x2[:, 7:] += torch.randn_like(x2[:, 7:])
    with torch.no_grad():
        y, y2 = core(x)[0], core(x2)[0]
    close(y2[:, :7], y[:, :7], tol=1e-12)
    assert (y2[:, 7:] - y[:, 7:]).abs().max() > 1e-6, "changing a token must change its own output"


@pytest.mark.parametrize("name,kw", CASES)
def test_batch_rows_independent(name, kw):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        y, _ = core(x)
        for r in range(B):
            close(core(x[r:r + 1])[0], y[r:r + 1])
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        y2, _ = core(x2)
    close(y2[[0, 2]], y[[0, 2]], tol=1e-12)


@pytest.mark.parametrize("name,kw", CASES)
def test_reset_rows_equals_fresh_state(name, kw):
    core = make(name, kw)
    x = seq()
    x_next = seq(6, seed=3)
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        _, s = core(x)
        s_reset = core.reset_state(s, rows)
        y_reset, _ = core(x_next, s_reset)
        y_fresh, _ = core(x_next)  # a fresh state for every row
        y_kept, _ = core(x_next, s)  # the old state, still usable (not mutated by reset)
        close(y_reset[rows], y_fresh[rows])
        close(y_reset[~rows], y_kept[~rows])
        assert (y_kept[rows] - y_fresh[rows]).abs().max() > 1e-6, "the carried state must matter"
        # the step form after a reset agrees as well
        ys, _ = run_steps(core, x_next, s_reset)
        close(ys, y_reset)


@pytest.mark.parametrize("name,kw", CASES)
def test_states_are_not_mutated(name, kw):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        _, s = core(x[:, :6])
        y_a, _ = core(x[:, 6:], s)
        core.step(x[:, 6], s)
        core(x[:, 6:], s)
        core.reset_state(s, torch.tensor([True, True, True]))
        y_b, _ = core(x[:, 6:], s)
    close(y_b, y_a, tol=0.0)


@pytest.mark.parametrize("name,kw", CASES)
def test_map_tensors_selects_and_repeats_rows(name, kw):
    """`state.map_tensors(lambda t: t[idx])` (a planner's beam expansion) == running those rows alone."""
    core = make(name, kw)
    x = seq()
    idx = torch.tensor([2, 0, 2])
    with torch.no_grad():
        _, s = core(x[:, :6])
        y_sel, _ = core(x[idx, 6:], s.map_tensors(lambda t: t[idx]))
        y_ref, _ = core(x[idx])
    close(y_sel, y_ref[:, 6:])


@pytest.mark.parametrize("name,kw", CASES)
def test_fresh_state_equals_none(name, kw):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        close(core(x, core.init_state(B, dtype=torch.float64))[0], core(x)[0], tol=0.0)


@pytest.mark.parametrize("name,kw", CASES)
def test_gradients_finite_and_reach_every_parameter(name, kw):
    core = make(name, kw).train()
    x = seq().requires_grad_(True)
    y, _ = core(x)
    (y.pow(2).mean() + y[:, -1].sum()).backward()
    assert torch.isfinite(x.grad).all(), "input gradient not finite"
    for pname, p in core.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} gradient not finite"
    no_grad = [n for n, p in core.named_parameters() if p.grad.abs().max() == 0]
    assert not no_grad, f"parameters with an all-zero gradient: {no_grad}"


CHUNKED = [c for c in CASES if c.values[0] in CHUNK_INVARIANT]


@pytest.mark.parametrize("name,kw", CHUNKED)
def test_gradients_equal_across_chunk_sizes(name, kw):
    grads = []
    for chunk in (CHUNK, CHUNK + 1, 64):
        core = make(name, {**kw, "chunk_size": chunk})
        x = seq().requires_grad_(True)
        y, _ = core(x)
        (y.pow(2).mean() + y[:, -1].sum()).backward()
        grads.append([x.grad] + [p.grad for p in core.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            close(b, a)


@pytest.mark.parametrize("name,kw", CASES)
def test_state_dict_round_trip(name, kw):
    core = make(name, kw)
    buf = io.BytesIO()
    torch.save(core.state_dict(), buf)
    buf.seek(0)
    other = make(name, kw, seed=123)
    x = seq()
    with torch.no_grad():
        assert (other(x)[0] - core(x)[0]).abs().max() > 1e-6, "differently seeded cores should differ"
        other.load_state_dict(torch.load(buf, weights_only=True))
        close(other(x)[0], core(x)[0], tol=0.0)


@pytest.mark.parametrize("name,kw", CASES)
def test_bf16_autocast_close_to_fp32(name, kw):
    core = make(name, kw, dtype=torch.float32)
    x = seq(dtype=torch.float32)
    with torch.no_grad():
        y32, _ = core(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, s = core(x)
            y16_step, _ = core.step(x[:, 0], s)
    assert torch.isfinite(y16.float()).all() and torch.isfinite(y16_step.float()).all(), "bf16 output not finite"
    rel = ((y16.float() - y32).norm() / y32.norm()).item()
    assert rel < 0.05, f"bf16 autocast output differs from fp32 by {rel:.3f} (relative)"


@pytest.mark.parametrize("name", available_cores())
def test_unknown_kwarg_or_name_is_a_user_error(name):
    with pytest.raises((WamError, TypeError)):
        build_core(name, d_model=D, n_layers=1, no_such_option=1)
    with pytest.raises(WamError, match="unknown core"):
        build_core("no-such-core", d_model=D, n_layers=1)


# ---------------------------------------------------------------------------------------------
# transformer-specific
# ---------------------------------------------------------------------------------------------


def _naive_attention_core(core, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """The transformer's forward written out with an explicit softmax over a dense [T, T] mask."""
    from wam.worldmodel.cores.transformer import apply_rope, rope_tables

    b, t, d = x.shape
    nh = core.n_heads
    i = torch.arange(t)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    cos, sin = rope_tables(i[None].expand(b, t), d // nh, core.rope_base, x.dtype)
    h = x
    for blk in core.h:
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(d, -1)
        q, k, v = (z.view(b, t, nh, d // nh).transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // nh)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)
        h = h + blk.attn.c_proj(a)
        h = h + blk.mlp(blk.ln_2(h))
    return core.ln_f(h)


@pytest.mark.parametrize("window", [None, 1, 5])
def test_transformer_matches_naive_masked_attention(window):
    core = make("transformer", {"n_heads": 2, "window": window})
    x = seq()
    with torch.no_grad():
        close(core(x)[0], _naive_attention_core(core, x, window))
        # streamed token by token through the bounded cache: same as the dense windowed mask
        y_step, s = run_steps(core, x, core.init_state(B, dtype=torch.float64))
        close(y_step, _naive_attention_core(core, x, window))
        assert s.length == (T if window is None else window - 1), f"cache holds {s.length} slots"


def test_transformer_window_cache_is_bounded_and_positions_are_relative():
    core = make("transformer", {"n_heads": 2, "window": 4})
    x = seq(40)
    with torch.no_grad():
        y, s = core(x)
        assert s.length == 3 and int(s.pos[0]) == 40, f"cache length {s.length}, pos {s.pos.tolist()}"
        # RoPE is relative: the receptive field alone (3 tokens back per layer), from a fresh state
        # at position 0, gives the last output
        field = 3 * LAYERS + 1
        close(core(x[:, -field:])[0][:, -1], y[:, -1])


def test_transformer_max_len_is_enforced():
    core = make("transformer", {"n_heads": 2, "max_len": 8})
    with torch.no_grad():
        _, s = core(seq(6))
        with pytest.raises(WamError, match="max_len"):
            core(seq(3), s)
        # resetting some rows frees nothing; resetting all of them frees the cache
        assert core.reset_state(s, torch.tensor([True, False, True])).length == 6
        s = core.reset_state(s, torch.ones(B, dtype=torch.bool))
        assert s.length == 0, f"a fully reset cache still holds {s.length} slots"
        close(core(seq(8), s)[0], core(seq(8))[0], tol=0.0)


def test_transformer_rope_none_is_position_free():
    """Without RoPE the first token's output depends only on that token, wherever it stands."""
    core = make("transformer", {"n_heads": 2, "positions": "none"})
    x = seq()
    with torch.no_grad():
        _, s = core(x[:, :5])
        s = core.reset_state(s, torch.ones(B, dtype=torch.bool))
        close(core(x[:, 5:6], s)[0], core(x[:, 5:6])[0])


def test_transformer_sdpa_matches_under_dropout_zero_train_mode():
    core = make("transformer", {"n_heads": 2}).train()
    x = seq()
    close(core(x)[0], core.eval()(x)[0], tol=0.0)


def test_transformer_rejects_bad_heads():
    with pytest.raises(WamError, match="n_heads"):
        build_core("transformer", d_model=D, n_layers=1, n_heads=3)


# ---------------------------------------------------------------------------------------------
# mamba / mamba2: the scans against naive per-token recurrences, and the mixers written out
# ---------------------------------------------------------------------------------------------


def _naive_selective_scan(x, dt, a, b, c, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t;  y_t = h_t C_t  (per channel, diagonal A). One token at a time."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * x[:, t])[:, :, None] * b[:, t, None, :]
        ys.append(torch.einsum("ben,bn->be", h, c[:, t]))
    return torch.stack(ys, 1), h


def _naive_ssd(x, dt, a, b, c, h0):
    """Mamba-2 per head: h_t = exp(dt_t a_h) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t (groups repeated to heads)."""
    k = x.shape[2] // b.shape[2]
    b, c = b.repeat_interleave(k, dim=2), c.repeat_interleave(k, dim=2)  # [Bt, T, H, N]
    h, ys = h0, []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * a)  # [Bt, H]
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, c[:, t]))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("t,chunk", [(13, 4), (13, 1), (16, 16), (5, 8), (31, 7)])
def test_mamba_chunked_scan_equals_sequential_recurrence(t, chunk):
    from wam.worldmodel.cores.mamba import selective_scan

    g = torch.Generator().manual_seed(t * 100 + chunk)
    bt, e, n = 2, 6, 5
    x = torch.randn(bt, t, e, generator=g, dtype=torch.float64)
    dt = torch.rand(bt, t, e, generator=g, dtype=torch.float64) * 3  # large steps: exp(dt A) down to e^-45
    a = -torch.rand(e, n, generator=g, dtype=torch.float64) * 15
    b, c = (torch.randn(bt, t, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(bt, e, n, generator=g, dtype=torch.float64)
    y, h = selective_scan(x, dt, a, b, c, h0, chunk)
    y_ref, h_ref = _naive_selective_scan(x, dt, a, b, c, h0)
    close(y, y_ref, tol=1e-12)
    close(h, h_ref, tol=1e-12)


@pytest.mark.parametrize("t,chunk,use_state", [(13, 4, True), (13, 1, True), (16, 16, False), (5, 8, True),
                                               (31, 7, False)])
def test_mamba_scan_backward_equals_autograd_of_the_recurrence(t, chunk, use_state):
    """The hand-written backward (states recomputed from the chunk entries) gives the gradients that autograd
    takes through the token-by-token recurrence, for every input, in float64; with and without a gradient
    on the final state."""
    from wam.worldmodel.cores.mamba import selective_scan

    g = torch.Generator().manual_seed(t * 10 + chunk)
    bt, e, n = 2, 6, 5
    x = torch.randn(bt, t, e, generator=g, dtype=torch.float64)
    dt = torch.rand(bt, t, e, generator=g, dtype=torch.float64) * 2
    a = -torch.rand(e, n, generator=g, dtype=torch.float64) * 5
    b, c = (torch.randn(bt, t, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(bt, e, n, generator=g, dtype=torch.float64)
    gy = torch.randn(bt, t, e, generator=g, dtype=torch.float64)
    gh = torch.randn(bt, e, n, generator=g, dtype=torch.float64)
    grads = []
    for scan in (lambda *z: selective_scan(*z, chunk), _naive_selective_scan):
        inputs = [z.clone().requires_grad_(True) for z in (x, dt, a, b, c, h0)]
        y, h = scan(*inputs)
        loss = (y * gy).sum() + ((h * gh).sum() if use_state else 0.0)
        grads.append(torch.autograd.grad(loss, inputs))
    for name, got, want in zip(("x", "dt", "A", "B", "C", "h0"), *grads):
        assert want.abs().max() > 1e-3, f"{name}: reference gradient is zero, the test would be void"
        close(got, want, tol=1e-10)


def test_mamba_scan_is_finite_for_extreme_decays():
    """Every exponent in the chunked scan is <= 0: huge dt * |A| cannot overflow (float32)."""
    from wam.worldmodel.cores.mamba import selective_scan

    x = torch.randn(1, 64, 3)
    dt = torch.full((1, 64, 3), 50.0)
    a = -torch.full((3, 4), 20.0)  # dt * A = -1000 per token
    y, h = selective_scan(x, dt, a, torch.randn(1, 64, 4), torch.randn(1, 64, 4), torch.zeros(1, 3, 4), 64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all(), "chunked scan overflowed"


@pytest.mark.parametrize("t,chunk,groups", [(13, 4, 1), (13, 4, 2), (12, 4, 4), (7, 16, 1), (9, 1, 2)])
def test_mamba2_ssd_equals_sequential_recurrence(t, chunk, groups):
    from wam.worldmodel.cores.mamba2 import ssd_scan

    g = torch.Generator().manual_seed(t * 100 + chunk + groups)
    bt, nh, p, n = 2, 4, 3, 5
    x = torch.randn(bt, t, nh, p, generator=g, dtype=torch.float64)
    dt = torch.rand(bt, t, nh, generator=g, dtype=torch.float64) * 2
    a = -torch.rand(nh, generator=g, dtype=torch.float64) * 8
    b, c = (torch.randn(bt, t, groups, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(bt, nh, p, n, generator=g, dtype=torch.float64)
    y, h = ssd_scan(x, dt, a, b, c, chunk, h0)
    y_ref, h_ref = _naive_ssd(x, dt, a, b, c, h0)
    close(y, y_ref, tol=1e-12)
    close(h, h_ref, tol=1e-12)


def _conv_silu(x, conv):
    """Causal depthwise conv as in the papers: pad K-1 zeros on the left; x [B, T, C]."""
    k = conv.weight.shape[-1]
    return F.silu(F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), conv.weight, conv.bias, groups=x.shape[-1])).transpose(1, 2)


def _rmsnorm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _naive_mamba_core(core, u):
    """Mamba-1 (REFERENCE.md) written out: Block = h + mixer(rmsnorm(h)), final rmsnorm."""
    h = u
    for layer in core.layers:
        m = layer.mixer
        x, z = m.in_proj(_rmsnorm(h, layer.norm.weight)).chunk(2, -1)
        x = _conv_silu(x, m.conv1d)
        dt, b, c = m.x_proj(x).split([m.dt_rank, m.d_state, m.d_state], -1)
        dt = F.softplus(m.dt_proj(dt))
        y, _ = _naive_selective_scan(x, dt, -torch.exp(m.A_log), b, c, torch.zeros(u.shape[0], m.d_inner, m.d_state,
                                                                                    dtype=u.dtype))
        h = h + m.out_proj((y + m.D * x) * F.silu(z))
    return _rmsnorm(h, core.norm_f.weight)


def _naive_mamba2_core(core, u):
    """Mamba-2 written out: in_proj -> z, xBC, dt; conv+SiLU on xBC; SSD; + D x; gated RMSNorm; out_proj."""
    h = u
    bt, t, _ = u.shape
    for layer in core.layers:
        m = layer.mixer
        gn = m.ngroups * m.d_state
        z, xbc, dt = m.in_proj(_rmsnorm(h, layer.norm.weight)).split([m.d_inner, m.d_inner + 2 * gn, m.nheads], -1)
        x, b, c = _conv_silu(xbc, m.conv1d).split([m.d_inner, gn, gn], -1)
        x = x.reshape(bt, t, m.nheads, m.headdim)
        dt = F.softplus(dt + m.dt_bias)
        b, c = b.reshape(bt, t, m.ngroups, m.d_state), c.reshape(bt, t, m.ngroups, m.d_state)
        y, _ = _naive_ssd(x, dt, -torch.exp(m.A_log), b, c, torch.zeros(bt, m.nheads, m.headdim, m.d_state,
                                                                          dtype=u.dtype))
        y = (y + m.D[:, None] * x).reshape(bt, t, m.d_inner)
        gated = (y * F.silu(z)).reshape(bt, t, m.ngroups, -1)  # norm per group, then scale
        y = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(bt, t, -1) * m.norm.weight
        h = h + m.out_proj(y)
    return _rmsnorm(h, core.norm_f.weight)


@pytest.mark.parametrize("name,kw,naive", [
    ("mamba", {"d_state": 4, "chunk_size": 4}, _naive_mamba_core),
    ("mamba2", {"d_state": 4, "headdim": 8, "chunk_size": 4}, _naive_mamba2_core),
    ("mamba2", {"d_state": 4, "headdim": 8, "chunk_size": 4, "ngroups": 2}, _naive_mamba2_core),
])
def test_mamba_cores_match_the_papers_written_out(name, kw, naive):
    core = make(name, kw)
    x = seq()
    with torch.no_grad():
        close(core(x)[0], naive(core, x))


def test_mamba_parameter_names_match_the_reference_implementation():
    m1 = {k for k in build_core("mamba", d_model=D, n_layers=2).state_dict() if k.startswith("layers.0.")}
    assert m1 == {f"layers.0.{k}" for k in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                            "mixer.conv1d.bias", "mixer.x_proj.weight", "mixer.dt_proj.weight",
                                            "mixer.dt_proj.bias", "mixer.A_log", "mixer.D", "mixer.out_proj.weight")}
    m2 = {k for k in build_core("mamba2", d_model=D, n_layers=2, headdim=8).state_dict() if k.startswith("layers.0.")}
    assert m2 == {f"layers.0.{k}" for k in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight",
                                            "mixer.conv1d.bias", "mixer.dt_bias", "mixer.A_log", "mixer.D",
                                            "mixer.norm.weight", "mixer.out_proj.weight")}
    core = build_core("mamba", d_model=D, n_layers=2, d_state=16)
    sd = core.state_dict()
    assert sd["layers.1.mixer.in_proj.weight"].shape == (2 * 2 * D, D)  # x and z
    assert sd["layers.1.mixer.x_proj.weight"].shape == (math.ceil(D / 16) + 2 * 16, 2 * D)  # dt, B, C
    assert torch.equal(sd["layers.0.mixer.A_log"][3], torch.log(torch.arange(1.0, 17.0)))  # S4D-real init
    assert "norm_f.weight" in sd


def test_mamba_state_size_is_constant_in_context_length():
    for name, kw in (("mamba", {"d_state": 4}), ("mamba2", {"d_state": 4, "headdim": 8})):
        core = make(name, kw)
        with torch.no_grad():
            sizes = {core(seq(t))[1].nbytes() for t in (1, 5, 40)}
        assert len(sizes) == 1, f"{name} state size changes with context: {sizes}"


def _mamba_ssm_on_gpu() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.skipif(not _mamba_ssm_on_gpu(), reason="needs CUDA and mamba-ssm (the fused-kernel paths)")
@pytest.mark.parametrize("name,kw", [("mamba", {"d_state": 16}), ("mamba2", {"d_state": 16, "headdim": 8})])
def test_mamba_ssm_kernels_equal_the_pure_path(name, kw):
    """On a GPU with mamba-ssm: the fused kernels give the pure-PyTorch results, with a carried state too."""
    torch.manual_seed(0)
    fast = build_core(name, d_model=32, n_layers=2, use_kernels=True, **kw).cuda()
    pure = build_core(name, d_model=32, n_layers=2, use_kernels=False, **kw).cuda()
    pure.load_state_dict(fast.state_dict())
    x = torch.randn(2, 100, 32, device="cuda")
    y_f, s_f = fast(x[:, :60])
    y_p, s_p = pure(x[:, :60])
    close(y_f, y_p, tol=1e-3)
    close(fast(x[:, 60:], s_f)[0], pure(x[:, 60:], s_p)[0], tol=1e-3)
