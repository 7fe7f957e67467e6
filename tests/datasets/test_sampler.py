"""SegmentSampler on real HDF5 datasets written through the store (synthetic frames, one with real ALE frames)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wam.datasets.atari import legal_action_mask
from wam.datasets.errors import DataError
from wam.datasets.sampler import SegmentSampler
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir

H = 4
LENGTHS = {"Pong": [3, 9, 17, 6, 30], "Breakout": [12, 5, 40]}
DATASET_ID = {"Pong": 1, "Breakout": 2}


def _episode(dataset_id: int, index: int, length: int, rng: np.random.Generator, tokens: bool) -> Episode:
    """Frames that name themselves: pixel (0,0) dataset id, (0,1) episode, (0,2) step; the rest random."""
    obs = rng.integers(0, 256, size=(length + 1, 84, 84), dtype=np.uint8)
    obs[:, 0, 0], obs[:, 0, 1], obs[:, 0, 2] = dataset_id, index, np.arange(length + 1)
    term = np.zeros(length, bool)
    term[-1] = True
    return Episode(observations=obs, actions=rng.integers(0, 18, length), rewards=rng.normal(size=length).astype(np.float32) + 1,
                   terminations=term, truncations=np.zeros(length, bool), seed=index,
                   obs_tokens=rng.integers(0, 2048, size=(length + 1, 36)) if tokens else None)


def _write(root: Path, game: str, lengths: list[int], tokens: bool = False, name: str = "synthetic") -> Path:
    directory = dataset_dir(root, game, name)
    store = TrajectoryStore.create(directory, game=game, provenance={"protocol": "jowa", "policy": "random"})
    rng = np.random.default_rng(DATASET_ID[game])
    episodes = [_episode(DATASET_ID[game], i, n, rng, tokens) for i, n in enumerate(lengths)]
    if tokens:  # a token cache is added after the frames, as the tokenizer does
        with store.writer(commit_every=1000) as w:
            for ep in episodes:
                w.append(Episode(**{**ep.__dict__, "obs_tokens": None}))
        store.write_tokens([(i, ep.obs_tokens) for i, ep in enumerate(episodes)], tokenizer_id="test-tok")
    else:
        with store.writer(commit_every=1000) as w:
            for ep in episodes:
                w.append(ep)
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sampler")
    for game, lengths in LENGTHS.items():
        _write(root, game, lengths)
    return root


@pytest.fixture(scope="module")
def episodes(root) -> dict[tuple[int, int], Episode]:
    """(dataset id, episode index) -> the episode as the store reads it."""
    out = {}
    for game in LENGTHS:
        store = TrajectoryStore.open(dataset_dir(root, game, "synthetic"))
        for i in range(store.num_episodes):
            out[DATASET_ID[game], i] = store.read_episode(i)
    return out


def _batches(sampler: SegmentSampler, n: int) -> list[dict[str, np.ndarray]]:
    """n batches, copied out of the sampler's buffers."""
    return [{k: v.numpy().copy() for k, v in vars(sampler.sample()).items() if v is not None} for _ in range(n)]


def _check_segment(b: dict[str, np.ndarray], i: int, episodes, games: list[str], max_len: dict | None = None) -> tuple:
    """Assert segment i equals its episode's slice (padding included); return (dataset id, episode, start)."""
    first = b["obs"][i, 0]
    key, start = (int(first[0, 0]), int(first[0, 1])), int(first[0, 2])
    ep = episodes[key]
    t = ep.length if max_len is None else min(ep.length, max_len.get(key, ep.length))
    n = min(H, t - start)
    assert n >= 1, f"segment starts at {start}, past the {t} usable steps"
    np.testing.assert_array_equal(b["mask"][i], np.arange(H) < n)
    np.testing.assert_array_equal(b["obs"][i, : n + 1], ep.observations[start: start + n + 1])
    np.testing.assert_array_equal(b["obs"][i, n + 1:], np.broadcast_to(ep.observations[start + n], (H - n, 84, 84)))
    np.testing.assert_array_equal(b["actions"][i, :n], ep.actions[start: start + n])
    np.testing.assert_array_equal(b["rewards"][i, :n], ep.rewards[start: start + n])
    np.testing.assert_array_equal(b["terminations"][i, :n], ep.terminations[start: start + n])
    truncs = ep.truncations[start: start + n].copy()
    if t < ep.length and start + n == t:  # an episode cut by max_transitions ends truncated where it was cut
        truncs[-1] = True
    np.testing.assert_array_equal(b["truncations"][i, :n], truncs)
    # a_H, the action of the last frame, where that frame is a usable step; -1 otherwise
    assert b["next_action"][i] == (ep.actions[start + H] if start + H < t else -1)
    for name in ("actions", "rewards", "terminations", "truncations"):
        assert not b[name][i, n:].any(), f"padding of {name} must be zero"
    game = next(g for g, d in DATASET_ID.items() if d == key[0])
    assert games[b["game_ids"][i]] == game
    np.testing.assert_array_equal(b["legal_actions"][i], legal_action_mask(game))
    return key[0], key[1], start


@pytest.mark.parametrize("in_memory", [True, False])
def test_segments_equal_the_stored_slices_with_padding_at_episode_ends(root, episodes, in_memory):
    with SegmentSampler([root], horizon=H, batch_size=64, seed=1, in_memory=in_memory, prefetch=0) as s:
        assert s.games == ["Breakout", "Pong"] and s.source == "frames"
        assert s.num_transitions == sum(map(sum, LENGTHS.values()))
        batches = _batches(s, 6)
    b0 = batches[0]
    assert b0["obs"].shape == (64, H + 1, 84, 84) and b0["obs"].dtype == np.uint8
    assert b0["actions"].dtype == np.int64 and b0["rewards"].dtype == np.float32 and b0["mask"].dtype == bool
    seen = [_check_segment(b, i, episodes, ["Breakout", "Pong"]) for b in batches for i in range(64)]
    ended = [s for s in seen if s[2] + H > episodes[s[0], s[1]].length]
    assert len(ended) > 20, "too few segments reached an episode end to test padding"
    assert any(b["terminations"].any() for b in batches)


def test_episodes_shorter_than_the_horizon_and_starts_cover_every_step(root, episodes):
    with SegmentSampler([root], horizon=H, batch_size=256, seed=2, prefetch=0) as s:
        batches = _batches(s, 8)
    starts = {_check_segment(b, i, episodes, s.games) for b in batches for i in range(256)}
    # every transition of the 3-step Pong episode 0 (shorter than H) is a start
    assert {st for d, e, st in starts if (d, e) == (1, 0)} == {0, 1, 2}
    assert len(starts) == s.num_transitions, "uniform starts over 2048 draws should hit all 122 transitions"


def test_weights_are_respected(root):
    total = {g: sum(v) for g, v in LENGTHS.items()}
    n = 256 * 20

    def pong_fraction(**kw) -> float:
        with SegmentSampler([root], horizon=H, batch_size=256, seed=3, prefetch=0, **kw) as s:
            pong = s.games.index("Pong")
            return float(np.mean([(s.sample().game_ids == pong).float().mean().item() for _ in range(20)]))

    expected = total["Pong"] / (total["Pong"] + total["Breakout"])  # default: in proportion to transitions
    tol = 4 * np.sqrt(0.25 / n)  # 4 sigma
    assert abs(pong_fraction() - expected) < tol
    assert abs(pong_fraction(weights={"Pong": 3.0, "Breakout": 1.0}) - 0.75) < tol
    with SegmentSampler([root], horizon=H, batch_size=8, prefetch=0) as s:
        order = [TrajectoryStore.open(p).game for p in s.datasets]
    per_dataset = [0.1 if g == "Pong" else 0.9 for g in order]
    assert abs(pong_fraction(weights=per_dataset) - 0.1) < tol
    with pytest.raises(DataError, match="weights"):
        SegmentSampler([root], horizon=H, weights=[1.0], prefetch=0)
    with pytest.raises(DataError, match="Seaquest"):
        SegmentSampler([root], horizon=H, weights={"Seaquest": 1.0}, prefetch=0)


def test_same_seed_same_batches_with_or_without_prefetch_and_ram(root):
    runs = []
    for prefetch in (0, 3):
        for in_memory in (True, False):
            with SegmentSampler([root], horizon=H, batch_size=16, seed=7, prefetch=prefetch, in_memory=in_memory) as s:
                runs.append(_batches(s, 5))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with SegmentSampler([root], horizon=H, batch_size=16, seed=8, prefetch=0) as s:
        other = _batches(s, 1)[0]
    assert not np.array_equal(other["obs"], runs[0][0]["obs"]), "another seed must give other batches"


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_dict_resumes_exactly(root, prefetch):
    kw = dict(horizon=H, batch_size=8, seed=11, prefetch=prefetch)
    with SegmentSampler([root], **kw) as a:
        _batches(a, 5)
        time.sleep(0.05)  # let the producer run ahead of the consumer
        state = json.loads(json.dumps(a.state_dict()))  # plain data
        expected = _batches(a, 4)
        a.load_state_dict(state)  # rewind the same sampler
        again = _batches(a, 4)
    with SegmentSampler([root], **{**kw, "prefetch": 2 - prefetch, "seed": 0}) as b:
        _batches(b, 2)
        b.load_state_dict(state)  # a fresh sampler (other seed and prefetch) takes the seed from the state
        resumed = _batches(b, 4)
    for run in (again, resumed):
        for x, y in zip(expected, run):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    with SegmentSampler([root], **{**kw, "batch_size": 9}) as c:
        with pytest.raises(DataError, match="batch_size"):
            c.load_state_dict(state)
        c.load_state_dict(state, strict=False)
        assert c.sample().obs.shape[0] == 9


def test_a_held_batch_is_not_overwritten_by_prefetching(root):
    with SegmentSampler([root], horizon=H, batch_size=8, seed=5, prefetch=2) as s:
        prev = s.sample()
        prev_copy = {k: v.clone() for k, v in vars(prev).items() if v is not None}
        for _ in range(10):
            cur = s.sample()
            cur_copy = {k: v.clone() for k, v in vars(cur).items() if v is not None}
            time.sleep(0.02)  # the producer fills every buffer it may
            assert cur.obs.data_ptr() != prev.obs.data_ptr()
            for k in cur_copy:  # the current and the previous batch stay intact
                assert torch.equal(getattr(cur, k), cur_copy[k]), k
                assert torch.equal(getattr(prev, k), prev_copy[k]), k
            prev, prev_copy = cur, cur_copy
        s.load_state_dict(s.state_dict())  # restarting the producer must not reuse the held buffers either
        cur = s.sample()
        time.sleep(0.02)
        for k in prev_copy:
            assert torch.equal(getattr(prev, k), prev_copy[k]), k


def test_max_transitions_uses_only_the_first_transitions(root, episodes):
    limit = 3 + 9 + 5  # Pong episodes 0, 1 in full and the first 5 steps of episode 2; Breakout: 12 + 5 of ep 1
    cut = {(1, 2): 5, (2, 1): 5}
    with SegmentSampler([root], horizon=H, batch_size=128, seed=4, prefetch=0, max_transitions=limit) as s:
        assert s.num_transitions == 2 * limit
        batches = _batches(s, 6)
    seen = {_check_segment(b, i, episodes, s.games, max_len=cut) for b in batches for i in range(128)}
    allowed = {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)}
    assert {(d, e) for d, e, _ in seen} == allowed
    assert max(st for d, e, st in seen if (d, e) == (1, 2)) <= 4
    # the cut is marked: segments reaching the cut's last step carry a truncation there, and nothing else
    cut_ends = [(b["truncations"][i] & b["mask"][i]).any() for b in batches for i in range(128)
                if tuple(b["obs"][i, 0][0, :2]) in cut]
    assert any(cut_ends) and not all(cut_ends)


def test_monte_carlo_returns_are_the_episodes_own_with_unknown_tails(root, episodes):
    """`returns=(gamma, transform)`: each step's G_t is its whole episode's discounted return from that step
    (rewards transformed), NaN on padding and on a truncated episode's last TRUNCATION_MARGIN steps."""
    from wam.datasets.returns import TRUNCATION_MARGIN
    gamma = 0.9
    limit = 3 + 9 + 5  # Pong episode 2 is cut after 5 of its 17 steps: truncated (Breakout episode 1 ends there)
    with SegmentSampler([root], horizon=H, batch_size=128, seed=4, prefetch=0, max_transitions=limit,
                        returns=(gamma, "clip")) as s:
        batches = _batches(s, 4)
    assert TRUNCATION_MARGIN >= 5  # so every step of a cut episode has an unknown return
    known = 0
    for b in batches:
        for i in range(128):
            d, e, start = (int(x) for x in (b["obs"][i, 0][0, 0], b["obs"][i, 0][0, 1], b["obs"][i, 0][0, 2]))
            n = int(b["mask"][i].sum())
            assert np.isnan(b["mc_return"][i, n:]).all()
            if (d, e) == (1, 2):
                assert np.isnan(b["mc_return"][i, :n]).all()
                continue
            r = np.clip(episodes[d, e].rewards, -1, 1).astype(np.float64)
            want = [sum(gamma ** k * r[t + k] for k in range(len(r) - t)) for t in range(start, start + n)]
            np.testing.assert_allclose(b["mc_return"][i, :n], want, rtol=1e-5)
            known += n
    assert known > 500
    with SegmentSampler([root], horizon=H, batch_size=8, seed=4, prefetch=0) as s:
        assert s.sample().mc_return is None  # not asked for
    with pytest.raises(ValueError, match="returns must be"):
        SegmentSampler([root], horizon=H, batch_size=8, returns=(0.99, "log"))


def test_held_out_episodes_are_never_drawn(root, episodes):
    """hold_out_episodes=1: no segment of a dataset's last episode; held_out() names them; too many is an error."""
    counts = {d: sum(1 for (dd, _) in episodes if dd == d) for d in DATASET_ID.values()}
    with SegmentSampler([root], horizon=H, batch_size=128, seed=4, prefetch=0, hold_out_episodes=1) as s:
        held = s.held_out()
        batches = _batches(s, 6)
        assert s.num_transitions == sum(ep.length for (d, e), ep in episodes.items() if e < counts[d] - 1)
    assert sorted((DATASET_ID[TrajectoryStore.open(p).game], e) for p, e in held) == sorted(
        (d, n - 1) for d, n in counts.items())
    seen = {(d, e) for d, e, _ in (_check_segment(b, i, episodes, s.games) for b in batches for i in range(128))}
    assert seen == {(d, e) for (d, e) in episodes if e < counts[d] - 1}
    with pytest.raises(DataError, match="leaves none to train on"):
        SegmentSampler([root], horizon=H, batch_size=8, prefetch=0, hold_out_episodes=max(counts.values()))


def test_token_source(tmp_path):
    directory = _write(tmp_path, "Pong", [7, 20, 11], tokens=True)
    store = TrajectoryStore.open(directory)
    tokens = {i: store.read_episode(i, tokens=True).obs_tokens for i in range(store.num_episodes)}
    for in_memory in (True, False):
        with SegmentSampler([directory], horizon=H, batch_size=32, seed=0, prefetch=0, in_memory=in_memory) as s:
            assert s.source == "tokens"  # auto: every dataset has a cache
            b = s.sample()
        assert b.is_tokens and b.obs.shape == (32, H + 1, 36) and b.obs.dtype == torch.int64
        with SegmentSampler([directory], horizon=H, batch_size=32, seed=0, prefetch=0, source="frames") as f:
            frames = f.sample().obs.numpy()
        for i in range(32):
            e, start = int(frames[i, 0, 0, 1]), int(frames[i, 0, 0, 2])
            n = int(b.mask[i].sum())
            stop = start + n
            np.testing.assert_array_equal(b.obs[i, : n + 1].numpy(), tokens[e][start: stop + 1])
            np.testing.assert_array_equal(b.obs[i, n + 1:].numpy(), np.broadcast_to(tokens[e][stop], (H - n, 36)))


def test_missing_sources_and_short_data_are_data_errors(root, tmp_path):
    with pytest.raises(DataError, match="token cache"):
        SegmentSampler([root], source="tokens", prefetch=0)
    empty = dataset_dir(tmp_path, "Pong", "empty")
    TrajectoryStore.create(empty, game="Pong", provenance={"protocol": "jowa", "policy": "random"})
    with pytest.raises(DataError, match="empty"):
        SegmentSampler([empty], prefetch=0)
    short = _write(tmp_path, "Breakout", [2, 3])
    with pytest.raises(DataError, match="only 5 transition"):
        SegmentSampler([short], horizon=8, prefetch=0)
    with pytest.raises(DataError, match="does not exist"):
        SegmentSampler([tmp_path / "nope"])
    with pytest.raises(DataError, match="game_names"):
        SegmentSampler([root], game_names=["Pong"], prefetch=0)


def test_a_damaged_chunk_is_a_data_error_from_the_prefetch_thread(tmp_path):
    import h5py

    directory = _write(tmp_path, "Pong", [40, 40])
    path = directory / "data" / "main_data.hdf5"
    with h5py.File(path, "r") as f:
        offsets = [f[f"episode_{i}/observations"].id.get_chunk_info(0).byte_offset for i in range(2)]
    with open(path, "r+b") as f:  # flip a byte inside the first compressed chunk of every episode
        for off in offsets:
            f.seek(off + 100)
            byte = f.read(1)
            f.seek(off + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
    with SegmentSampler([directory], horizon=H, batch_size=64, prefetch=2, in_memory=False) as s:
        for _ in range(2):  # the error is raised again, never a hang
            with pytest.raises(DataError, match="validate"):
                s.sample()
    with pytest.raises(DataError, match="validate"):  # loading into RAM reads every chunk
        SegmentSampler([directory], horizon=H, in_memory=True)


def test_game_names_fix_the_ids(root):
    names = ["Seaquest", "Pong", "Atlantis", "Breakout"]
    with SegmentSampler([root], horizon=H, batch_size=64, seed=0, game_names=names, prefetch=1) as s:
        b = next(iter(s))
    assert s.games == names
    assert set(b.game_ids.tolist()) == {1, 3}
    for i in range(64):
        np.testing.assert_array_equal(b.legal_actions[i].numpy(), legal_action_mask(names[int(b.game_ids[i])]))
        assert int(b.obs[i, 0, 0, 0]) == DATASET_ID[names[int(b.game_ids[i])]]


def test_close_stops_the_prefetch_thread(root):
    s = SegmentSampler([root], horizon=H, batch_size=8, prefetch=2)
    s.sample()
    thread = s._holder["producer"].thread
    assert thread.is_alive()
    s.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        s.sample()


def test_real_ale_frames(tmp_path):
    from wam.datasets.atari import make_env
    from wam.datasets.collect import run_episode
    from wam.datasets.policies import make_policy

    game = "Breakout"
    env = make_env(game, seed=0, max_episode_steps=60)
    arrays = run_episode(env, make_policy("random", game), legal_action_mask(game), seed=0)
    env.close()
    directory = dataset_dir(tmp_path, game, "real")
    store = TrajectoryStore.create(directory, game=game, provenance={"protocol": "jowa", "policy": "random"})
    with store.writer() as w:
        w.append(Episode(**arrays, seed=0))
    ep = TrajectoryStore.open(directory).read_episode(0)
    assert ep.length == 60 and ep.observations.std() > 0, "expected 60 steps of real, non-blank frames"
    with SegmentSampler([directory], horizon=8, batch_size=16, seed=0, prefetch=0, in_memory=False) as s:
        b = s.sample()
    for i in range(16):  # real frames repeat, so find the start by the whole window
        n = int(b.mask[i].sum())
        starts = [t for t in range(60) if min(8, 60 - t) == n and np.array_equal(ep.observations[t: t + n + 1], b.obs[i, : n + 1].numpy())
                  and np.array_equal(ep.actions[t: t + n], b.actions[i, :n].numpy())]
        assert starts, f"segment {i} is no slice of the stored episode"
    assert (b.legal_actions == torch.from_numpy(legal_action_mask(game).copy())).all()
