"""Fixtures shared by the planning tests."""

from __future__ import annotations

import pytest
import torch

from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig


@pytest.fixture
def build_sharp_model():
    """Factory: a seeded tiny `WorldActionModel` in eval mode whose heads are 50x sharper than at init,
    so greedy choices (tokens, rewards, actions) are not near-ties."""

    def build(cfg: WorldActionModelConfig, double: bool = False) -> WorldActionModel:
        torch.manual_seed(0)
        model = WorldActionModel(cfg)
        model = (model.double() if double else model).eval()
        with torch.no_grad():
            for head in (model.obs_head, model.reward_head, model.termination_head):
                head[-1].weight.mul_(50.0)
            for qh in model.q_head.heads:
                qh.net[-1].weight.mul_(50.0)
        return model

    return build
