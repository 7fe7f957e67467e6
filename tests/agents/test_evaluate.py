"""Ray-distributed evaluation with real ALE envs, real Ray actors and the random / scripted agents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wam.agents.base import load_agent
from wam.agents.evaluate import evaluate
from wam.agents.metrics import read_episodes
from wam.datasets import faults
from wam.datasets.atari import legal_action_mask
from wam.datasets.errors import WamError
from wam.planning.beam import PlannerSettings

GAMES = ["Pong", "Breakout"]
CAP = 200  # agent steps per episode: short, but long enough for random returns to vary


def _key(records):
    """What must be identical between two evaluations with the same seed."""
    return [(r.game, r.episode, r.seed, r.score, r.length, r.truncated) for r in records]


@pytest.fixture(scope="module")
def random_eval(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("random2w")
    return evaluate("random", GAMES, episodes=3, workers=2, seed=5, out_dir=out, max_steps=CAP, envs_per_worker=2,
                    progress=False)


def test_baseline_agents_act_legally_with_per_row_generators():
    agent = load_agent("random", "Pong", plan=PlannerSettings(beam_width=3, horizon=2))  # planning ignored
    agent_mask = legal_action_mask("Pong")
    legal = np.broadcast_to(agent_mask, (3, 18))  # [N, 18]
    obs = np.zeros((3, 84, 84), dtype=np.uint8)
    state = agent.reset(agent.init_state(3), np.ones(3, dtype=bool))
    rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
    acts = [agent.act(state, obs, legal, rngs)[0] for _ in range(50)]  # 50 x [3]
    assert all(agent_mask[a].all() for a in acts)
    assert state.steps.tolist() == [50, 50, 50]
    # row 1 alone, with the same generator seed, draws the same actions: rows do not share randomness
    solo_state = agent.reset(agent.init_state(1), np.ones(1, dtype=bool))
    solo_rng = [np.random.default_rng(2)]
    solo = [agent.act(solo_state, obs[:1], legal[:1], solo_rng)[0][0] for _ in range(50)]
    assert solo == [a[1] for a in acts]
    with pytest.raises(WamError, match="neither random nor scripted"):
        load_agent("no/such/run", "Pong")
    with pytest.raises(WamError, match="no scripted policy"):
        load_agent("scripted", "Seaquest")


def test_exact_episodes_and_deterministic_for_a_seed(random_eval, tmp_path):
    res = random_eval
    assert res.complete and res.restarted_workers == 0
    assert [(r.game, r.episode) for r in res.records] == [(g, j) for g in sorted(GAMES) for j in range(3)]
    assert len({r.score for r in res.records}) > 1, "random returns should vary between episodes"
    assert read_episodes(res.out_dir) == res.records  # the CSV on disk is the result
    again = evaluate("random", GAMES, episodes=3, workers=2, seed=5, out_dir=tmp_path / "again", max_steps=CAP,
                     envs_per_worker=2, progress=False)
    one = evaluate("random", GAMES, episodes=3, workers=1, seed=5, out_dir=tmp_path / "one", max_steps=CAP,
                   envs_per_worker=2, progress=False)
    assert _key(again.records) == _key(res.records) == _key(one.records)
    other = evaluate("random", GAMES, episodes=3, workers=2, seed=6, out_dir=tmp_path / "other", max_steps=CAP,
                     envs_per_worker=2, progress=False)
    assert [r.score for r in other.records] != [r.score for r in res.records]
    summary = json.loads((res.out_dir / "results.json").read_text())
    assert summary["status"] == "complete" and summary["episodes_on_disk"] == 6
    pong = [r.score for r in res.records if r.game == "Pong"]
    assert summary["summary"]["games"]["Pong"]["return"]["point"] == pytest.approx(np.mean(pong))


def test_protocol_settings_are_read_back_from_the_live_env(ray_session, tmp_path):
    m = evaluate("random", ["Pong"], episodes=1, workers=1, protocol="machado", out_dir=tmp_path / "m",
                 progress=False)  # a whole episode under the protocol's own cap
    s = m.env_settings["Pong"]
    assert (s.protocol, s.sticky_action_prob, s.protocol_cap, s.episode_cap) == ("machado", 0.25, 27_000, 27_000)
    (r,) = m.records
    assert not r.truncated and r.score <= -15 and r.epsilon == 0.001 and r.max_steps == 27_000
    j = evaluate("random", ["Pong"], episodes=2, workers=1, protocol="jowa", out_dir=tmp_path / "j", max_steps=25,
                 epsilon=0.5, progress=False)
    s = j.env_settings["Pong"]
    assert (s.protocol, s.sticky_action_prob, s.protocol_cap, s.episode_cap) == ("jowa", 0.0, 108_000, 25)
    assert all(r.length == 25 and r.truncated and r.epsilon == 0.5 for r in j.records)
    on_disk = json.loads((tmp_path / "j" / "results.json").read_text())["env_settings"]["Pong"]
    assert on_disk["sticky_action_prob"] == 0.0 and on_disk["episode_cap"] == 25


def test_scripted_beats_random_through_the_eval_path(random_eval, tmp_path):
    scripted = evaluate("scripted", GAMES, episodes=3, workers=2, seed=5, out_dir=tmp_path / "s", max_steps=CAP,
                        envs_per_worker=2, progress=False)
    assert [(r.game, r.episode) for r in scripted.records] == [(r.game, r.episode) for r in random_eval.records]
    for g in GAMES:
        s = np.mean([r.score for r in scripted.records if r.game == g])
        rnd = np.mean([r.score for r in random_eval.records if r.game == g])
        assert s > rnd + 1.0, f"{g}: scripted {s} vs random {rnd}"


def test_a_dead_worker_episode_is_rerun_once(random_eval, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(faults.ENV_DIE_ON, f"evaluate:Breakout/2:{marker}")
    res = evaluate("random", GAMES, episodes=3, workers=2, seed=5, out_dir=tmp_path / "fault", max_steps=CAP,
                   envs_per_worker=2, progress=False)
    assert marker.exists() and res.restarted_workers == 1
    assert _key(res.records) == _key(random_eval.records)
    assert len(read_episodes(res.out_dir)) == 6


def test_interrupt_keeps_finished_episodes_and_resume_completes(random_eval, tmp_path, monkeypatch):
    out = tmp_path / "int"
    monkeypatch.setenv(faults.ENV_INTERRUPT_AFTER, "1")
    with pytest.raises(KeyboardInterrupt):
        evaluate("random", GAMES, episodes=3, workers=1, seed=5, out_dir=out, max_steps=CAP, envs_per_worker=2,
                 progress=False)
    monkeypatch.delenv(faults.ENV_INTERRUPT_AFTER)
    kept = read_episodes(out)
    assert len(kept) == 2  # one finished batch of 2 episodes
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    with open(out / "episodes.csv", "a") as f:
        f.write("Pong,2,1234,-3.0,1")  # a row torn by a crash mid-write: dropped on resume
    with pytest.raises(WamError, match="other settings"):
        evaluate("random", GAMES, episodes=3, workers=1, seed=6, out_dir=out, max_steps=CAP, progress=False)
    res = evaluate("random", GAMES, episodes=3, workers=2, seed=5, out_dir=out, max_steps=CAP, envs_per_worker=2,
                   progress=False)
    assert res.complete and res.episodes_run == 4
    assert set(json.loads((out / "results.json").read_text())["env_settings"]) == set(GAMES)
    assert _key(res.records) == _key(random_eval.records)


def test_cli_eval_with_planning_flags_and_video(ray_session, tmp_path, capsys):
    import cv2

    from wam.runs.cli import run_command

    out = tmp_path / "cli"
    rc = run_command(["eval", "--agent", "scripted", "--game", "Pong", "--game", "breakout", "--episodes", "2",
                      "--workers", "2",
                      "--plan", "beam", "--beam-width", "3", "--horizon", "2", "--max-steps", "40", "--video",
                      "--seed", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "has no model to plan with" in text and "HNS" in text
    records = read_episodes(out)
    assert [(r.game, r.episode) for r in records] == [("Breakout", 0), ("Breakout", 1), ("Pong", 0), ("Pong", 1)]
    assert [(r.plan, r.beam_width, r.horizon, r.agent) for r in records] == [("beam", 3, 2, "scripted")] * 4
    pong0 = next(r for r in records if (r.game, r.episode) == ("Pong", 0))
    cap = cv2.VideoCapture(str(out / "videos" / "Pong_ep0.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == pong0.length + 1
    assert json.loads((out / "results.json").read_text())["videos"] == {
        "Pong": "videos/Pong_ep0.mp4", "Breakout": "videos/Breakout_ep0.mp4"}
    assert run_command(["eval", "--agent", "random", "--game", "NoSuchGame", "--out", str(tmp_path / "x")]) == 2


def test_checkpoint_agents_are_found_by_kind(tmp_path):
    from wam.agents.base import AGENT_LOADERS, checkpoint_id, register_agent_loader
    from wam.agents.baselines import PolicyAgent
    from wam.worldmodel.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step_00000010.pt", {"kind": "test-kind", "step": 10})
    with pytest.raises(WamError, match="not an agent"):
        load_agent(str(run), "Pong")
    seen = {}

    def loader(path, ckpt, game, plan, **kw):
        seen.update(path=path, step=ckpt["step"], game=game, plan=plan, kw=kw)
        agent = PolicyAgent("random", game)
        agent.checkpoint_id = checkpoint_id(path, ckpt["step"])
        return agent

    register_agent_loader("test-kind", loader)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_agent_loader("test-kind", lambda *a, **k: None)
        agent = load_agent(str(run), "pong", plan=PlannerSettings(beam_width=4), device="cpu")
    finally:
        AGENT_LOADERS.pop("test-kind")
    assert seen["step"] == 10 and seen["game"] == "Pong"
    assert seen["plan"].beam_width == 4 and seen["kw"] == {"device": "cpu"}
    assert agent.checkpoint_id.startswith("run/step_00000010.pt@10#") and len(agent.checkpoint_id.split("#")[1]) == 12
