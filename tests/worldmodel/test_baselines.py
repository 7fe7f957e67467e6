"""Baseline objectives and distillation: behaviour cloning through `q_values`, the "no WM loss" ablation,
and the distillation term toward planner-corrected Q."""

from __future__ import annotations

import math

import pytest
import torch

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.worldmodel.losses import (
    LossConfig,
    QTargetBatch,
    WorldActionObjective,
    bc_loss,
    distill_loss,
    objective_name,
    world_action_loss,
)
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig, WorldActionOutput
from wam.worldmodel.synthetic import SyntheticTokenSource
from wam.worldmodel.trainer import Trainer, TrainerConfig


def tiny_model(**kw) -> WorldActionModel:
    base = dict(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=2, games=("A", "B"))
    base.update(kw)
    return WorldActionModel(WorldActionModelConfig(**base))


def make_batch(b: int = 4, h: int = 2, n_legal: int = 5, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(obs=torch.randint(0, 16, (b, h + 1, 36), generator=g),
                 actions=torch.randint(0, n_legal, (b, h), generator=g), rewards=torch.randn(b, h, generator=g),
                 terminations=torch.zeros(b, h, dtype=torch.bool), truncations=torch.zeros(b, h, dtype=torch.bool),
                 mask=torch.ones(b, h, dtype=torch.bool), game_ids=torch.arange(b) % 2,
                 legal_actions=torch.arange(18)[None].expand(b, 18) < n_legal,
                 next_action=torch.randint(0, n_legal, (b,), generator=g))


def _delta_output(atoms: list[int]) -> WorldActionOutput:
    """One step (B=1, T=2 frames), one ensemble member, all mass of action a on atom atoms[a]."""
    q = torch.full((1, 2, 1, 18, 51), -1e4)
    for a, atom in enumerate(atoms):
        q[..., a, atom] = 0.0
    return WorldActionOutput(obs_logits=None, reward_logits=None, termination_logits=None, q_logits=q,
                             target_q_logits=None)


def test_objective_names():
    assert objective_name(LossConfig()) == "jowa"
    assert objective_name(LossConfig(lambda_wm=0.0)) == "q-only"
    assert objective_name(LossConfig(objective="q-only")) == "q-only"
    assert objective_name(LossConfig(objective="bc")) == "bc"
    with pytest.raises(WamError, match="unknown objective"):
        objective_name(LossConfig(objective="dqn"))  # type: ignore[arg-type]


def test_bc_loss_hand_checked_and_legal_mask():
    model = tiny_model()
    # expected Q: action 0 -> atom 14 (1.2), action 1 -> atom 15 (2.0), action 2 -> atom 50 (30, illegal)
    out = _delta_output([14, 15, 50] + [12] * 15)
    batch = make_batch(b=1, h=1)
    batch.actions[:] = 0
    batch.legal_actions[:] = False
    batch.legal_actions[0, :2] = True
    loss, logs = bc_loss(model, out, batch)
    want = math.log(math.exp(1.2) + math.exp(2.0)) - 1.2  # softmax over the legal actions 0, 1 only
    assert loss.item() == pytest.approx(want, abs=1e-4)
    assert logs["bc_acc"] == 0.0  # the legal argmax is action 1 (the illegal action 2 is ignored)
    batch.actions[:] = 1
    assert bc_loss(model, out, batch)[1]["bc_acc"] == 1.0
    # a data action outside the legal set (bad data) never enters the loss, and its gradient is zero
    q = torch.randn(1, 2, 1, 18, 51, requires_grad=True)
    batch.actions[:] = 7
    out2 = WorldActionOutput(None, None, None, q, None)
    loss, logs = bc_loss(model, out2, batch)
    loss.backward()
    assert loss.item() == 0.0 and logs["illegal_data_actions"] == 1.0 and q.grad.abs().max() == 0


def test_bc_gradient_never_reaches_illegal_actions():
    model = tiny_model()
    batch = make_batch(b=2, h=2, n_legal=4)
    q = torch.randn(2, 3, 1, 18, 51, requires_grad=True)
    loss, _ = bc_loss(model, WorldActionOutput(None, None, None, q, None), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert q.grad[:, :2, :, 4:].abs().max() == 0 and q.grad[:, :2, :, :4].abs().max() > 0
    assert q.grad[:, 2].abs().max() == 0  # the last frame has no action to clone


def test_bc_overfits_a_tiny_batch_through_q_values():
    """After BC training, argmax over legal actions of `q_values` (what the agent acts on) is the data action."""
    torch.manual_seed(0)
    model = tiny_model(d_model=48)
    source = SyntheticTokenSource(batch_size=8, horizon=2, vocab_size=16, games=("A", "B"), num_segments=4, n_legal=5)
    objective = WorldActionObjective(model, LossConfig(objective="bc"))
    wm_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("obs_head", "reward_head"))}
    trainer = Trainer(objective, source, TrainerConfig(steps=80, lr=3e-3, min_lr=1e-3, warmup_steps=5, log_every=20,
                                                       progress=False))
    logs = trainer.fit().last_logs
    assert logs["bc_acc"] == 1.0 and logs["bc_loss"] < 0.1, logs
    assert "td_loss" not in logs and "obs_ce" not in logs
    batch = source.sample()
    model.eval()
    with torch.no_grad():
        out, _ = model(batch.obs, batch.actions, batch.game_ids, world_model=False)
        legal = batch.legal_actions[:, None].expand(-1, 2, -1).flatten(0, 1)
        q = model.q_values(out.q_logits[:, :2].flatten(0, 1), legal)  # [B*H, 18]
    assert torch.equal(q.argmax(-1), batch.actions.flatten())
    assert torch.isinf(q[:, 5:]).all()
    # the world-model heads were frozen: untouched by the optimiser (no gradient, no weight decay)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in wm_before.items())


def test_q_only_trains_q_and_core_but_not_the_world_model_heads():
    torch.manual_seed(0)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = SyntheticTokenSource(batch_size=4, horizon=2, vocab_size=16, games=("A", "B"), n_legal=6)
    objective = WorldActionObjective(model, LossConfig(lambda_wm=0.0))  # == --objective q-only
    assert objective.objective == "q-only" and not objective.uses_world_model
    trainer = Trainer(objective, source, TrainerConfig(steps=2, lr=1e-3, warmup_steps=0, log_every=1, progress=False))
    logs = trainer.fit().last_logs
    assert {"td_loss", "cql_loss", "lr", "tokens_per_s"} <= set(logs) and "wm_loss" not in logs
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"core", "q_head"} <= changed
    assert not changed & {"obs_head", "reward_head", "termination_head", "target_q_head"}, changed
    assert model.flops_per_token(world_model=False) < model.flops_per_token()


def _q_target_batch(batch: Batch, values: torch.Tensor, mask: torch.Tensor) -> QTargetBatch:
    return QTargetBatch(**vars(batch), q_target=values, q_target_mask=mask)


def test_distillation_pulls_expected_q_toward_targets():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch(b=4, h=2, n_legal=5)
    g = torch.Generator().manual_seed(1)
    values = torch.rand(4, 2, 18, generator=g) * 20 - 5  # targets in [-5, 15]
    mask = torch.zeros(4, 2, 18, dtype=torch.bool)
    mask[:, :, :3] = True  # three candidates per step, targets at every step
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out, _ = model(batch.obs, batch.actions, batch.game_ids, world_model=False)
        loss, logs = distill_loss(model, out, values, mask)
        first = first if first is not None else logs
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["distill_coverage"] == 1.0
    assert logs["distill_loss"] < first["distill_loss"] - 1.0, (first, logs)
    assert logs["distill_mae"] < 0.3 * first["distill_mae"], (first, logs)
    with torch.no_grad():
        out, _ = model(batch.obs, batch.actions, batch.game_ids, world_model=False)
        q = model.expected_q(out.q_logits[:, :2]).mean(2)  # [B, H, 18]
    torch.testing.assert_close(q[mask], values[mask], atol=1.0, rtol=0)


def test_distillation_in_the_joint_loss_respects_masks():
    torch.manual_seed(0)
    model = tiny_model()
    batch = make_batch(b=2, h=2, n_legal=4)
    batch.mask[1, 1] = False
    values = torch.full((2, 2, 18), 5.0)
    mask = torch.ones(2, 2, 18, dtype=torch.bool)  # claims targets everywhere, also illegal and padded
    loss0, logs0 = world_action_loss(model, batch, LossConfig())
    loss, logs = world_action_loss(model, _q_target_batch(batch, values, mask), LossConfig(lambda_distill=2.0))
    assert loss.item() == pytest.approx(loss0.item() + 2.0 * logs["distill_loss"], rel=1e-5)
    # changing targets at illegal actions or at the padded step changes nothing
    values2 = values.clone()
    values2[:, :, 4:] = -10.0
    values2[1, 1] = 30.0
    _, logs2 = world_action_loss(model, _q_target_batch(batch, values2, mask), LossConfig())
    assert logs2["distill_loss"] == pytest.approx(logs["distill_loss"], abs=1e-6)
    with pytest.raises(WamError, match="objective bc"):
        world_action_loss(model, _q_target_batch(batch, values, mask), LossConfig(objective="bc"))
    moved = _q_target_batch(batch, values, mask).to("cpu")
    assert isinstance(moved, QTargetBatch) and torch.equal(moved.q_target, values)
