"""Every position at which acting (greedy, planned, window or episode memory) reads Q is trained.

A training sequence holds H+1 frames and the Q losses use frames 0..H-1 (the last frame only serves as
the TD bootstrap), so the Q at frame slot H gets no gradient. The agent must never read Q there: not at
the last frame of its window, not at an episode slot, not at the planner's imagined leaves.
"""

from __future__ import annotations

import pytest
import torch

from wam.agents.world_action import RECURRENT_CORES, WorldActionAgent
from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.planning.beam import PlannerSettings, max_context_frames
from wam.worldmodel.losses import LossConfig, world_action_loss
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig


def _read_frames(model: WorldActionModel) -> set[int]:
    """Frame slots whose Q some agent reads: the frames of its context (or episode slots) and, when planning,
    the imagined frames up to the leaves, for every planning horizon that fits."""
    frames: set[int] = set()
    memories = ("window", "episode") if model.cfg.core in RECURRENT_CORES else ("window",)
    for h in range(model.cfg.horizon + 2):
        try:
            max_context_frames(model, h)
        except WamError:
            continue
        for memory in memories:
            agent = WorldActionAgent(model, tokenizer=None, game="A", plan=PlannerSettings(2, h) if h else None,
                                     memory=memory)
            frames.update(range(agent.context))  # the window's Q (or the episode slots), where the root is read
            last = agent.plan_context - 1 if memory == "window" else agent.slot_cap  # where imagination starts
            frames.update(range(last + h + 1))
    return frames


@pytest.mark.parametrize("core", ["transformer", "mamba"])
@pytest.mark.parametrize("objective", ["jowa", "q-only", "bc"])
def test_every_position_acting_reads_gets_gradient(core, objective):
    torch.manual_seed(0)
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=4, games=("A", "B"),
                                 core=core)
    model = WorldActionModel(cfg)
    read = _read_frames(model)
    b, h, k = 6, cfg.horizon, cfg.tokens_per_obs
    g = torch.Generator().manual_seed(1)
    legal = torch.zeros(b, 18, dtype=torch.bool)
    legal[:, :6] = True
    batch = Batch(obs=torch.randint(0, cfg.vocab_size, (b, h + 1, k), generator=g),
                  actions=torch.randint(0, 6, (b, h), generator=g),
                  rewards=torch.randint(-1, 2, (b, h), generator=g).float(),
                  terminations=torch.zeros(b, h, dtype=torch.bool), truncations=torch.zeros(b, h, dtype=torch.bool),
                  mask=torch.ones(b, h, dtype=torch.bool), game_ids=torch.arange(b) % 2, legal_actions=legal,
                  next_action=torch.randint(0, 6, (b,), generator=g))
    q_out: list[torch.Tensor] = []

    def keep(module, inputs, output):
        if output.requires_grad:  # the training pass (the bootstrap's shifted pass runs without gradient)
            output.retain_grad()
            q_out.append(output)

    model.q_head.register_forward_hook(keep)
    loss, _ = world_action_loss(model, batch, LossConfig(objective=objective))
    loss.backward()
    q_grad = q_out[0].grad  # [B, H+1, E, 18, n_atoms]
    pos_grad = model.pos_embedding.weight.grad  # [L, D]
    for f in sorted(read):
        assert q_grad[:, f].abs().sum() > 0, f"{objective}: the Q logits at frame slot {f} get no gradient"
        p = f * cfg.tokens_per_step + k - 1  # the frame's last observation token, where Q is read
        assert pos_grad[p].abs().sum() > 0, f"{objective}: the input at position {p} (frame {f}) gets no gradient"
    # the last frame's Q is indeed untrained, and acting keeps off it
    assert q_grad[:, h].abs().sum() == 0
    assert read == set(range(cfg.horizon)), f"acting reads Q at frame slots {sorted(read)}"
