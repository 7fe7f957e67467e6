"""Losses of the world-action model on tiny hand-checked cases: C51 projection, TD, CQL, masks, labels."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.worldmodel.losses import (
    LossConfig,
    WorldActionObjective,
    cql_loss,
    obs_token_labels,
    td_loss,
    world_action_loss,
    world_model_loss,
)
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig, WorldActionOutput
from wam.worldmodel.targets import c51_project, nstep_returns

SUPPORT = torch.linspace(-10.0, 30.0, 51)  # dz = 0.8



def tiny_model(**kw) -> WorldActionModel:
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=2, games=("A", "B"), **kw)
    return WorldActionModel(cfg)


def make_batch(b: int = 2, h: int = 2, vocab: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randint(0, vocab, (b, h + 1, 36), generator=g),
                 actions=torch.randint(0, 4, (b, h), generator=g), rewards=torch.randn(b, h, generator=g),
                 terminations=torch.zeros(b, h, dtype=torch.bool), truncations=torch.zeros(b, h, dtype=torch.bool),
                 mask=torch.ones(b, h, dtype=torch.bool), game_ids=torch.arange(b) % 2,
                 legal_actions=torch.arange(18)[None].expand(b, 18) < 4,
                 next_action=torch.randint(0, 4, (b,), generator=g))


def brute_force_projection(p: torch.Tensor, r: float, disc: float, z: torch.Tensor) -> torch.Tensor:
    """Textbook C51 projection, one atom at a time."""
    a = len(z)
    v_min, v_max = float(z[0]), float(z[-1])
    dz = (v_max - v_min) / (a - 1)
    m = [0.0] * a
    for j in range(a):
        tz = min(max(r + disc * float(z[j]), v_min), v_max)
        bj = (tz - v_min) / dz
        lo, hi = math.floor(bj), math.ceil(bj)
        if lo == hi:
            m[lo] += float(p[j])
        else:
            m[lo] += float(p[j]) * (hi - bj)
            m[hi] += float(p[j]) * (bj - lo)
    return torch.tensor(m, dtype=torch.float64)


def test_c51_projection_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    z = SUPPORT.double()
    probs = torch.rand(6, 51, generator=g, dtype=torch.float64).softmax(-1)
    # on-atom shift (0.8 = one atom, gamma 1), clipping at both ends, a terminal row, a generic case
    rewards = torch.tensor([0.8, 50.0, -50.0, 1.0, 0.37, -2.3], dtype=torch.float64)
    discounts = torch.tensor([1.0, 0.99, 0.99, 0.0, 0.99, 0.5], dtype=torch.float64)
    got = c51_project(probs, rewards, discounts, z)
    for i in range(6):
        want = brute_force_projection(probs[i], float(rewards[i]), float(discounts[i]), z)
        torch.testing.assert_close(got[i], want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(6, dtype=torch.float64))
    # terminal row: all mass on the atoms around r = 1.0 (between atoms 13 (0.4) and 14 (1.2))
    assert got[3, 13] == pytest.approx(0.25) and got[3, 14] == pytest.approx(0.75)


def _delta_logits(atom_per_action: list[int], b: int = 1, h: int = 1, e: int = 1) -> torch.Tensor:
    """q_logits [B, h, E, 18, 51] that put (almost) all mass on one atom per action."""
    logits = torch.full((b, h, e, 18, 51), -1e4)
    for act, atom in enumerate(atom_per_action):
        logits[..., act, atom] = 0.0
    return logits


def _output(q_logits: torch.Tensor, target: torch.Tensor | None = None) -> WorldActionOutput:
    b, t = q_logits.shape[:2]
    return WorldActionOutput(obs_logits=torch.zeros(b, 1, 16), reward_logits=torch.zeros(b, t - 1, 3),
                             termination_logits=torch.zeros(b, t - 1, 2), q_logits=q_logits,
                             target_q_logits=target)


def test_cql_value_hand_checked():
    model = tiny_model()
    # frame 0: actions 0, 1 legal with Q = 1.2 (atom 14) and 2.0 (atom 15); illegal action 2 has Q = 30
    q = _delta_logits([14, 15, 50] + [12] * 15, h=2)
    batch = make_batch(b=1, h=1)
    batch.actions[:] = 0
    batch.legal_actions[:] = False
    batch.legal_actions[0, :2] = True
    loss, logs = cql_loss(model, _output(q), batch)
    want = math.log(math.exp(1.2) + math.exp(2.0)) - 1.2
    assert loss.item() == pytest.approx(want, abs=1e-4)
    assert logs["cql_loss"] == pytest.approx(want, abs=1e-4)


def test_td_target_hand_checked_and_termination_cut():
    model = tiny_model()
    cfg = LossConfig(gamma=0.5)
    batch = make_batch(b=2, h=1)
    batch.actions[:] = 1
    batch.rewards[:] = torch.tensor([[2.5], [-0.1]])  # sign transform: +1, -1
    batch.terminations[:] = torch.tensor([[False], [True]])
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    online = torch.zeros(2, 2, 1, 18, 51)  # uniform online distributions
    # target at frame 1: legal action 2 is best (Q = 3.6, atom 17); illegal action 5 would be 30
    target = _delta_logits([12, 13, 17, 12, 12, 50] + [12] * 12, b=2, h=2)
    loss, _ = td_loss(model, _output(online, target), batch, cfg)
    # online is uniform, so CE = -log(1/51) whatever the target
    assert loss.item() == pytest.approx(math.log(51), abs=1e-5)
    # row 0: 1 + 0.5 * 3.6 = 2.8 = atom 16 exactly; row 1 is terminal: -1 lies at b = 11.25 -> 0.75 on atom 11,
    # 0.25 on atom 12 (no bootstrap). Online mass split 0.5 / 0.5 over atoms 16/17 and 11/12: CE = log 2 per row.
    online2 = torch.full((2, 2, 1, 18, 51), -30.0)
    online2[0, 0, 0, 1, 16] = online2[0, 0, 0, 1, 17] = 0.0
    online2[1, 0, 0, 1, 11] = online2[1, 0, 0, 1, 12] = 0.0
    loss2, _ = td_loss(model, _output(online2, target), batch, cfg)
    assert loss2.item() == pytest.approx(math.log(2.0), abs=1e-4)
    # online equal to the targets: CE = the targets' entropies (0 for row 0, H(0.75, 0.25) for row 1)
    online3 = torch.full((2, 2, 1, 18, 51), -30.0)
    online3[0, 0, 0, 1, 16] = 0.0
    online3[1, 0, 0, 1, 11], online3[1, 0, 0, 1, 12] = math.log(0.75), math.log(0.25)
    loss3, _ = td_loss(model, _output(online3, target), batch, cfg)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss3.item() == pytest.approx(entropy / 2, abs=1e-4)
    # without the termination, row 1 bootstraps: -1 + 0.5 * 3.6 = 0.8 -> atom 13.5, so the loss changes
    batch.terminations[:] = False
    assert td_loss(model, _output(online3, target), batch, cfg)[0].item() > loss3.item() + 1.0


def test_mixed_monte_carlo_target_hand_checked():
    """mc_mix = beta mixes the TD target with a point mass at the step's Monte-Carlo return where it is known."""
    model = tiny_model()
    batch = make_batch(b=2, h=1)
    batch.actions[:] = 1
    batch.rewards[:] = torch.tensor([[2.5], [-0.1]])
    batch.terminations[:] = torch.tensor([[False], [True]])
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    target = _delta_logits([12, 13, 17, 12, 12, 50] + [12] * 12, b=2, h=2)
    online = torch.zeros(2, 2, 1, 18, 51)
    # TD targets (see above): row 0 = 2.8 (atom 16), row 1 = -1 (0.75 atom 11, 0.25 atom 12)
    batch.mc_return = torch.tensor([[0.0], [float("nan")]])  # row 0: G = 0 at atom 12.5; row 1: unknown
    _, logs = td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5, mc_mix=0.5))
    assert logs["td_target_mean"] == pytest.approx(((0.5 * 2.8 + 0.5 * 0.0) + -1.0) / 2, abs=1e-4)
    # online equal to the mixed target: the loss is the targets' entropies
    online2 = torch.full((2, 2, 1, 18, 51), -30.0)
    online2[0, 0, 0, 1, 16], online2[0, 0, 0, 1, 12], online2[0, 0, 0, 1, 13] = (math.log(0.5), math.log(0.25),
                                                                               math.log(0.25))
    online2[1, 0, 0, 1, 11], online2[1, 0, 0, 1, 12] = math.log(0.75), math.log(0.25)
    loss, _ = td_loss(model, _output(online2, target), batch, LossConfig(gamma=0.5, mc_mix=0.5))
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert loss.item() == pytest.approx((h0 + h1) / 2, abs=1e-4)
    # beta = 1: the known step's target is the return alone
    _, logs = td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5, mc_mix=1.0))
    assert logs["td_target_mean"] == pytest.approx((0.0 + -1.0) / 2, abs=1e-4)
    batch.mc_return = None
    with pytest.raises(WamError, match="Monte-Carlo return"):
        td_loss(model, _output(online, target), batch, LossConfig(mc_mix=0.5))
    with pytest.raises(WamError, match="--mc-mix must lie"):
        WorldActionObjective(model, LossConfig(mc_mix=1.5))


def test_masks_hold_padding_and_illegal_actions():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch(b=2, h=2)
    batch.mask[1, 1] = False  # padded last step of row 1
    q = torch.randn(2, 3, 1, 18, 51, requires_grad=True)
    tgt = torch.randn(2, 3, 1, 18, 51)
    out = _output(q, tgt)
    td, _ = td_loss(model, out, batch, LossConfig())
    cql, _ = cql_loss(model, out, batch)
    (td + cql).backward()
    illegal = ~batch.legal_actions  # actions 4..17
    assert q.grad[:, :2][illegal[:, None, None, :].expand(2, 2, 1, 18)].abs().max() == 0
    assert q.grad[1, 1].abs().max() == 0, "a padded step must not receive gradient"
    assert q.grad[0, 1].abs().max() > 0
    # changing the padded step's data, or the target's values at illegal actions, leaves the losses unchanged
    b2 = batch.clone()
    b2.rewards[1, 1], b2.actions[1, 1], b2.terminations[1, 1] = 99.0, 3, True
    tgt2 = tgt.clone()
    tgt2[..., 4:, :] = torch.randn_like(tgt2[..., 4:, :]) * 10
    out2 = _output(q, tgt2)
    assert td_loss(model, out2, b2, LossConfig())[0].item() == pytest.approx(td.item(), abs=1e-6)
    assert cql_loss(model, out2, b2)[0].item() == pytest.approx(cql.item(), abs=1e-6)


def test_obs_token_labels_layout():
    obs = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # B=1, H=2, K=2: sequence 1 2 a 3 4 a 5 6
    mask = torch.tensor([[True, True]])
    labels = obs_token_labels(obs, mask)
    assert labels.tolist() == [[2, -100, 3, 4, -100, 5, 6, -100]]
    labels = obs_token_labels(obs, torch.tensor([[True, False]]))  # frame 2 lies past the episode
    assert labels.tolist() == [[2, -100, 3, 4, -100, -100, -100, -100]]


def test_world_model_loss_ignores_padding():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch(b=2, h=2)
    batch.mask[0, 1] = False
    out, _ = model(batch.obs, batch.actions, batch.game_ids)
    loss, logs = world_model_loss(out, batch)
    b2 = batch.clone()
    b2.rewards[0, 1], b2.terminations[0, 1] = -5.0, True
    b2.obs[0, 2] = (b2.obs[0, 2] + 1) % 16  # the frame after the padded step
    loss2, _ = world_model_loss(out, b2)  # same logits, different labels at padded places only
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert logs["obs_ce"] == pytest.approx(math.log(16), abs=0.1)  # an untrained model is near uniform


def test_joint_loss_gradient_reaches_core_through_td():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch()
    cfg = LossConfig(lambda_wm=0.0, lambda_cql=0.0)  # TD alone
    loss, logs = world_action_loss(model, batch, cfg)
    loss.backward()
    core_grad = sum(p.grad.abs().sum().item() for p in model.core.parameters() if p.grad is not None)
    assert core_grad > 0, "TD gradients must flow into the core"
    assert all(p.grad is None for p in model.target_q_head.parameters())
    # lambda_wm = 0 is the "no WM loss" objective: the world-model heads are not even run
    assert all(p.grad is None for p in model.obs_head.parameters())
    assert set(logs) >= {"loss", "td_loss", "cql_loss"} and "obs_ce" not in logs
    _, logs = world_action_loss(model, batch, LossConfig())
    assert set(logs) >= {"loss", "obs_ce", "reward_ce", "termination_ce", "td_loss", "cql_loss"}


def test_illegal_data_action_never_enters_q_losses():
    model = tiny_model()
    batch = make_batch(b=2, h=2)
    q = torch.randn(2, 3, 1, 18, 51, requires_grad=True)
    out = _output(q, torch.randn(2, 3, 1, 18, 51))
    batch.actions[0, 0] = 9  # not in the legal set (0..3): bad data
    td, _ = td_loss(model, out, batch, LossConfig())
    cql, logs = cql_loss(model, out, batch)
    (td + cql).backward()
    assert q.grad[0, 0].abs().max() == 0
    assert logs["illegal_data_actions"] == pytest.approx(0.25)


def _nstep_by_hand(r, term, trunc, mask, gamma, n):
    """Loop version of the n-step return of every step of one segment (lists of length H)."""
    h = len(r)
    out = []
    for t in range(h):
        g, scale, end, dead = 0.0, 1.0, t, False
        for j in range(n):
            i = t + j
            if i >= h or not mask[i]:
                break
            g += scale * r[i]
            scale *= gamma
            end = i
            if term[i]:
                dead = True
                break
            if trunc[i]:
                break
        out.append((g, 0.0 if dead else scale, end + 1))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_nstep_returns_match_a_loop(n):
    g = torch.Generator().manual_seed(n)
    b, h, gamma = 6, 5, 0.9
    r = torch.randint(-1, 2, (b, h), generator=g).double()
    term = torch.zeros(b, h, dtype=torch.bool)
    trunc = torch.zeros(b, h, dtype=torch.bool)
    mask = torch.ones(b, h, dtype=torch.bool)
    term[1, 2] = True
    mask[1, 3:] = False  # the episode ended at step 2
    trunc[2, 1] = True
    mask[2, 2:] = False  # cut by a cap after step 1
    mask[3, 4:] = False  # the data ends without a flag
    term[4, 4] = True  # terminal on the segment's last step
    ret, disc, boot = nstep_returns(r, term, trunc, mask, gamma, n)
    for i in range(b):
        want = _nstep_by_hand(r[i].tolist(), term[i].tolist(), trunc[i].tolist(), mask[i].tolist(), gamma, n)
        for t, (gw, dw, ew) in enumerate(want):
            if not mask[i, t]:
                continue  # padded steps never enter a loss
            assert ret[i, t].item() == pytest.approx(gw, abs=1e-12), (i, t)
            assert disc[i, t].item() == pytest.approx(dw, abs=1e-12), (i, t)
            assert boot[i, t].item() == ew, (i, t)
    if n == 1:  # the 1-step target: (r_t, gamma * (1 - term_t), t + 1)
        torch.testing.assert_close(ret[mask], r[mask])
        torch.testing.assert_close(disc[mask], (gamma * (~term).double())[mask])
    assert boot.min() >= 1 and boot.max() <= h


def test_nstep_td_target_hand_checked():
    """2-step target of step 0: r0 + g r1 + g^2 * Q(frame 2); step 1 (last) bootstraps after 1 step."""
    model = tiny_model()
    batch = make_batch(b=1, h=2)
    batch.actions[:] = 1
    batch.rewards[:] = torch.tensor([[1.0, 1.0]])
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    # target head: frame 1 best Q = 0.4 (atom 13), frame 2 best Q = 4.4 (atom 18)
    target = torch.full((1, 3, 1, 18, 51), -1e4)
    target[0, 1, 0, :, 13] = 0.0
    target[0, 2, 0, :, 18] = 0.0
    cfg = LossConfig(gamma=0.5, n_step=2)
    # step 0: 1 + 0.5 + 0.25 * 4.4 = 2.6 (atom 15.75); step 1: 1 + 0.5 * 4.4 = 3.2 (atom 16.5)
    online = torch.full((1, 3, 1, 18, 51), -30.0)
    online[0, 0, 0, 1, 15], online[0, 0, 0, 1, 16] = math.log(0.25), math.log(0.75)
    online[0, 1, 0, 1, 16] = online[0, 1, 0, 1, 17] = math.log(0.5)
    loss, _ = td_loss(model, _output(online, target), batch, cfg)
    ent = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert loss.item() == pytest.approx((ent + math.log(2.0)) / 2, abs=1e-4)
    # 1-step: step 0 targets 1 + 0.5 * 0.4 = 1.2 instead, so the same online logits fit worse
    assert td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5))[0].item() > loss.item() + 1.0


def test_double_q_lets_the_online_head_pick_the_action():
    model = tiny_model()
    batch = make_batch(b=1, h=1)
    batch.actions[:] = 0
    batch.rewards[:] = 0.0
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    # frame 1: the target head values action 1 at 3.6 (atom 17) and action 2 at 0.4 (atom 13); the online
    # head prefers action 2. Double DQN bootstraps 0.5 * 0.4 = 0.2 (atom 12.75), plain DQN 0.5 * 3.6 = 1.8.
    target = _delta_logits([12, 17, 13] + [12] * 15, h=2)
    online = _delta_logits([12, 13, 17] + [12] * 15, h=2)
    online[0, 0, 0, 0] = -30.0
    online[0, 0, 0, 0, 12], online[0, 0, 0, 0, 13] = math.log(0.25), math.log(0.75)  # = the double target
    double, _ = td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5, double_q=True))
    assert double.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-4)
    plain, _ = td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5))
    assert plain.item() > 10.0  # its target (atoms 14/15) has no online mass


def test_in_sample_bootstrap_reads_the_data_action_hand_checked():
    """bootstrap="data": step t bootstraps from Q(o_{t+1}, a_{t+1}) (a_H = batch.next_action); where the frame has
    no legal data action it falls back to the max."""
    model = tiny_model()
    batch = make_batch(b=1, h=2)
    batch.rewards[:] = 0.0
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    batch.actions[:] = torch.tensor([[0, 2]])
    batch.next_action[:] = 1
    # target head: frame 1 values actions (0, 1, 2) at (-0.4, 3.6, 0.4); frame 2 at (6.0, 2.0, 6.0); gamma 0.5
    target = torch.cat([_delta_logits([12] * 18), _delta_logits([12, 17, 13] + [12] * 15),
                        _delta_logits([20, 15, 20] + [12] * 15)], 1)
    online = _delta_logits([12] * 18, h=3)

    def mean_target(**kw) -> float:
        return td_loss(model, _output(online, target), batch, LossConfig(gamma=0.5, **kw))[1]["td_target_mean"]

    assert mean_target(bootstrap="data") == pytest.approx((0.5 * 0.4 + 0.5 * 2.0) / 2, abs=1e-3)
    assert mean_target() == pytest.approx((0.5 * 3.6 + 0.5 * 6.0) / 2, abs=1e-3)
    batch.next_action[:] = -1  # o_H has no action (the episode's truncated last frame): the max
    assert mean_target(bootstrap="data") == pytest.approx((0.5 * 0.4 + 0.5 * 6.0) / 2, abs=1e-3)
    batch.actions[0, 1] = 5  # an illegal data action at frame 1: step 0 takes the max there (step 1 leaves the loss)
    assert mean_target(bootstrap="data") == pytest.approx(0.5 * 3.6, abs=1e-3)
    with pytest.raises(WamError, match="--bootstrap"):
        WorldActionObjective(model, LossConfig(bootstrap="sarsa"))  # type: ignore[arg-type]


def test_target_head_schedules_hard_and_polyak():
    from wam.worldmodel.losses import WorldActionObjective

    def perturbed():
        torch.manual_seed(0)
        model = tiny_model()
        with torch.no_grad():
            for p in model.q_head.parameters():
                p.add_(1.0)  # online head moved away from the target by exactly 1 everywhere
        return model

    def gap(model):
        return [(o - t).detach() for o, t in zip(model.q_head.parameters(), model.target_q_head.parameters())]

    model = perturbed()
    hard = WorldActionObjective(model, LossConfig(target_update_every=3))
    hard.after_step(1)
    hard.after_step(2)
    assert all(torch.allclose(g, torch.ones_like(g)) for g in gap(model)), "no hard update before step 3"
    hard.after_step(3)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gap(model))
    model = perturbed()
    soft = WorldActionObjective(model, LossConfig(target_tau=0.25, target_update_every=1))
    soft.after_step(1)  # every step, whatever target_update_every says
    assert all(torch.allclose(g, torch.full_like(g, 0.75)) for g in gap(model))
    soft.after_step(2)
    assert all(torch.allclose(g, torch.full_like(g, 0.75 ** 2)) for g in gap(model))
    with pytest.raises(WamError, match="target-tau"):
        WorldActionObjective(tiny_model(), LossConfig(target_tau=1.5))


def test_td_target_statistics_hand_checked():
    model = tiny_model()
    batch = make_batch(b=2, h=1)
    batch.actions[:] = 1
    batch.rewards[:] = torch.tensor([[2.5], [-0.1]])  # sign: +1, -1
    batch.terminations[:] = torch.tensor([[False], [True]])
    batch.legal_actions[:] = False
    batch.legal_actions[:, :3] = True
    target = _delta_logits([12, 13, 17, 12, 12, 50] + [12] * 12, b=2, h=2)  # best legal next Q 3.6
    _, logs = td_loss(model, _output(torch.zeros(2, 2, 1, 18, 51), target), batch, LossConfig(gamma=0.5))
    # targets: row 0: 1 + 0.5 * 3.6 = 2.8; row 1 terminal: -1
    assert logs["td_target_mean"] == pytest.approx(0.9, abs=1e-4)
    assert logs["td_target_std"] == pytest.approx(1.9, abs=1e-4)
    assert logs["td_target_max"] == pytest.approx(2.8, abs=1e-4)
    assert logs["q_next_max"] == pytest.approx(3.6, abs=1e-4), "only the bootstrapping row counts"


def test_frequent_action_gap_hand_checked():
    from wam.worldmodel.losses import frequent_action_gap

    batch = make_batch(b=3, h=2)
    batch.game_ids[:] = torch.tensor([0, 0, 1])
    batch.actions[:] = torch.tensor([[3, 3], [3, 1], [2, 0]])  # game 0: action 3 most frequent; game 1: tie -> 0
    batch.legal_actions[:] = False
    batch.legal_actions[:, :4] = True
    q = torch.zeros(3, 2, 18)
    q[:2, :, 3] = 2.0  # game 0: Q(3) = 2, the other legal actions 0 -> gap 2
    q[:2, :, 0] = 0.9  # ... now the others average 0.3 -> gap 1.7
    q[2, :, 0] = -1.0  # game 1: Q(0) = -1, others 0 -> gap -1
    q[:, :, 10] = 99.0  # illegal actions never count
    steps = torch.ones(3, 2, dtype=torch.bool)
    assert frequent_action_gap(q, batch, steps) == pytest.approx((4 * 1.7 + 2 * -1.0) / 6, abs=1e-5)
    steps[2] = False
    assert frequent_action_gap(q, batch, steps) == pytest.approx(1.7, abs=1e-5)


def test_critic_warmup_trains_the_world_model_only_then_the_critic():
    from wam.worldmodel.losses import WorldActionObjective

    torch.manual_seed(0)
    model = tiny_model()
    objective = WorldActionObjective(model, LossConfig(critic_warmup_steps=2, target_update_every=5))
    batch = make_batch(b=2, h=2)

    def grads():
        model.zero_grad()
        loss, _ = objective(batch)
        loss.backward()
        q = sum(p.grad.abs().sum().item() for p in model.q_head.parameters() if p.grad is not None)
        wm = sum(p.grad.abs().sum().item() for p in model.obs_head.parameters() if p.grad is not None)
        return q, wm

    q, wm = grads()
    assert q == 0 and wm > 0, "warm-up: the Q head gets no gradient, the world model does"
    with torch.no_grad():
        for p in model.q_head.parameters():
            p.add_(0.5)
    objective.after_step(1)
    assert all(torch.equal(a, b) for a, b in zip(model.q_head.parameters(), model.target_q_head.parameters()))
    objective.after_step(2)  # the critic starts now, from a target equal to the Q head
    q, _ = grads()
    assert q > 0
    with torch.no_grad():
        for p in model.q_head.parameters():
            p.add_(0.5)
    for step in (3, 4, 5, 6):  # hard copies every 5 steps counted from the warm-up's end: at step 7
        objective.after_step(step)
    assert not torch.equal(next(model.q_head.parameters()), next(model.target_q_head.parameters()))
    objective.after_step(7)
    assert torch.equal(next(model.q_head.parameters()), next(model.target_q_head.parameters()))
    fresh = WorldActionObjective(model, LossConfig(critic_warmup_steps=2))
    assert not fresh.critic_trains
    fresh.resume_at(2)  # what the trainer calls when it resumes a checkpoint
    assert fresh.critic_trains


def test_behaviour_prior_head_loss_and_acting_values_hand_checked():
    """behaviour_prior tau: a prior head gives [B, T, 18] logits, its loss is the data action's cross-entropy over the
    legal actions, and acting values are E[Q] + tau * log pi_b over the legal ones."""
    from wam.worldmodel.losses import prior_loss

    model = tiny_model(behaviour_prior=0.5)
    batch = make_batch(b=2, h=2)
    out, _ = model(batch.obs, batch.actions, batch.game_ids)
    assert out.prior_logits is not None and out.prior_logits.shape == (2, 3, 18)
    assert tiny_model()(batch.obs, batch.actions, batch.game_ids)[0].prior_logits is None  # tau 0: no head
    logits = torch.zeros(2, 3, 18)
    logits[..., 1] = math.log(3.0)  # legal actions 0..3: pi_b = (1, 3, 1, 1) / 6
    out.prior_logits = logits.requires_grad_()
    batch.actions[:] = 1
    loss, logs = prior_loss(out, batch)
    assert loss.item() == pytest.approx(-math.log(3 / 6), abs=1e-5) and logs["prior_acc"] == 1.0
    loss.backward()
    assert out.prior_logits.grad[..., 4:].abs().max() == 0  # illegal actions get no gradient
    q = _delta_logits([14, 15, 12, 12] + [12] * 14)[:, 0]  # E[Q] = 1.2, 2.0, -0.4, -0.4 on the legal actions
    legal = batch.legal_actions[:1]
    want = torch.tensor([1.2, 2.0, -0.4, -0.4]) + 0.5 * torch.log(torch.tensor([1, 3, 1, 1]) / 6.0)
    got = model.acting_values(q, legal, logits[:1, 0])
    torch.testing.assert_close(got[0, :4], want, atol=1e-4, rtol=0)
    assert torch.isinf(got[0, 4:]).all() and torch.equal(model.acting_values(q, legal), model.q_values(q, legal))
    # the support filter keeps the actions with pi_b >= threshold * max pi_b: at 0.3 all four (1/3 >= 0.3),
    # at 0.5 only action 1, although action 0 has more Q than action 2 and 3
    model.cfg = dataclasses.replace(model.cfg, support_threshold=0.3)
    torch.testing.assert_close(model.acting_values(q, legal, logits[:1, 0])[0, :4], want, atol=1e-4, rtol=0)
    model.cfg = dataclasses.replace(model.cfg, support_threshold=0.5)
    got = model.acting_values(q, legal, logits[:1, 0])
    assert torch.isinf(got[0, [0, 2, 3]]).all() and got[0, 1].item() == pytest.approx(want[1].item(), abs=1e-4)
    assert got.argmax(-1).item() == 1
    with pytest.raises(WamError, match=r"support_threshold must lie in \[0, 1\], got 1.5"):
        dataclasses.replace(model.cfg, support_threshold=1.5)  # an acting-time override is checked too
    total, logs = world_action_loss(model, batch, LossConfig())
    assert "prior_ce" in logs and torch.isfinite(total)
