"""The Ray planner pool: the same answers as the local planner, independent of the number of workers,
and a dead actor's chunk re-run on a fresh actor (real Ray actors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wam.datasets import faults
from wam.planning.beam import BeamSearchPlanner, PlannerSettings
from wam.planning.pool import PlannerPool, PlanRequest, plan_requests
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig


def pool_model(build) -> WorldActionModel:
    cfg = WorldActionModelConfig(vocab_size=16, tokens_per_obs=4, d_model=32, n_layers=1, n_heads=2, horizon=4,
                                 games=("A", "B"), core="transformer")
    return build(cfg)


def requests(n: int, seed: int = 0) -> list[PlanRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 1 + i % 2  # two context lengths mixed in one chunk
        legal = np.zeros(18, dtype=bool)
        legal[: 4 + i % 3] = True
        out.append(PlanRequest(obs_tokens=rng.integers(0, 16, (t, 4)), actions=rng.integers(0, 4, t - 1),
                               game_id=i % 2, legal=legal))
    return out


SETTINGS = PlannerSettings(beam_width=2, horizon=2, gamma=0.99)


def local_answers(model, reqs, batch_size):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pool's actors
    try:
        planner = BeamSearchPlanner(model, SETTINGS.beam_width, SETTINGS.horizon, SETTINGS.gamma)
        out = []
        for i in range(0, len(reqs), batch_size):
            out += plan_requests(planner, reqs[i:i + batch_size])[0]
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same(a, b):
    assert [x.action for x in a] == [y.action for y in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.candidates, y.candidates)
        np.testing.assert_array_equal(x.plans, y.plans)
        np.testing.assert_allclose(x.candidate_q, y.candidate_q, rtol=0, atol=1e-6)


def test_pool_matches_local_planner_for_one_and_two_workers(ray_session, build_sharp_model):
    model = pool_model(build_sharp_model)
    reqs = requests(12)
    local = local_answers(model, reqs, batch_size=4)
    for workers in (1, 2):
        with PlannerPool(model, SETTINGS, workers=workers, batch_size=4) as pool:
            got = pool.plan(reqs)
        assert_same(got, local)
        assert pool.stats.chunks == 3 and pool.stats.requests == 12 and pool.stats.restarted_workers == 0
        assert pool.stats.tokens == 12 * 2 * 2 * 5, "K*H*(1+4 tokens) per request"
    # the answers are the planner's: the chosen action is the best planned candidate
    for a in local:
        assert a.action == a.candidates[np.argmax(a.candidate_q)]


def test_dead_actor_chunk_is_rerun_on_a_fresh_actor(ray_session, tmp_path, build_sharp_model, monkeypatch):
    model = pool_model(build_sharp_model)
    reqs = requests(8, seed=1)
    local = local_answers(model, reqs, batch_size=2)
    monkeypatch.setenv(faults.ENV_DIE_ON, f"plan:2:{tmp_path / 'died'}")
    with PlannerPool(model, SETTINGS, workers=2, batch_size=2) as pool:
        got = pool.plan(reqs)
    assert (tmp_path / "died").exists(), "the fault was injected"
    assert pool.stats.restarted_workers == 1
    assert len(got) == 8
    assert_same(got, local)


def test_pool_must_be_started(build_sharp_model):
    from wam.datasets.errors import WamError

    with pytest.raises(WamError, match="not started"):
        PlannerPool(pool_model(build_sharp_model), SETTINGS).plan(requests(1))
