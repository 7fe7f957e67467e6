"""`WorldActionAgent` on real tiny checkpoints (random weights, saved by the trainer's code paths) and real frames.

The tokenizer is a `debug` VQ tokenizer saved as the tokenizer trainer saves it; the world-action models
(transformer for window memory, mamba for episode memory) are checkpointed by `Trainer.save` with the
metadata `wam pretrain` writes. Frames come from a real Pong environment.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from wam.agents.base import load_agent
from wam.agents.evaluate import play_episodes
from wam.agents.metrics import read_episodes
from wam.agents.world_action import WorldActionAgent
from wam.datasets.atari import legal_action_mask, make_env
from wam.datasets.errors import WamError
from wam.planning.beam import PlannerSettings
from wam.runs.cli import run_command
from wam.runs.train_cmds import PretrainConfig
from wam.worldmodel.checkpoint import RunDir, config_to_dict, save_checkpoint
from wam.worldmodel.losses import LossConfig, WorldActionObjective
from wam.worldmodel.model import CHECKPOINT_KIND, WamState, WorldActionModel, WorldActionModelConfig
from wam.worldmodel.synthetic import SyntheticTokenSource
from wam.worldmodel.tokenizer import CHECKPOINT_KIND as TOKENIZER_KIND
from wam.worldmodel.tokenizer import TokenizerConfig, build_tokenizer
from wam.worldmodel.trainer import Trainer, TrainerConfig

GAMES = ("Breakout", "Pong")
LEGAL = legal_action_mask("Pong").copy()  # bool [18]



def _save_model(out: Path, tok_dir: Path, tok_id: str, core: str, seed: int, behaviour_prior: float = 0.0) -> Path:
    """A random-weight world-action model checkpointed exactly as `wam pretrain` does (Trainer.save)."""
    torch.manual_seed(seed)
    cfg = WorldActionModelConfig.from_preset("debug")
    vocab = TokenizerConfig.from_preset("debug").codebook_size  # the tokenizer the agents load
    cfg = dataclasses.replace(cfg, vocab_size=vocab, d_model=32, n_layers=1, horizon=4, core=core, games=GAMES,
                              core_options=("d_state=8",) if core == "mamba" else (),
                              behaviour_prior=behaviour_prior)  # default: acting on Q alone (the prior has its own test)
    model = WorldActionModel(cfg)
    with torch.no_grad():  # spread the Q head's outputs so that actions differ by clear margins
        model.q_head.heads[0].net[-1].weight.mul_(50.0)
    loss = LossConfig()
    run_cfg = PretrainConfig(data=("synthetic",), out=str(out), tokenizer=str(tok_dir))
    meta = {"kind": CHECKPOINT_KIND, "command": "pretrain", "tokenizer": {"id": tok_id, "path": str(tok_dir)},
            "config": {"model": model.config_dict(), "loss": config_to_dict(loss), "run": config_to_dict(run_cfg)}}
    trainer = Trainer(WorldActionObjective(model, loss), SyntheticTokenSource(2, cfg.horizon, 256, games=GAMES),
                      TrainerConfig(device="cpu", progress=False), RunDir(out), checkpoint_meta=meta)
    return trainer.save()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wa_agent")
    cfg = TokenizerConfig.from_preset("debug")
    tok = build_tokenizer(cfg).eval()
    tok_dir = root / "tokenizer"
    save_checkpoint(tok_dir / "checkpoints" / "step_00000000.pt",
                    {"kind": TOKENIZER_KIND, "config": config_to_dict(cfg), "model": tok.state_dict(),
                     "tokenizer_id": tok.tokenizer_id(), "step": 0})
    out = {"root": root, "tokenizer": tok_dir}
    for core, seed in (("transformer", 1), ("mamba", 2)):
        _save_model(root / core, tok_dir, tok.tokenizer_id(), core, seed)
        out[core] = root / core
    return out


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """uint8 [24, 84, 84]: every 6th frame of a real Pong episode (random legal actions), so that frames differ."""
    env = make_env("Pong", seed=0)
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    out = [obs]
    legal = np.flatnonzero(LEGAL)
    for t in range(1, 6 * 24):
        obs, *_ = env.step(int(rng.choice(legal)))
        if t % 6 == 0:
            out.append(obs)
    env.close()
    return np.stack(out)


def _legal(n: int) -> np.ndarray:
    return np.broadcast_to(LEGAL, (n, 18)).copy()


def _rngs(n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(i) for i in range(n)]


def _play(agent, obs_seq: np.ndarray, n: int = 1, state=None, played=None):
    """Feed frames obs_seq [T, N, 84, 84]; returns (actions [T, N], q [T, N, 18], infos, state)."""
    if state is None:
        state = agent.reset(agent.init_state(n), np.ones(n, dtype=bool))
    acts, qs, infos = [], [], []
    for t, obs in enumerate(obs_seq):
        a, state, info = agent.act(state, obs, _legal(len(obs)), _rngs(len(obs)))
        if played is not None:  # the loop played other actions (epsilon): tell the agent
            a = played[t]
            state = agent.record_actions(state, a)
        acts.append(a)
        qs.append(info["q_values"])
        infos.append(info)
    return np.stack(acts), np.stack(qs), infos, state


def test_load_agent_and_user_errors(runs):
    agent = load_agent(str(runs["transformer"]), "pong")
    assert isinstance(agent, WorldActionAgent) and agent.game == "Pong" and agent.name == "wam-transformer"
    assert agent.checkpoint_id.startswith("transformer/step_00000000.pt@0#")
    assert agent.context == 4 and agent.memory == "window"  # H=4: Q is trained at frame slots 0..3
    planning = load_agent(str(runs["transformer"]), "Pong", plan=PlannerSettings(beam_width=2, horizon=2))
    assert planning.context == 4 and planning.plan_context == 2  # imagination from the last 2: leaves at slots <= 3
    with pytest.raises(WamError, match="not trained on Freeway; it knows Breakout, Pong"):
        load_agent(str(runs["transformer"]), "Freeway")
    with pytest.raises(WamError, match="episode memory needs a recurrent core"):
        load_agent(str(runs["transformer"]), "Pong", memory="episode")
    with pytest.raises(WamError, match="a planning horizon of 4 does not fit"):
        load_agent(str(runs["transformer"]), "Pong", plan=PlannerSettings(beam_width=2, horizon=4))
    with pytest.raises(WamError, match="context of 5 frames does not fit"):
        load_agent(str(runs["transformer"]), "Pong", context=5)
    with pytest.raises(WamError, match="trained without a behaviour prior head"):
        load_agent(str(runs["transformer"]), "Pong", behaviour_prior=0.3)


def test_an_acting_time_behaviour_prior_overrides_the_trained_one(runs):
    """`wam eval --behaviour-prior` reweights the prior of a model trained with one; acting follows the new tau."""
    from wam.runs.eval_cmds import EvalConfig, agent_kwargs

    tok_id = load_agent(str(runs["transformer"]), "Pong").tokenizer.tokenizer_id()
    path = runs["root"] / "with_prior"
    _save_model(path, runs["tokenizer"], tok_id, "transformer", 5, behaviour_prior=0.1)
    assert load_agent(str(path), "Pong").model.cfg.behaviour_prior == 0.1
    kw = agent_kwargs(EvalConfig(agent=str(path), game=["Pong"], behaviour_prior=2.5))
    assert kw == {"behaviour_prior": 2.5}
    agent = load_agent(str(path), "Pong", **kw)
    assert agent.model.cfg.behaviour_prior == 2.5
    cfg = agent.model.cfg
    flat_q = torch.zeros(1, cfg.q_ensemble, 18, cfg.n_atoms)  # every action the same expected Q
    legal = torch.from_numpy(LEGAL)[None]
    prior = torch.zeros(1, 18)
    prior[0, 3] = 1.0  # log pi_b(3) - log pi_b(a) = 1 for every other legal a (inside the support filter)
    vals = agent.model.acting_values(flat_q, legal, prior)
    assert (vals[0, 3] - vals[0, 0]).item() == pytest.approx(2.5 * 1.0, rel=1e-5)
    with pytest.raises(WamError, match="must be > 0"):
        load_agent(str(path), "Pong", behaviour_prior=0.0)
    other = build_tokenizer(TokenizerConfig.from_preset("debug"), seed=7)
    bad = runs["root"] / "other_tok"
    save_checkpoint(bad / "checkpoints" / "step_00000000.pt",
                    {"kind": TOKENIZER_KIND, "config": config_to_dict(other.cfg), "model": other.state_dict(),
                     "tokenizer_id": other.tokenizer_id(), "step": 0})
    with pytest.raises(WamError, match="was trained with vq-"):
        load_agent(str(runs["transformer"]), "Pong", tokenizer=str(bad))


def test_window_q_equals_parallel_forward_and_stepping(runs, frames):
    agent = load_agent(str(runs["transformer"]), "Pong")
    model = agent.model
    gid = torch.tensor([GAMES.index("Pong")])
    obs_seq = frames[:9, None]  # [9, 1, 84, 84]
    played = np.array([[a] for a in np.flatnonzero(LEGAL)[np.arange(9) % 6]])  # replaces the agent's choices
    acts, qs, _, state = _play(agent, obs_seq, played=played)
    tokens = agent.tokenizer.encode(frames[:9])  # [9, 36]
    for t in range(9):
        lo = max(0, t + 1 - agent.context)
        with torch.no_grad():
            out, _ = model(tokens[None, lo:t + 1], torch.as_tensor(played[lo:t, 0])[None], gid)
            q = model.q_values(out.q_logits[:, -1], torch.as_tensor(LEGAL)[None]).numpy()  # [1, 18]
        np.testing.assert_allclose(qs[t], q, rtol=1e-5, atol=1e-5)
        # the same window stepped frame by frame from a fresh state gives the same Q
        st = model.init_state(gid)
        with torch.no_grad():
            for j in range(lo, t + 1):
                q_logits, st = model.observe(tokens[None, j], st)
                if j < t:
                    *_, st = model.act(torch.as_tensor(played[j]), st)
            q_step = model.q_values(q_logits, torch.as_tensor(LEGAL)[None]).numpy()
        np.testing.assert_allclose(q_step, q, rtol=1e-4, atol=1e-4)
    assert LEGAL[acts[:, 0]].all() and np.isneginf(qs[:, 0, ~LEGAL]).all()
    assert len(np.unique(acts)) > 1 or np.ptp(qs[:, 0, LEGAL]) > 0.1, "Q should depend on the frames"
    assert state.length[0] == agent.context and state.steps[0] == 9


def test_episode_memory_equals_stepping_by_hand(runs, frames):
    agent = load_agent(str(runs["mamba"]), "Pong", memory="episode")
    assert agent.name == "wam-mamba-episode" and agent.slot_cap == 3  # H=4: Q is trained at slots 0..3
    model = agent.model
    acts, qs, _, _ = _play(agent, frames[:8, None])
    tokens = agent.tokenizer.encode(frames[:8])
    per_step, k = model.cfg.tokens_per_step, model.cfg.tokens_per_obs
    st = model.init_state(torch.tensor([GAMES.index("Pong")]))
    with torch.no_grad():
        for t in range(8):
            if t > 0:
                slot = min(t - 1, 3)
                *_, st = model.act(torch.as_tensor(acts[t - 1]), WamState(st.core, slot * per_step + k, st.game_ids))
            st = WamState(st.core, min(t, 3) * per_step, st.game_ids)
            q_logits, st = model.observe(tokens[None, t], st)
            q = model.q_values(q_logits, torch.as_tensor(LEGAL)[None]).numpy()
            np.testing.assert_allclose(qs[t], q, rtol=1e-5, atol=1e-5)
            assert acts[t, 0] == int(np.argmax(q[0]))
    # the state really carries the whole episode: a window agent on the same frames sees other Q after 5 steps
    window = load_agent(str(runs["mamba"]), "Pong")
    _, q_window, _, _ = _play(window, frames[:8, None], played=acts)
    np.testing.assert_allclose(q_window[:4], qs[:4], rtol=1e-4, atol=1e-4)  # same positions, same history
    assert not np.allclose(q_window[6:, 0, LEGAL], qs[6:, 0, LEGAL], atol=1e-6)


@pytest.mark.parametrize("core,memory", [("transformer", "window"), ("mamba", "episode")])
def test_reset_and_rows_independent(runs, frames, core, memory):
    agent = load_agent(str(runs[core]), "Pong", memory=memory)
    # three rows playing different frame streams; row 1 starts a new episode after 6 steps
    streams = np.stack([frames[0:12], frames[6:18], frames[12:24]], axis=1)  # [12, 3, 84, 84]
    state = agent.reset(agent.init_state(3), np.ones(3, dtype=bool))
    a1, q1, _, state = _play(agent, streams[:6], state=state)
    reset = np.array([False, True, False])
    state = agent.reset(state, reset)
    assert state.steps.tolist() == [6, 0, 6]
    a2, q2, _, state = _play(agent, streams[6:], state=state)
    acts, qs = np.concatenate([a1, a2]), np.concatenate([q1, q2])
    for row in (0, 2):  # untouched rows equal the row played alone
        solo_a, solo_q, _, _ = _play(agent, streams[:, row:row + 1])
        np.testing.assert_array_equal(acts[:, row], solo_a[:, 0])
        np.testing.assert_allclose(qs[:, row], solo_q[:, 0], rtol=1e-5, atol=1e-5)
    fresh_a, fresh_q, _, _ = _play(agent, streams[6:, 1:2])  # the reset row equals a fresh agent
    np.testing.assert_array_equal(acts[6:, 1], fresh_a[:, 0])
    np.testing.assert_allclose(qs[6:, 1], fresh_q[:, 0], rtol=1e-5, atol=1e-5)
    _, cont_q, _, _ = _play(agent, streams[:, 1:2])  # row 1 without the reset
    assert not np.allclose(qs[6:, 1, LEGAL], cont_q[6:, 0, LEGAL], atol=1e-3)  # the reset mattered


@pytest.mark.parametrize("core,memory", [("transformer", "window"), ("mamba", "episode")])
def test_planning_horizon_zero_is_greedy_and_planner_reports_q(runs, frames, core, memory):
    model, _ = WorldActionModel.from_checkpoint(runs[core])
    greedy = load_agent(str(runs[core]), "Pong", memory=memory, context=3)
    h0 = WorldActionAgent(model, greedy.tokenizer, "Pong", plan=PlannerSettings(beam_width=3, horizon=0),
                          memory=memory, context=3)
    obs = np.stack([frames[:10], frames[5:15]], axis=1)  # [10, 2, 84, 84]
    g_a, g_q, _, _ = _play(greedy, obs, n=2)
    p_a, p_q, infos, _ = _play(h0, obs, n=2)
    np.testing.assert_array_equal(g_a, p_a)
    np.testing.assert_allclose(g_q, p_q, rtol=1e-6, atol=1e-6)
    assert not np.stack([i["plan_changed"] for i in infos]).any(), "H=0 never changes greedy's choice"
    planned = np.stack([i["planned_q"] for i in infos])  # [T, 2, 18]: the top-3 candidates' values
    assert (np.isfinite(planned).sum(-1) == 3).all()
    np.testing.assert_allclose(planned[np.isfinite(planned)], p_q[np.isfinite(planned)], rtol=1e-6)
    # a real planner (K=2, H=2) acts legally, reports raw and planned Q, and its raw Q is the greedy Q
    beam = load_agent(str(runs[core]), "Pong", plan=PlannerSettings(beam_width=2, horizon=2), memory=memory)
    b_a, b_q, infos, _ = _play(beam, obs, n=2)
    assert LEGAL[b_a].all()
    raw = np.stack([i["raw_q"] for i in infos])
    np.testing.assert_array_equal(raw, b_q)
    if memory == "window":  # the root's Q comes from the whole window, as greedy acting reads it
        beam3 = load_agent(str(runs[core]), "Pong", plan=PlannerSettings(beam_width=2, horizon=2), context=3)
        _, q3, _, _ = _play(beam3, obs, n=2, played=g_a)
        np.testing.assert_allclose(q3, g_q, rtol=1e-5, atol=1e-5)
    changed = np.stack([i["plan_changed"] for i in infos])  # [T, 2] bool: planning overrode greedy's choice
    assert changed.dtype == bool and changed.shape == b_a.shape
    if memory == "window":  # greedy acting on the same windows (the planner's actions played) chose otherwise
        full = load_agent(str(runs[core]), "Pong", memory=memory)
        g_same, _, _, _ = _play(full, obs, n=2, played=b_a)
        np.testing.assert_array_equal(changed, g_same != b_a)
    chosen_planned = np.take_along_axis(np.stack([i["planned_q"] for i in infos]), b_a[..., None], -1)
    assert np.isfinite(chosen_planned).all()
    assert (chosen_planned[..., 0] == np.nanmax(np.stack([i["planned_q"] for i in infos]), -1)).all()


def test_window_planner_imagines_from_the_last_frames_with_the_whole_windows_q(runs, frames):
    """Window memory with a planner: raw Q and prior from the whole window (4 frames), the imagination from the
    state after its last max_context_frames(model, H) = 2 frames, encoded from position 0 (by hand here)."""
    agent = load_agent(str(runs["transformer"]), "Pong", plan=PlannerSettings(beam_width=2, horizon=2))
    model, planner = agent.model, agent.planner
    obs = frames[:6][:, None]  # [6, 1, 84, 84]
    acts, _, infos, _ = _play(agent, obs)
    tokens = torch.as_tensor(agent.encode(frames[:6]))  # [6, 36]
    legal = torch.as_tensor(_legal(1))
    gid = torch.full((1,), agent.game_id, dtype=torch.long)
    with torch.no_grad():
        for t in (3, 5):  # full windows: frames t-3..t
            a = torch.as_tensor(acts[:, 0])
            out, _ = model(tokens[None, t - 3:t + 1], a[None, t - 3:t], gid)
            _, short = model(tokens[None, t - 1:t + 1], a[None, t - 1:t], gid)
            prior = None if out.prior_logits is None else out.prior_logits[:, -1]
            res = planner.plan(short, out.q_logits[:, -1], legal, prior)
            planned = infos[t]["planned_q"][0]
            assert acts[t, 0] == res.action.item()
            np.testing.assert_allclose(planned[res.candidates[0].numpy()], res.candidate_q[0].numpy(), rtol=1e-5,
                                       atol=1e-5)
            raw = model.q_values(out.q_logits[:, -1], legal)[0].numpy()
            np.testing.assert_allclose(infos[t]["raw_q"][0][LEGAL], raw[LEGAL], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", ["window", "episode"])
def test_a_behaviour_prior_pulls_acting_towards_the_data(runs, frames, memory):
    """With a behaviour prior (tau log pi_b added to Q), a prior that puts its mass on LEFT makes greedy and planning
    agents play LEFT; a tiny tau leaves greedy acting on Q."""
    tok = load_agent(str(runs["transformer"]), "Pong").tokenizer
    torch.manual_seed(3)
    cfg = dataclasses.replace(WorldActionModelConfig.from_preset("debug"), vocab_size=tok.cfg.codebook_size, d_model=32,
                              n_layers=1, horizon=4, games=GAMES, behaviour_prior=10.0,
                              core="transformer" if memory == "window" else "mamba",
                              core_options=() if memory == "window" else ("d_state=8",))
    model = WorldActionModel(cfg).eval()
    with torch.no_grad():
        model.q_head.heads[0].net[-1].weight.mul_(50.0)  # Q spread over a few units
        model.prior_head[-1].bias.zero_()
        model.prior_head[-1].bias[4] = 30.0  # pi_b(LEFT) ~ 1
    obs = np.stack([frames[:6], frames[6:12]], axis=1)  # [6, 2, 84, 84]
    for plan in (None, PlannerSettings(beam_width=2, horizon=1)):
        agent = WorldActionAgent(model, tok, "Pong", plan=plan, memory=memory, context=3)
        acts, q, _, _ = _play(agent, obs, n=2)
        assert (acts == 4).all(), acts
    model.cfg.behaviour_prior = 1e-9
    # the support filter alone (pi_b(a) >= 0.3 max pi_b: only LEFT here) still plays LEFT, greedy or planning
    for plan in (None, PlannerSettings(beam_width=2, horizon=1)):
        res = _play(WorldActionAgent(model, tok, "Pong", plan=plan, memory=memory, context=3), obs, n=2)
        assert (res[0] == 4).all(), res[0]
        if plan is not None:  # the one supported candidate has a planned value, the other none
            planned = np.stack([i["planned_q"] for i in res[2]])
            assert (np.isfinite(planned).sum(-1) == 1).all() and np.isfinite(planned[..., 4]).all()
    model.cfg.support_threshold = 0.0
    acts, q, _, _ = _play(WorldActionAgent(model, tok, "Pong", memory=memory, context=3), obs, n=2)
    np.testing.assert_array_equal(acts, q.argmax(-1))  # greedy on Q (ties aside)
    assert (acts != 4).any()


def test_bf16_autocast_is_close_to_fp32(runs, frames):
    obs = np.stack([frames[:4], frames[8:12]], axis=1)  # [4, 2, 84, 84]
    fp32 = load_agent(str(runs["transformer"]), "Pong")
    bf16 = load_agent(str(runs["transformer"]), "Pong", bf16=True)
    a32, q32, _, _ = _play(fp32, obs, n=2)
    _, q16, _, _ = _play(bf16, obs, n=2, played=a32)  # same actions, so the same windows
    finite = np.isfinite(q32)
    assert (np.isfinite(q16) == finite).all()
    assert not np.array_equal(q16[finite], q32[finite]), "bf16 autocast did not run"
    np.testing.assert_allclose(q16[finite], q32[finite], rtol=0.05, atol=0.5)


def _episodes(out: Path) -> list[tuple]:
    return [(r.game, r.episode, r.seed, r.score, r.length, r.plan, r.horizon, r.checkpoint_id)
            for r in read_episodes(out)]


def test_wam_eval_end_to_end_is_deterministic(ray_session, runs, tmp_path):
    base = ["eval", "--agent", str(runs["transformer"]), "--game", "Pong", "--episodes", "2", "--workers", "2",
            "--max-steps", "50", "--seed", "3", "--no-progress"]
    results = {}
    for name, extra in (("greedy", []), ("beam", ["--plan", "beam", "--beam-width", "2", "--horizon", "1"])):
        for rep in range(2):
            out = tmp_path / f"{name}{rep}"
            assert run_command([*base, *extra, "--out", str(out)]) == 0
            results[name, rep] = _episodes(out)
    for name in ("greedy", "beam"):
        assert results[name, 0] == results[name, 1]
        assert [(r[0], r[1], r[4]) for r in results[name, 0]] == [("Pong", 0, 50), ("Pong", 1, 50)]
    assert results["beam", 0][0][5:7] == ("beam", 1) and results["greedy", 0][0][5] == "none"
    # the episodes' actions and Q-values (not only their scores) repeat for a seed: play one in-process twice
    agent = load_agent(str(runs["transformer"]), "Pong", plan=PlannerSettings(beam_width=2, horizon=1))
    played = []
    for _ in range(2):
        env = make_env("Pong", seed=3, max_episode_steps=30)
        (_, _, _, rec, _, _), = play_episodes(agent, [env], LEGAL, [11], epsilon=0.2, record=[True])
        played.append(rec)
        env.close()
    np.testing.assert_array_equal(played[0]["actions"], played[1]["actions"])
    np.testing.assert_array_equal(played[0]["q_values"], played[1]["q_values"])
    assert LEGAL[played[0]["actions"]].all() and len(played[0]["actions"]) == 30
