"""The world-action model: sizes of the paper presets, shapes, incremental == parallel for every core,
new games, freezing, and one optimiser step per core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.worldmodel.cores import available_cores
from wam.worldmodel.losses import LossConfig, world_action_loss
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig


def tiny_cfg(core: str = "transformer", **kw) -> WorldActionModelConfig:
    base = dict(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=2, games=("A", "B"), core=core)
    if core == "mamba2":
        base["core_options"] = ("headdim=16", "chunk_size=16")
    base.update(kw)
    return WorldActionModelConfig(**base)


def random_batch(b: int, h: int, vocab: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randint(0, vocab, (b, h + 1, 36), generator=g),
                 actions=torch.randint(0, 6, (b, h), generator=g), rewards=torch.randn(b, h, generator=g),
                 terminations=torch.zeros(b, h, dtype=torch.bool), truncations=torch.zeros(b, h, dtype=torch.bool),
                 mask=torch.ones(b, h, dtype=torch.bool), game_ids=torch.arange(b) % 2,
                 legal_actions=torch.arange(18)[None].expand(b, 18) < 6,
                 next_action=torch.randint(0, 6, (b,), generator=g))


@pytest.mark.parametrize("preset,paper", [("jowa-40m", 17.4e6), ("jowa-70m", 50.6e6), ("jowa-150m", 109.1e6)])
def test_paper_presets_match_backbone_plus_heads_size(preset, paper):
    cfg = WorldActionModelConfig.from_preset(preset)
    cfg.games = tuple(f"g{i}" for i in range(15))
    with torch.device("meta"):
        model = WorldActionModel(cfg)
    n = model.count_parameters("backbone+heads")
    assert abs(n / paper - 1) < 0.10, f"{preset}: {n / 1e6:.1f}M vs the paper's {paper / 1e6:.1f}M"
    assert len(model.q_head.heads) == (3 if preset == "jowa-150m" else 1)


def test_unknown_preset_and_core_are_user_errors():
    with pytest.raises(WamError, match="unknown model preset"):
        WorldActionModelConfig.from_preset("huge")
    with pytest.raises(WamError, match="unknown core"):
        WorldActionModel(tiny_cfg(core="lstm"))
    with pytest.raises(WamError, match="KEY=VALUE"):
        WorldActionModel(tiny_cfg(core_options=("window",)))


def test_forward_shapes():
    torch.manual_seed(0)
    cfg = tiny_cfg(q_ensemble=2)
    model = WorldActionModel(cfg)
    batch = random_batch(3, cfg.horizon, cfg.vocab_size)
    out, state = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    length = 37 * cfg.horizon + 36
    assert out.obs_logits.shape == (3, length, 16)
    assert out.reward_logits.shape == (3, 2, 3) and out.termination_logits.shape == (3, 2, 2)
    assert out.q_logits.shape == (3, 3, 2, 18, 51) and out.target_q_logits.shape == (3, 3, 2, 18, 51)
    assert state.pos == length
    torch.testing.assert_close(out.target_q_logits, out.q_logits.detach())  # target starts as a copy
    q = model.q_values(out.q_logits[:, 0], batch.legal_actions)
    assert q.shape == (3, 18) and torch.isinf(q[:, 6:]).all() and torch.isfinite(q[:, :6]).all()


@pytest.mark.parametrize("core", available_cores())
def test_incremental_equals_parallel(core):
    """observe / act / decode_next_obs (core.step) give the parallel forward's outputs, in float64."""
    torch.manual_seed(0)
    cfg = tiny_cfg(core)
    model = WorldActionModel(cfg).double().eval()
    batch = random_batch(2, cfg.horizon, cfg.vocab_size)
    out, _ = model(batch.obs, batch.actions, batch.game_ids)
    state = model.init_state(batch.game_ids)
    for t in range(cfg.horizon):
        q, state = model.observe(batch.obs[:, t], state)
        torch.testing.assert_close(q, out.q_logits[:, t])
        rew, term, first, state = model.act(batch.actions[:, t], state)
        torch.testing.assert_close(rew, out.reward_logits[:, t])
        torch.testing.assert_close(term, out.termination_logits[:, t])
        torch.testing.assert_close(first, out.obs_logits[:, 37 * t + 36])
    # imagine the last frame greedily, token by token, then check it against a parallel pass over it
    tokens, q_img, _ = model.decode_next_obs(first, state)
    assert tokens.shape == (2, 36)
    obs = torch.cat([batch.obs[:, :-1], tokens[:, None]], dim=1)
    out2, _ = model(obs, batch.actions, batch.game_ids)
    torch.testing.assert_close(q_img, out2.q_logits[:, -1])
    last = out2.obs_logits[:, 37 * cfg.horizon: 37 * cfg.horizon + 35].argmax(-1)  # greedy = argmax of parallel
    assert torch.equal(tokens[:, 1:], last)
    # rows of a state can be repeated (beam search): each copy continues like its source row
    beam = state.map_rows(lambda t: t[torch.tensor([1, 0, 1])])
    tokens_b, q_b, _ = model.decode_next_obs(first[[1, 0, 1]], beam)
    assert torch.equal(tokens_b, tokens[[1, 0, 1]])
    torch.testing.assert_close(q_b, q_img[[1, 0, 1]])


@pytest.mark.parametrize("core", available_cores())
def test_one_step_lowers_loss_for_every_core(core):
    torch.manual_seed(0)
    cfg = tiny_cfg(core)
    model = WorldActionModel(cfg)
    batch = random_batch(4, cfg.horizon, cfg.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    loss0, _ = world_action_loss(model, batch, LossConfig())
    loss0.backward()
    opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("core.") for k in changed) and any(k.startswith("q_head.") for k in changed)
    assert not any(k.startswith("target_q_head.") for k in changed)
    with torch.no_grad():
        loss1, _ = world_action_loss(model, batch, LossConfig())
    assert loss1.item() < loss0.item()


def test_context_overflow_is_a_user_error():
    model = WorldActionModel(tiny_cfg())
    batch = random_batch(1, 3, 16)  # one step longer than horizon=2
    with pytest.raises(WamError, match="context"):
        model(batch.obs, batch.actions, batch.game_ids)


def test_add_game_and_freeze():
    torch.manual_seed(0)
    model = WorldActionModel(tiny_cfg())
    old = model.task_obs_embedding.weight.detach().clone()
    idx = model.add_game("Pong")
    assert idx == 2 and model.cfg.games == ("A", "B", "Pong")
    assert torch.equal(model.task_obs_embedding.weight[:2], old)
    torch.testing.assert_close(model.task_obs_embedding.weight[2], old.mean(0))
    assert model.add_game("A") == 0 and model.cfg.games == ("A", "B", "Pong")
    model.freeze(("core", "embeddings"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("core.", "obs_embedding", "pos_embedding")) for n in trainable)
    assert "task_obs_embedding.weight" in trainable and any(n.startswith("q_head.") for n in trainable)
    with pytest.raises(WamError, match="cannot freeze"):
        model.freeze(("everything",))


@pytest.mark.parametrize("preset,q_init", [("debug", 0.0), ("small", 0.0), ("jowa-40m", 0.0), ("debug", 3.5),
                                           ("debug", -2.0)])
def test_q_head_starts_at_its_configured_expectation(preset, q_init):
    """On random input every action's initial E[Q] (online and target head) lies within 0.5 of `q_init`
    (not at the support's midpoint, 10 on [-10, 30])."""
    cfg = WorldActionModelConfig.from_preset(preset)
    cfg = dataclasses.replace(cfg, games=("A", "B"), q_init=q_init, vocab_size=64)
    torch.manual_seed(0)
    model = WorldActionModel(cfg)
    batch = random_batch(4, cfg.horizon, cfg.vocab_size, seed=1)
    out, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    for logits in (out.q_logits, out.target_q_logits):
        q = model.expected_q(logits)  # [B, H+1, E, 18]
        assert (q - q_init).abs().max() < 0.5, f"initial E[Q] spans {q.min():.2f}..{q.max():.2f}, target {q_init}"


def test_recalibrate_q_restarts_the_output_layer_only():
    """A model whose Q head drifted (here: output bias pushed to E[Q] ~ 25) reads E[Q] within 0.5 of q_init again
    after recalibrate_q, online and target alike; the trunk and the head's hidden layers are untouched."""
    cfg = dataclasses.replace(WorldActionModelConfig.from_preset("debug"), games=("A", "B"), vocab_size=64)
    torch.manual_seed(0)
    model = WorldActionModel(cfg)
    support = torch.linspace(cfg.v_min, cfg.v_max, cfg.n_atoms)
    model.q_head.calibrate(support, 25.0)
    model.update_target(1.0)
    batch = random_batch(4, cfg.horizon, cfg.vocab_size, seed=1)
    out, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    assert (model.expected_q(out.q_logits) - 25.0).abs().max() < 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.recalibrate_q()
    out, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    for logits in (out.q_logits, out.target_q_logits):
        assert (model.expected_q(logits) - cfg.q_init).abs().max() < 0.5
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("q_head.", "target_q_head.")) for k in changed)
    last = len(model.q_head.heads[0].net) - 1
    assert all(f".net.{last}." in k for k in changed), f"only the output layers change: {sorted(changed)}"


def test_initialisation_scales_with_the_width():
    """`scaled` (debug/small): embeddings N(0, 1/sqrt(d)), the transformer's linear layers Xavier-uniform (its
    residual projections / sqrt(2 n_layers)); `gpt2` (paper presets): N(0, 0.02) whatever the width."""
    for d in (64, 256):
        torch.manual_seed(0)
        model = WorldActionModel(tiny_cfg(d_model=d, n_heads=4, n_layers=2))
        assert model.obs_embedding.weight.std().item() == pytest.approx(d ** -0.5, rel=0.1)
        block = model.core.h[0]
        assert block.attn.c_attn.weight.std().item() == pytest.approx((2 / (d + 3 * d)) ** 0.5, rel=0.1)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx((2 / (5 * d)) ** 0.5 / 2, rel=0.1)
        gpt2 = WorldActionModel(tiny_cfg(d_model=d, n_heads=4, n_layers=2, init="gpt2"))
        assert gpt2.obs_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert gpt2.core.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(WorldActionModelConfig.from_preset(p).init == "gpt2" for p in ("jowa-40m", "jowa-70m", "jowa-150m"))
    assert all(WorldActionModelConfig.from_preset(p).init == "scaled" for p in ("debug", "small"))
    with pytest.raises(WamError, match="init must be one of"):
        WorldActionModel(tiny_cfg(init="xavier"))
