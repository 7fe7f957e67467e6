"""The VQ-VAE frame tokenizer: shapes, straight-through gradients, codebook upkeep, training on real Atari frames
(held-out episodes beat the mean-frame baseline), checkpoints, the token cache and exact resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wam.datasets.atari import legal_action_mask, make_env
from wam.datasets.collect import run_episode
from wam.datasets.errors import DataError, WamError
from wam.datasets.policies import make_policy
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.worldmodel.checkpoint import load_checkpoint, save_checkpoint
from wam.worldmodel.tokenizer import (
    TOKENIZER_PRESETS,
    TokenizerConfig,
    TokenizerTrainConfig,
    VectorQuantizer,
    build_tokenizer,
    foreground_weights,
    load_tokenizer,
)
from wam.worldmodel.tokenizer_config import RENAMED_TRAIN_FIELDS
from wam.worldmodel.tokenizer_train import (
    FramePool,
    encode_datasets,
    split_episodes,
    train_tokenizer,
    trainer_config,
)
from wam.worldmodel.trainer import lr_factor

GAMES = ("Zaxxon", "TimePilot")
EPISODES = 6  # per game; the last one is held out
MAX_STEPS = 160  # agent steps per episode (random play would run for minutes of game time)


def collect_random(root: Path, game: str, episodes: int, max_steps: int, seed: int) -> Path:
    """Real ALE episodes of the random policy written through the trajectory store; returns the dataset dir."""
    env = make_env(game, seed=seed, max_episode_steps=max_steps)
    policy, legal = make_policy("random", game), legal_action_mask(game)
    store = TrajectoryStore.create(dataset_dir(root, game, "random"), game=game,
                                   provenance={"protocol": "jowa", "policy": "random", "seed": seed})
    with store.writer(commit_every=episodes) as w:
        for i in range(episodes):
            w.append(Episode(**run_episode(env, policy, legal, seed=1000 * seed + i)))
    return store.directory


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("frames")
    return [collect_random(root, g, EPISODES, MAX_STEPS, seed=k) for k, g in enumerate(GAMES)]


def _quick(**kw) -> TokenizerTrainConfig:
    """The `debug` preset's training settings, shortened for a test."""
    return dataclasses.replace(TokenizerTrainConfig.from_preset("debug"), **kw)


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """The debug tokenizer trained briefly on both games (the shared run of most tests below)."""
    out = tmp_path_factory.mktemp("run") / "tok"
    cfg = TokenizerConfig.from_preset("debug")
    return train_tokenizer(cfg, TokenizerTrainConfig.from_preset("debug"), datasets, out, progress=False)


# --------------------------------------------------------------------------------------- the model
def test_presets_and_config_errors():
    assert set(TOKENIZER_PRESETS) == {"debug", "small", "jowa-40m", "jowa-70m", "jowa-150m"}
    jowa = TokenizerConfig.from_preset("jowa-70m")
    assert (jowa.codebook_size, jowa.codebook_dim, jowa.commitment_beta) == (2048, 512, 1.0)
    with pytest.raises(WamError, match="unknown tokenizer preset 'huge'"):
        TokenizerConfig.from_preset("huge")
    with pytest.raises(WamError, match="uint16"):
        TokenizerConfig(codebook_size=70_000)
    # what the tokenizer is and how it is trained are two configs; a preset names both
    assert (TokenizerTrainConfig.from_preset("jowa-70m").steps, TokenizerTrainConfig.from_preset("small").steps,
            TokenizerConfig.from_preset("small").res_blocks) == (250_000, 3000, 1)
    with pytest.raises(TypeError):
        TokenizerConfig(lr=1e-3)  # a training setting
    with pytest.raises(WamError, match="batch_size must be positive"):
        TokenizerTrainConfig(batch_size=0)


def test_shapes_dtypes_and_bf16():
    model = build_tokenizer(TokenizerConfig())
    frames = torch.randint(0, 256, (5, 84, 84), dtype=torch.uint8)
    tokens = model.encode(frames, batch_size=2)
    assert tokens.shape == (5, 36) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.cfg.codebook_size
    out = model.decode(tokens.to(torch.int32).numpy().astype(np.uint16))  # the uint16 cache decodes too
    assert out.shape == (5, 84, 84) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(model.encode(frames.numpy()), tokens)  # numpy in, same tokens
    with pytest.raises(ValueError, match="uint8"):
        model.encode(frames.float())
    # bf16 autocast: the loss is finite, tokens stay int64, the codebook search runs in fp32
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model.compute_loss(frames)
        tok_bf16 = model.encode(frames)
    assert torch.isfinite(loss) and tok_bf16.dtype == torch.int64 and tok_bf16.shape == (5, 36)
    assert {"loss", "recon_l1", "recon_mse", "grad_l1", "commitment", "psnr", "perplexity", "usage"} <= set(logs)
    assert 1.0 <= logs["perplexity"] <= model.cfg.codebook_size and 0 < logs["usage"] <= 1


def test_an_11x11_grid_gives_121_tokens_a_frame():
    """Three channel levels stop at 11x11 cells: 121 tokens a frame that decode back to 84x84; another id."""
    cfg = TokenizerConfig(grid=11)
    assert (cfg.channels, cfg.tokens_per_frame) == ((16, 32, 64), 121) and TokenizerConfig().tokens_per_frame == 36
    model = build_tokenizer(cfg)
    frames = torch.randint(0, 256, (3, 84, 84), dtype=torch.uint8)
    tokens = model.encode(frames)
    assert tokens.shape == (3, 121) and model.decode(tokens).shape == (3, 84, 84)
    loss, _ = model.train().compute_loss(frames)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\[N, 121\]"):
        model.decode(tokens[:, :36])
    assert model.tokenizer_id() != build_tokenizer(TokenizerConfig()).tokenizer_id()
    with pytest.raises(WamError, match="channels needs one entry per resolution level"):
        TokenizerConfig(channels=(16, 32, 64))  # grid 6 needs four levels
    with pytest.raises(WamError, match="grid must be 6"):
        TokenizerConfig(grid=7)


def test_straight_through_gradients_reach_the_encoder():
    model = build_tokenizer(TokenizerConfig())
    model.train()
    frames = torch.randint(0, 256, (4, 84, 84), dtype=torch.uint8)
    out = model(frames)
    # only the reconstruction: the encoder's gradient can come through the quantizer alone
    (out.recon - out.target).abs().mean().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads), "every encoder parameter gets a gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.quantizer.embedding.grad is None, "the EMA codebook is not trained by gradient"
    # the forward value is the codebook entry: decoding the tokens reproduces the reconstruction
    model.eval()
    assert torch.allclose(model.decode(out.tokens), out.recon.detach().clamp(0, 1), atol=1e-5)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(64, 8, ema_decay=0.9, usage_decay=0.8, dead_code_threshold=0.5, normalize=True)
    q.train()
    data = lambda: torch.randn(512, 8).abs()  # noqa: E731 - every vector in the positive orthant
    q(data())  # data-dependent initialisation
    with torch.no_grad():
        q.embedding[32:] *= -1  # half the codes point away from all data: never nearest
        q.ema_sum[32:] *= -1
    q.eval()
    used_before = torch.unique(q(data()).indices)
    assert int((used_before >= 32).sum()) == 0
    q.train()
    for _ in range(10):
        q(data())
    assert q.restarts >= 32
    q.eval()
    used_after = torch.unique(q(data()).indices)
    assert int((used_after >= 32).sum()) >= 28, f"revived codes in use: {int((used_after >= 32).sum())} of 32"


def test_gradient_codebook_without_ema_learns():
    cfg = TokenizerConfig(ema_decay=0.0)
    model = build_tokenizer(cfg)
    model.train()
    loss, _ = model.compute_loss(torch.randint(0, 256, (4, 84, 84), dtype=torch.uint8))
    loss.backward()
    assert model.quantizer.embedding.grad is not None and float(model.quantizer.embedding.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------- data
def test_split_and_pool(datasets, tmp_path):
    stores = [TrajectoryStore.open(d) for d in datasets]
    splits = split_episodes(stores, 0.1)
    for s, (train, held) in zip(stores, splits):
        assert list(held) == [s.num_episodes - 1] and list(train) == list(range(s.num_episodes - 1))
    rng = np.random.default_rng(0)
    full = FramePool(stores, [t for t, _ in splits], capacity=10**6, window=32, rng=rng)
    assert full.fits and len(full.frames) == full.total_frames
    small = FramePool(stores, [t for t, _ in splits], capacity=200, window=32, rng=rng)
    assert not small.fits and len(small.frames) <= 200 and set(small.windows[:, 1].tolist()) <= set(range(5))
    again = FramePool(stores, [t for t, _ in splits], 200, 32, rng, windows=small.state_dict()["windows"].numpy())
    assert np.array_equal(again.frames, small.frames)
    before = small.windows.copy()
    small.refresh(0.25, rng)
    assert (small.windows != before).any(axis=1).sum() >= 1
    one = TrajectoryStore.create(dataset_dir(tmp_path, "Pong", "one"), game="Pong",
                                 provenance={"protocol": "jowa", "policy": "random"})
    with one.writer() as w:
        w.append(Episode(**run_episode(make_env("Pong", max_episode_steps=5), make_policy("random", "Pong"),
                                       legal_action_mask("Pong"), seed=0)))
    with pytest.raises(DataError, match="fewer than 2 episodes"):
        split_episodes([TrajectoryStore.open(one.directory)], 0.1)


# ------------------------------------------------------------------------------------ training
def test_debug_tokenizer_beats_mean_frame_on_heldout_episodes(trained):
    e = trained.eval
    # a clear margin: at least 2 dB, i.e. the held-out squared error is under 63 % of the baseline's
    assert e.psnr > e.baseline_psnr + 2.0, trained.summary_line()
    print(trained.summary_line())
    assert e.usage > 0.2, trained.summary_line()
    rows = [json.loads(x) for x in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert {"heldout_psnr", "baseline_psnr", "heldout_usage", "heldout_perplexity"} <= set(rows[-1])
    plots = sorted((trained.run_dir / "plots").glob("recon_step_*.png"))
    assert plots and plots[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((trained.run_dir / "config.json").read_text())["codebook_size"] == 1024
    # the objects are in the tokens: on both games' foreground (pixels > 24 grey levels from the median frame)
    # the reconstructions beat the median frame by over 4 dB (the old unweighted tokenizer: under 1 dB on
    # Boxing, see docs/tokenizer.md)
    assert set(e.fg_gain) == set(GAMES) and e.fg_gain_min > 4.0, trained.summary_line()
    assert {"fg_gain_min", "fg_gain/Zaxxon", "fg_psnr/TimePilot"} <= set(rows[-1])


def test_checkpoint_round_trip_gives_identical_tokens(trained, datasets, tmp_path):
    store = TrajectoryStore.open(datasets[0])
    frames = store.read_episode(store.num_episodes - 1).observations
    loaded = load_tokenizer(trained.run_dir)
    assert loaded.tokenizer_id() == trained.tokenizer_id
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(frames), trained.model.eval().encode(frames))
    assert torch.equal(loaded.decode(loaded.encode(frames)), trained.model.decode(trained.model.encode(frames)))
    assert loaded.extra["heldout_psnr"] == pytest.approx(trained.eval.psnr)
    # a checkpoint whose weights no longer match its recorded id is refused
    ckpt = load_checkpoint(trained.checkpoint, kind="tokenizer")
    ckpt["model"]["decoder.backgrounds"] += 0.01
    bad = tmp_path / "edited.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format_version"})
    with pytest.raises(WamError, match="damaged"):
        load_tokenizer(bad)


def test_token_cache_equals_on_the_fly_and_is_idempotent(trained, datasets, tmp_path):
    dirs = [shutil.copytree(d, tmp_path / d.parent.name / d.name) for d in datasets]
    model = load_tokenizer(trained.run_dir)
    s = encode_datasets(model, dirs, batch_size=100, progress=False)
    assert len(s.encoded) == 2 and s.frames == sum(TrajectoryStore.open(d).num_steps + EPISODES for d in dirs)
    for d in dirs:
        store = TrajectoryStore.open(d)
        assert store.has_tokens() and store.tokenizer_id() == model.tokenizer_id()
        for i in range(store.num_episodes):
            ep = store.read_episode(i, tokens=True)
            assert ep.obs_tokens.dtype == np.uint16
            assert np.array_equal(ep.obs_tokens, model.encode(ep.observations).numpy())
    again = encode_datasets(model, dirs, progress=False)
    assert again.frames == 0 and len(again.skipped) == 2 and not again.encoded

    other = build_tokenizer(model.cfg, seed=1)
    assert other.tokenizer_id() != model.tokenizer_id()
    with pytest.raises(DataError, match=f"holds tokens of tokenizer {model.tokenizer_id()}"):
        encode_datasets(other, dirs, progress=False)
    assert TrajectoryStore.open(dirs[0]).tokenizer_id() == model.tokenizer_id()  # untouched


def test_resume_continues_exactly(datasets, tmp_path):
    cfg, train = TokenizerConfig.from_preset("debug"), _quick(steps=12, batch_size=8, eval_every=6, plot_every=12,
                 checkpoint_every=4, eval_frames=16, warmup_steps=3)
    straight = train_tokenizer(cfg, train, datasets, tmp_path / "a", progress=False)
    first = train_tokenizer(cfg, train, datasets, tmp_path / "b", progress=False, stop_at=6)
    assert first.step == 6
    with pytest.raises(WamError, match="already holds a tokenizer run"):
        train_tokenizer(cfg, train, datasets, tmp_path / "b", progress=False)
    resumed = train_tokenizer(cfg, train, [], tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 12 and resumed.tokenizer_id == straight.tokenizer_id
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the rows of the last step (training averages of steps 11-12 and the held-out figures, one row) are the same
    last = [[r for r in map(json.loads, (tmp_path / x / "metrics.jsonl").read_text().splitlines()) if r["step"] == 12]
            for x in ("a", "b")]
    strip = [[{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in rows] for rows in last]
    assert len(strip[0]) == 1 and {"loss", "heldout_psnr", "lr"} <= set(strip[0][0]) and strip[0] == strip[1]
    with pytest.raises(WamError, match="same --data"):
        train_tokenizer(cfg, train, datasets[:1], tmp_path / "b", resume=True, progress=False)


def test_a_checkpoint_of_the_old_loop_resumes_exactly(datasets, tmp_path):
    """Before the tokenizer trained through the shared `Trainer`, its checkpoints held the sampler state as a
    dict and no scheduler, and before the config split one flat config dict (architecture and training); such a
    run still loads with the same training settings and resumes to the weights of an uninterrupted run."""
    cfg, train = TokenizerConfig.from_preset("debug"), _quick(steps=8, batch_size=8, eval_every=4, plot_every=8,
                 checkpoint_every=4, eval_frames=16, warmup_steps=3)
    straight = train_tokenizer(cfg, train, datasets, tmp_path / "a", progress=False)
    first = train_tokenizer(cfg, train, datasets, tmp_path / "b", progress=False, stop_at=4)
    ckpt = load_checkpoint(first.checkpoint, kind="tokenizer")
    state = ckpt["sampler"][0]
    del state["drawn"]
    for group in ckpt["optimizer"]["param_groups"]:  # the old loop set each step's rate before it: step 4 ran at lr(3)
        group["lr"] = train.lr * lr_factor(3, trainer_config(train))
    old = {k: v for k, v in ckpt.items() if k not in ("format_version", "scheduler", "trainer", "train")}
    before = {new: name for name, new in RENAMED_TRAIN_FIELDS.items()}  # eval_every was eval_interval, ...
    old["config"] = {**ckpt["config"], **{before.get(k, k): v for k, v in ckpt["train"].items()}}  # one flat dict
    save_checkpoint(first.checkpoint, {**old, "sampler": state})
    assert load_tokenizer(first.checkpoint).train_cfg == dataclasses.replace(train, steps=8)
    other = dataclasses.replace(train, lr=1.0, batch_size=3)  # resuming takes the stored settings, not these
    resumed = train_tokenizer(TokenizerConfig(res_blocks=2), other, [], tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 8
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_accepts_moved_data_and_refuses_changed_data(datasets, tmp_path):
    """Datasets moved or copied since (same content: game, name, episode lengths and returns) resume the run;
    a copy that differs by one episode does not."""
    cfg, train = TokenizerConfig.from_preset("debug"), _quick(steps=8, batch_size=8, eval_every=4, plot_every=8,
                 checkpoint_every=4, eval_frames=16, warmup_steps=2)
    train_tokenizer(cfg, train, datasets, tmp_path / "run", progress=False, stop_at=4)
    moved = [shutil.copytree(d, tmp_path / "moved" / d.parent.name / d.name) for d in datasets]
    assert [TrajectoryStore.open(d).fingerprint() for d in moved] == [
        TrajectoryStore.open(d).fingerprint() for d in datasets]
    changed = [shutil.copytree(d, tmp_path / "changed" / d.parent.name / d.name) for d in datasets]
    with TrajectoryStore.open(changed[0]).writer() as w:
        w.append(TrajectoryStore.open(datasets[0]).read_episode(0))
    assert TrajectoryStore.open(changed[0]).fingerprint() != TrajectoryStore.open(datasets[0]).fingerprint()
    with pytest.raises(WamError, match="same --data"):
        train_tokenizer(cfg, train, changed, tmp_path / "run", resume=True, progress=False)
    resumed = train_tokenizer(cfg, train, moved, tmp_path / "run", resume=True, progress=False)
    assert resumed.step == 8


# ------------------------------------------------------------------------------- foreground fidelity
def _square_frames(n: int = 6, size: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A textured fixed background and n frames with a bright square moving across it; (frames, background)."""
    rng = np.random.default_rng(0)
    background = rng.integers(40, 80, size=(84, 84)).astype(np.uint8)
    frames = np.repeat(background[None], n, axis=0)
    for i in range(n):
        frames[i, 10 + 9 * i:10 + 9 * i + size, 20 + 7 * i:20 + 7 * i + size] = 230
    return frames, background


def test_foreground_fidelity_on_a_moving_square():
    from wam.worldmodel.tokenizer import foreground_fidelity, foreground_mask

    frames, background = _square_frames()
    mask = foreground_mask(torch.from_numpy(frames), torch.from_numpy(background))
    assert int(mask.sum()) == 6 * 25  # exactly the squares
    # a reconstruction that keeps the background and drops the square: no gain over the median frame
    without = torch.from_numpy(np.repeat(background[None], 6, axis=0)).double() / 255
    fid = foreground_fidelity(frames, without, background)
    assert abs(fid.gain) < 1e-9 and fid.fraction == pytest.approx(6 * 25 / (6 * 84 * 84))
    # one that keeps the square up to small noise: a large gain
    noisy = torch.from_numpy(frames).double() / 255 + 0.01 * torch.randn(6, 84, 84, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fid = foreground_fidelity(frames, noisy, background)
    assert fid.gain > 20.0
    # the square blurred to half its contrast: in between (error halves -> +6 dB)
    half = without + 0.5 * (torch.from_numpy(frames).double() / 255 - without)
    assert foreground_fidelity(frames, half, background).gain == pytest.approx(20 * np.log10(2), abs=1e-6)
    # no foreground pixel at all: NaN figures, not a crash
    empty = foreground_fidelity(background[None], without[:1], background)
    assert np.isnan(empty.gain) and empty.fraction == 0.0


def test_foreground_weight_puts_the_loss_on_the_objects():
    frames, background = _square_frames(n=4)
    bg = np.repeat(background[None], 4, axis=0)
    base = build_tokenizer(TokenizerConfig(foreground_weight=0.0))
    weighted = build_tokenizer(TokenizerConfig(foreground_weight=20.0))
    weighted.load_state_dict(base.state_dict())
    base.eval(), weighted.eval()
    _, plain_logs = base.compute_loss(frames, bg)
    _, w_logs = weighted.compute_loss(frames, bg)
    # same reconstruction, same batch: the weighted MSE is the hand-computed weighted mean, square pixels x21
    assert plain_logs["psnr"] == pytest.approx(w_logs["psnr"])
    with torch.no_grad():
        err = (base(frames).recon.double() - torch.from_numpy(frames).double() / 255).pow(2)
    w = torch.ones(4, 84, 84, dtype=torch.float64)
    for i in range(4):
        w[i, 10 + 9 * i:15 + 9 * i, 20 + 7 * i:25 + 7 * i] = 21.0
    assert w_logs["recon_mse"] == pytest.approx(float((w * err).sum() / w.sum()), rel=1e-4)
    assert plain_logs["recon_mse"] == pytest.approx(float(err.mean()), rel=1e-4)
    assert w_logs["recon_mse"] != pytest.approx(plain_logs["recon_mse"], rel=0.05)
    assert plain_logs["fg_fraction"] == pytest.approx(4 * 25 / (4 * 84 * 84))
    _, no_bg = weighted.compute_loss(frames)  # no background given: the plain loss
    assert no_bg["recon_mse"] == pytest.approx(plain_logs["recon_mse"]) and "fg_psnr" not in no_bg
    with pytest.raises(WamError, match="foreground_weight"):
        TokenizerConfig(foreground_weight=-1.0)


def test_background_bank_mixes_learned_screens_and_changes_the_id():
    plain = build_tokenizer(TokenizerConfig(background_bank=0))
    bank = build_tokenizer(TokenizerConfig(background_bank=4))
    assert hasattr(plain.decoder, "pixel_bias") and not hasattr(plain.decoder, "backgrounds")
    assert tuple(bank.decoder.backgrounds.shape) == (1, 4, 84, 84)
    assert plain.tokenizer_id() != bank.tokenizer_id()
    # the id of a bank-less tokenizer does not depend on the new field (older runs keep their ids)
    assert "background_bank" not in TokenizerConfig(background_bank=0).architecture_dict()
    # two screens in the bank; a head that always picks screen 1 decodes to it (plus the conv net's output)
    with torch.no_grad():
        bank.decoder.backgrounds.zero_()
        bank.decoder.backgrounds[0, 1] = 0.5
        bank.decoder.background_head.weight.zero_()
        bank.decoder.background_head.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
        z = torch.randn(3, 32, 6, 6)
        with_bank = bank.decoder(z)
        bank.decoder.backgrounds.zero_()
        without = bank.decoder(z)
    assert torch.allclose(with_bank - without, torch.full_like(without, 0.5), atol=1e-6)
    # weight decay never pulls the learned screens towards black
    from wam.worldmodel.tokenizer_train import make_optimizer

    opt = make_optimizer(bank, TokenizerTrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(bank.decoder.backgrounds) not in decayed and id(bank.decoder.net[0].weight) in decayed


def test_checkpoint_of_an_older_tokenizer_still_loads(tmp_path):
    """A config recorded before the background bank and the foreground weighting rebuilds the old model."""
    from wam.worldmodel.checkpoint import config_to_dict

    old = build_tokenizer(TokenizerConfig(background_bank=0, foreground_weight=0.0))
    stored = {k: v for k, v in config_to_dict(old.cfg).items() if k not in ("background_bank", "foreground_weight",
                                                                            "foreground_max_share",
                                                                            "foreground_threshold")}
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"kind": "tokenizer", "config": stored, "model": old.state_dict(),
                           "tokenizer_id": old.tokenizer_id(), "step": 1})
    loaded = load_tokenizer(path)
    assert loaded.cfg.background_bank == 0 and loaded.cfg.foreground_weight == 0.0
    assert loaded.tokenizer_id() == old.tokenizer_id()


def test_small_objects_weigh_as_much_as_a_reference_object():
    """A 1-pixel 'ball' and a 3x3 'paddle' on an empty frame: with equal per-pixel weights the paddle's
    pixels weigh 9x the ball's in total; with foreground_small_object = 9 both objects weigh the same, and
    the background and the paddle (already 9 pixels) keep their relative weights."""
    fg = torch.zeros(1, 1, 84, 84, dtype=torch.bool)
    fg[0, 0, 10, 10] = True  # ball
    fg[0, 0, 40:43, 60:63] = True  # paddle, 9 pixels
    plain = foreground_weights(fg, weight=30.0)
    assert plain[0, 0, 40:43, 60:63].sum() / plain[0, 0, 10, 10] == pytest.approx(9.0)
    assert plain[0, 0, 10, 10] / plain[0, 0, 0, 0] == pytest.approx(31.0)
    assert plain.mean() == pytest.approx(1.0)
    small = foreground_weights(fg, weight=30.0, small_object=9)
    assert small[0, 0, 10, 10] / small[0, 0, 0, 0] == pytest.approx(1 + 30.0 * 9)
    assert small[0, 0, 40:43, 60:63].sum() / small[0, 0, 10, 10] == pytest.approx(9 * 31.0 / (1 + 30.0 * 9))
    assert (small[0, 0, 40:43, 60:63] / small[0, 0, 0, 0]).allclose(torch.tensor(31.0))  # 9 pixels: unchanged
    assert small.mean() == pytest.approx(1.0)
    with pytest.raises(WamError, match="foreground_small_object"):
        TokenizerConfig(foreground_small_object=-1)
