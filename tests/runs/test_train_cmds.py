"""`wam pretrain` / `wam finetune` on real HDF5 datasets with a real (untrained, frozen) tokenizer, and
Ray Train DDP parity: 2 CPU workers after one step == one process on the combined batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wam.datasets.atari import legal_action_mask
from wam.datasets.errors import DataError, WamError
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.runs.cli import run_command
from wam.runs.train_cmds import FinetuneConfig, PretrainConfig, run_training
from wam.worldmodel.checkpoint import RunDir, config_to_dict, load_checkpoint, save_checkpoint
from wam.worldmodel.model import CHECKPOINT_KIND, WorldActionModel
from wam.worldmodel.tokenizer import CHECKPOINT_KIND as TOKENIZER_KIND
from wam.worldmodel.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer


def _frames(rng: np.random.Generator, n: int, game_id: int) -> np.ndarray:
    """A bright block that moves one pixel a step over a game-specific background (structured, learnable)."""
    obs = np.full((n, 84, 84), 20 * game_id, dtype=np.uint8)
    start = int(rng.integers(0, 40))
    for t in range(n):
        x = (start + 3 * t) % 70
        obs[t, 30:44, x:x + 14] = 255
    return obs


def _write_dataset(root: Path, game: str, game_id: int, episodes: int, length: int, tokenizer=None) -> Path:
    directory = dataset_dir(root, game, "test")
    store = TrajectoryStore.create(directory, game=game, provenance={"protocol": "jowa", "policy": "random"})
    rng = np.random.default_rng(game_id)
    eps = []
    for i in range(episodes):
        term = np.zeros(length, bool)
        term[-1] = True
        rewards = np.where(np.arange(length) % 5 == 4, 1.0, 0.0).astype(np.float32)
        legal = np.flatnonzero(legal_action_mask(game))
        eps.append(Episode(observations=_frames(rng, length + 1, game_id), actions=rng.choice(legal, length),
                           rewards=rewards, terminations=term, truncations=np.zeros(length, bool), seed=i))
    with store.writer(commit_every=1000) as w:
        for ep in eps:
            w.append(ep)
    if tokenizer is not None:  # the token cache, as `wam tokenize` writes it
        store.write_tokens([(i, tokenizer.encode(ep.observations).numpy()) for i, ep in enumerate(eps)],
                           tokenizer_id=tokenizer.tokenizer_id())
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = TokenizerConfig.from_preset("debug")
    tok = build_tokenizer(cfg).eval()
    tok_path = root / "tokenizer" / "checkpoints" / "step_00000000.pt"
    save_checkpoint(tok_path, {"kind": TOKENIZER_KIND, "config": config_to_dict(cfg), "model": tok.state_dict(),
                               "tokenizer_id": tok.tokenizer_id(), "step": 0})
    tok = load_tokenizer(root / "tokenizer")
    data = root / "data"
    pong = _write_dataset(data, "Pong", 1, episodes=3, length=30, tokenizer=tok)
    breakout = _write_dataset(data, "Breakout", 2, episodes=3, length=30, tokenizer=tok)
    freeway = _write_dataset(data, "Freeway", 3, episodes=2, length=60)  # held out, frames only (no cache)
    return {"root": root, "tokenizer": root / "tokenizer", "pong": pong, "breakout": breakout, "freeway": freeway}


def _pretrain_cfg(ws, out: Path, steps: int = 40, **kw) -> PretrainConfig:
    cfg = PretrainConfig.from_preset("debug")
    cfg.data = (str(ws["pong"]), str(ws["breakout"]))
    cfg.tokenizer, cfg.out, cfg.batch_size, cfg.prefetch = str(ws["tokenizer"]), str(out), 8, 0
    cfg.model.d_model, cfg.model.n_layers, cfg.model.horizon = 32, 1, 2
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.log_every, cfg.train.progress = steps, 5, 5, False
    cfg.train.checkpoint_every = 20
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_pretrain_then_finetune_from_checkpoint_and_scratch(workspace):
    out = workspace["root"] / "pre"
    result = run_training(_pretrain_cfg(workspace, out))
    assert result.step == 40
    rows = RunDir(out).read_metrics()
    first, last = rows[0], rows[-1]
    assert last["obs_ce"] < first["obs_ce"] - 0.5, (first, last)
    assert np.mean([r["td_kl"] for r in rows[-3:]]) < first["td_kl"], (first, last)
    assert last["illegal_data_actions"] == 0.0
    assert {"loss", "wm_loss", "obs_ce", "reward_ce", "termination_ce", "td_loss", "cql_loss", "lr",
            "tokens_per_s"} <= set(last)  # what reports read
    assert json.loads((out / "config.json").read_text())["objective"] == "jowa"
    ckpt = load_checkpoint(out, kind=CHECKPOINT_KIND)
    assert ckpt["config"]["objective"] == "jowa"
    assert ckpt["config"]["model"]["games"] == ["Breakout", "Pong"]
    assert ckpt["tokenizer"]["id"] == load_tokenizer(workspace["tokenizer"]).tokenizer_id()
    assert ckpt["config"]["model"]["vocab_size"] == load_tokenizer(workspace["tokenizer"]).cfg.codebook_size

    # fine-tune on the held-out game from the checkpoint: frames only, encoded by the frozen tokenizer
    ft = FinetuneConfig.from_preset("debug")
    ft.from_run, ft.data, ft.game, ft.transitions = str(out), (str(workspace["freeway"]),), "Freeway", 40
    ft.out, ft.batch_size, ft.prefetch, ft.freeze = str(workspace["root"] / "ft"), 4, 0, ("embeddings",)
    ft.train.steps, ft.train.warmup_steps, ft.train.log_every, ft.train.progress = 4, 1, 2, False
    pre_model, _ = WorldActionModel.from_checkpoint(out)
    assert run_training(ft).step == 4
    model, ck = WorldActionModel.from_checkpoint(ft.out)
    assert model.cfg.games == ("Breakout", "Pong", "Freeway")
    assert torch.equal(model.obs_embedding.weight, pre_model.obs_embedding.weight)  # frozen
    assert not torch.equal(model.core.state_dict()["h.0.attn.c_attn.weight"],
                           pre_model.core.state_dict()["h.0.attn.c_attn.weight"])
    assert ck["config"]["run"]["transitions"] == 40

    # the same model from scratch: needs --tokenizer, has one task row
    ft.from_run, ft.out, ft.freeze = "scratch", str(workspace["root"] / "scratch"), ()
    with pytest.raises(WamError, match="--tokenizer"):
        run_training(ft)
    ft.tokenizer = str(workspace["tokenizer"])
    ft.model.d_model, ft.model.n_layers, ft.model.horizon = 32, 1, 2
    assert run_training(ft).step == 4
    scratch, _ = WorldActionModel.from_checkpoint(ft.out)
    assert scratch.cfg.games == ("Freeway",) and scratch.cfg.vocab_size == load_tokenizer(workspace["tokenizer"]).cfg.codebook_size


def test_calibration_on_held_out_episodes_is_logged_at_checkpoint_steps(workspace):
    """--calibration-episodes 1: the last episode of each dataset is held out and its Q calibration (the same figures
    q_calibration gives for the final model) joins metrics.jsonl at steps 20 and 40."""
    from wam.worldmodel.diagnostics import EpisodeTokens, q_calibration

    out = workspace["root"] / "calibrated"
    run_training(_pretrain_cfg(workspace, out, calibration_episodes=1))
    rows = [r for r in RunDir(out).read_metrics() if "q_mc_gap/Pong" in r]
    assert [r["step"] for r in rows] == [20, 40]
    model, _ = WorldActionModel.from_checkpoint(out)
    eps = []
    for game in ("pong", "breakout"):
        store = TrajectoryStore.open(workspace[game])
        ep = store.read_episode(store.num_episodes - 1, tokens=True)
        eps.append(EpisodeTokens(ep.obs_tokens, ep.actions, ep.rewards, model.cfg.games.index(store.game)))
    want = q_calibration(model, eps, 0.99)
    for game in ("Pong", "Breakout"):
        r = want[model.cfg.games.index(game)]
        assert rows[-1][f"q_mc_gap/{game}"] == pytest.approx(r["q_mc_gap"], abs=1e-5)
        assert rows[-1][f"mc_return/{game}"] == pytest.approx(r["mc_return_mean"])
        assert rows[-1][f"q_heldout/{game}"] == pytest.approx(r["q_data_mean"], abs=1e-5)
    bad = _pretrain_cfg(workspace, workspace["root"] / "calibrated-bad", calibration_episodes=3)
    with pytest.raises(DataError, match="leaves none to train on"):
        run_training(bad)


def test_a_121_token_tokenizer_gives_a_model_that_reads_121_tokens_and_acts(workspace, tmp_path):
    """An 11x11-grid tokenizer: the cache holds 121 tokens a frame, pretraining builds a model with
    tokens_per_obs 121 from it, the agent acts on frames through it, and the 36-token tokenizer is refused."""
    from wam.agents.base import load_agent

    torch.manual_seed(0)
    cfg = TokenizerConfig(grid=11)
    tok = build_tokenizer(cfg).eval()
    save_checkpoint(tmp_path / "tok11" / "checkpoints" / "step_00000000.pt",
                    {"kind": TOKENIZER_KIND, "config": config_to_dict(cfg), "model": tok.state_dict(),
                     "tokenizer_id": tok.tokenizer_id(), "step": 0})
    tok = load_tokenizer(tmp_path / "tok11")
    data = _write_dataset(tmp_path / "data", "Pong", 1, episodes=2, length=30, tokenizer=tok)
    assert TrajectoryStore.open(data).tokens_per_frame == 121
    pre = _pretrain_cfg(workspace, tmp_path / "pre11", steps=4)
    pre.data, pre.tokenizer = (str(data),), str(tmp_path / "tok11")
    run_training(pre)
    assert WorldActionModel.from_checkpoint(pre.out)[0].cfg.tokens_per_obs == 121
    agent = load_agent(pre.out, "Pong")
    state = agent.reset(agent.init_state(2), np.ones(2, bool))
    legal = np.stack([legal_action_mask("Pong")] * 2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 84, 84), dtype=np.uint8)
    for _ in range(3):
        acts, state, _ = agent.act(state, frames, legal, [np.random.default_rng(i) for i in range(2)])
        assert legal[np.arange(2), acts].all()
    ft = FinetuneConfig.from_preset("debug")
    ft.from_run, ft.data, ft.game, ft.tokenizer = pre.out, (str(workspace["freeway"]),), "Freeway", str(workspace["tokenizer"])
    ft.out, ft.batch_size, ft.prefetch, ft.train.steps, ft.train.progress = str(tmp_path / "ft"), 4, 0, 2, False
    with pytest.raises(WamError, match="121"):
        run_training(ft)


def test_cli_pretrain_resume_continues(workspace):
    out = workspace["root"] / "cli"
    args = ["pretrain", "--preset", "debug", "--data", str(workspace["pong"]), "--tokenizer", str(workspace["tokenizer"]),
            "--core", "mamba", "--out", str(out), "--steps", "4", "--batch-size", "4", "--d-model", "32",
            "--n-layers", "1", "--horizon", "2", "--checkpoint-every", "2", "--log-every", "1", "--no-progress",
            "--prefetch", "0", "--source", "frames"]
    assert run_command(args) == 0
    assert load_checkpoint(out, kind=CHECKPOINT_KIND)["config"]["model"]["core"] == "mamba"
    assert run_command([*args[:args.index("--steps") + 1], "6", *args[args.index("--steps") + 2:], "--resume"]) == 0
    rows = RunDir(out).read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert run_command(["pretrain", "--data", "synthetic"]) == 2  # no --out: one-line user error
    assert run_command(["pretrain", "--data", "synthetic", "--out", str(out), "--steps", "0"]) == 2
    assert run_command(["pretrain", "--data", "synthetic", "--out", str(out), "--n-step", "0"]) == 2
    assert [r["step"] for r in RunDir(out).read_metrics()] == [1, 2, 3, 4, 5, 6]  # the run is untouched


@pytest.mark.usefixtures("ray_session")
def test_ray_train_two_workers_equal_one_process_on_the_combined_batch(tmp_path):
    from wam.runs.ray_train import train_with_ray

    def cfg(out: str) -> PretrainConfig:
        c = PretrainConfig.from_preset("debug")
        c.data, c.out, c.batch_size = ("synthetic",), out, 4
        c.model.d_model, c.model.n_layers, c.model.horizon, c.model.vocab_size = 32, 1, 2, 64
        c.model.games = ("A", "B")
        # no behaviour-prior head: its gradient gives the attention key biases (whose true gradient is 0, softmax
        # is shift-invariant) rounding noise of ~1e-10, which Adam's first step (g / (|g| + 1e-8)) turns into
        # weight differences of ~1e-5 that depend on the summation order, not on DDP
        c.model.behaviour_prior = 0.0
        c.train.steps, c.train.warmup_steps, c.train.lr, c.train.progress = 1, 0, 1e-3, False
        return c

    single = cfg(str(tmp_path / "single"))
    run_training(single)
    multi = cfg(str(tmp_path / "multi"))
    multi.workers = 2
    train_with_ray(multi, workers=2, threads_per_worker=1)
    a = load_checkpoint(single.out, kind=CHECKPOINT_KIND)
    b = load_checkpoint(multi.out, kind=CHECKPOINT_KIND)
    assert a["step"] == b["step"] == 1 and len(b["sampler"]) == 2
    torch.manual_seed(single.seed)  # the initial weights both runs started from
    init = WorldActionModel(WorldActionModel.from_checkpoint(single.out)[0].cfg)
    moved = 0
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=2e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved += int(not torch.equal(v, init.state_dict()[k]))
    assert moved > 10
    la = RunDir(single.out).read_metrics()[-1]["loss"]
    lb = RunDir(multi.out).read_metrics()[-1]["loss"]
    assert lb == pytest.approx(la, rel=1e-5)


def test_ctrl_c_then_resume_is_bit_exact_with_the_real_sampler(workspace):
    """Token cache + prefetching sampler: Ctrl-C at step 3, --resume, and the run ends where a straight one does."""
    import os
    import signal

    def cfg(out: str) -> PretrainConfig:
        c = _pretrain_cfg(workspace, workspace["root"] / out, steps=6)
        c.prefetch, c.train.log_every, c.train.checkpoint_every, c.model.dropout = 2, 1, 100, 0.1
        return c

    run_training(cfg("straight"))
    interrupted = cfg("interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, on_log=lambda step, logs: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    assert load_checkpoint(interrupted.out, kind=CHECKPOINT_KIND)["step"] == 3
    interrupted.resume = True
    run_training(interrupted)
    a = load_checkpoint(workspace["root"] / "straight", kind=CHECKPOINT_KIND)
    b = load_checkpoint(interrupted.out, kind=CHECKPOINT_KIND)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    trace_a = [r["loss"] for r in RunDir(workspace["root"] / "straight").read_metrics()]
    assert len(trace_a) == 6 and trace_a == [r["loss"] for r in RunDir(interrupted.out).read_metrics()]


def test_baseline_objectives_q_only_and_bc_via_cli(workspace):
    """`--objective q-only` and `--objective bc` train through the same commands; reports can name them."""
    out = workspace["root"] / "q-only"
    common = ["--tokenizer", str(workspace["tokenizer"]), "--steps", "3", "--batch-size", "4", "--d-model", "32",
              "--checkpoint-every", "1",
              "--n-layers", "1", "--horizon", "2", "--log-every", "1", "--no-progress", "--prefetch", "0"]
    assert run_command(["pretrain", "--preset", "debug", "--data", str(workspace["pong"]), "--out", str(out),
                        "--objective", "q-only", *common]) == 0
    assert json.loads((out / "config.json").read_text())["objective"] == "q-only"
    ckpt = load_checkpoint(out, kind=CHECKPOINT_KIND)
    assert ckpt["config"]["objective"] == "q-only"
    rows = RunDir(out).read_metrics()
    assert len(rows) == 3 and {"loss", "td_loss", "cql_loss", "lr", "tokens_per_s"} <= set(rows[-1])
    assert "obs_ce" not in rows[-1]
    step1 = load_checkpoint(RunDir(out).checkpoint_path(1), kind=CHECKPOINT_KIND)["model"]
    changed = {k.split(".")[0] for k in step1 if not torch.equal(step1[k], ckpt["model"][k])}
    assert "core" in changed and "q_head" in changed
    assert not changed & {"obs_head", "reward_head", "termination_head"}, "world-model heads must stay frozen"

    bc = workspace["root"] / "bc"
    assert run_command(["finetune", "--preset", "debug", "--from", str(out), "--data", str(workspace["freeway"]),
                        "--game", "Freeway", "--transitions", "40", "--out", str(bc), "--objective", "bc",
                        *common]) == 0
    assert json.loads((bc / "config.json").read_text())["objective"] == "bc"
    assert load_checkpoint(bc, kind=CHECKPOINT_KIND)["config"]["objective"] == "bc"
    assert {"loss", "bc_loss", "bc_acc", "lr", "tokens_per_s"} <= set(RunDir(bc).read_metrics()[-1])
    # the checkpoint acts through the same function as any world-action model: argmax of q_values
    model, _ = WorldActionModel.from_checkpoint(bc)
    tokens = torch.zeros(1, 36, dtype=torch.long)
    q_logits, _ = model.observe(tokens, model.init_state(torch.tensor([model.cfg.games.index("Freeway")])))
    legal = torch.tensor(legal_action_mask("Freeway"))[None]
    q = model.q_values(q_logits, legal)
    assert bool(legal[0, q.argmax(-1)]) and torch.isinf(q[~legal]).all()
    # distillation does not apply to BC
    bad = FinetuneConfig.from_preset("debug")
    bad.from_run, bad.data = str(out), (str(workspace["freeway"]),)
    bad.game, bad.out = "Freeway", str(workspace["root"] / "bc2")
    bad.loss.objective, bad.q_targets = "bc", "x.h5"
    with pytest.raises(WamError, match="objective bc"):
        run_training(bad)


def _write_q_targets(path: Path, directory: Path, game: str, values: dict[tuple[int, int], float]) -> None:
    """A corrected-Q file in `wam plan correct`'s format: candidates (data action, another legal action)."""
    import h5py

    from wam.planning.correct import _DTYPES, ROW_FIELDS, _content_digest

    store = TrajectoryStore.open(directory)
    keys = sorted(values)
    legal = np.flatnonzero(legal_action_mask(game))
    data_actions = {e: store.read_window(e, 0, int(store.episode_lengths()[e]), "actions") for e in {k[0] for k in keys}}
    first = np.array([data_actions[e][t] for e, t in keys])
    other = np.array([legal[(np.flatnonzero(legal == a)[0] + 1) % len(legal)] for a in first])
    n = len(keys)
    arrays = {"dataset": np.zeros(n), "episode": [k[0] for k in keys], "step": [k[1] for k in keys],
              "game_id": np.zeros(n), "action": first, "candidates": np.stack([first, other], 1),
              "candidate_q": np.stack([[values[k] for k in keys], [values[k] - 1.0 for k in keys]], 1),
              "raw_q": np.zeros((n, 18)), "plans": np.zeros((n, 2, 1))}
    arrays = {name: np.asarray(a).astype(_DTYPES[name]) for name, a in arrays.items()}
    with h5py.File(path, "w") as f:
        for name in ROW_FIELDS:
            f.create_dataset(name, data=arrays[name], fletcher32=True)
        f.attrs.update({"format": "wam-q-targets", "format_version": 1, "content_sha256": _content_digest(arrays),
                        "games": json.dumps([game]),
                        "datasets": json.dumps([{"path": str(directory.resolve()), "game": game}])})


def test_finetune_distils_corrected_q_targets(workspace):
    from wam.datasets.sampler import SegmentSampler
    from wam.planning.correct import load_q_targets
    from wam.runs.distill import QTargetSource

    freeway = workspace["freeway"]
    lengths = TrajectoryStore.open(freeway).episode_lengths()
    values = {(e, t): float(3 + e + 0.1 * t) for e in range(len(lengths)) for t in range(int(lengths[e]))}
    del values[(0, 5)]  # one state without a target
    qfile = workspace["root"] / "q.h5"
    _write_q_targets(qfile, freeway, "Freeway", values)

    # the targets of each sampled step are those of the step actually sampled (its data action is candidate 0)
    sampler = SegmentSampler([freeway], horizon=2, batch_size=16, source="frames", seed=3, prefetch=0)
    source = QTargetSource(sampler, load_q_targets(qfile))
    try:
        for _ in range(3):
            batch = source.sample()
            b_idx, t_idx = torch.nonzero(batch.mask, as_tuple=True)
            assert batch.q_target_mask.sum(-1)[batch.mask].le(2).all()
            covered = batch.q_target_mask.any(-1)[batch.mask]
            assert covered.float().mean() > 0.9
            acts = batch.actions[b_idx, t_idx]
            assert batch.q_target_mask[b_idx, t_idx, acts][covered].all(), "targets of another step"
            q_first = batch.q_target[b_idx, t_idx, acts][covered]
            assert torch.all(q_first > 2.9) and not batch.q_target_mask[~batch.mask].any()
    finally:
        source.close()

    ft = FinetuneConfig.from_preset("debug")
    ft.from_run, ft.data, ft.game, ft.transitions = "scratch", (str(freeway),), "Freeway", 40
    ft.tokenizer = str(workspace["tokenizer"])
    ft.model.d_model, ft.model.n_layers, ft.model.horizon = 32, 1, 2
    ft.out, ft.batch_size, ft.prefetch, ft.q_targets = str(workspace["root"] / "distil"), 8, 0, str(qfile)
    ft.loss.lambda_distill, ft.loss.lambda_wm = 5.0, 0.0
    ft.train.steps, ft.train.warmup_steps, ft.train.log_every, ft.train.progress = 30, 2, 5, False
    ft.train.lr = 3e-3
    assert run_training(ft).step == 30
    rows = RunDir(ft.out).read_metrics()
    assert all(r["distill_coverage"] > 0.9 for r in rows)  # every step but one has targets
    assert rows[-1]["distill_loss"] < rows[0]["distill_loss"] - 0.3, (rows[0], rows[-1])
    assert rows[-1]["distill_mae"] < rows[0]["distill_mae"], (rows[0], rows[-1])
    ckpt = load_checkpoint(ft.out, kind=CHECKPOINT_KIND)
    assert ckpt["q_targets"]["path"] == str(qfile.resolve()) and ckpt["q_targets"]["states"] == len(values)
    with pytest.raises(WamError, match="covers none"):
        QTargetSource(SegmentSampler([workspace["pong"]], horizon=2, batch_size=2, prefetch=0), load_q_targets(qfile))
