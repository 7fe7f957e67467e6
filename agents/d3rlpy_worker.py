"""Train a d3rlpy DiscreteCQL / DiscreteBC policy on a wam export; run by `wam baseline train` in `.venv-baselines`.

This file is a script, not a wam module: it runs under the Python of `.venv-baselines` (made by
`make baselines`; d3rlpy 2.8.1 pins gymnasium 1.0.0, so it never enters wam's own environment) and
imports only numpy, h5py, torch and d3rlpy — never `wam`:

    .venv-baselines/bin/python agents/d3rlpy_worker.py --export RUN/d3rlpy_data.h5 --config RUN/d3rlpy_config.json --out RUN

Input: the export written by `wam.agents.d3rlpy_agent.export_for_d3rlpy` (frames uint8 [F, 84, 84]
with F = sum of T_i + 1, actions as indices into the game's legal-action list, sign-clipped rewards,
terminal and timeout flags per step, episode lengths T_i) and the settings JSON the command wrote.

Dataset: one d3rlpy `Episode` per wam episode in a `ReplayBuffer` with `FrameStackTransitionPicker(4)`,
as d3rlpy's Atari loader (`d3rlpy.datasets.get_atari_transitions(num_stack=4)`) builds it: frames get a
channel axis ([T, 1, 84, 84]) and are stacked at sampling time, the 3 frames before an episode's
first one being zeros. A terminated episode gives its T frames and `terminated=True` (the last step
bootstraps from nothing); a truncated one gives its T + 1 frames (the last one only as a next
observation, with a dummy action and reward) and `terminated=False`, so d3rlpy's `transition_count`
is T in both cases and a time-out is never taken for a game over.

Output: `policy.pt` (d3rlpy's `save_policy`: TorchScript of scaler + greedy argmax; input float32
[N, 4, 84, 84] of raw pixel values 0..255, output int64 [N] legal-action indices), `d3rlpy_model.d3`
(`algo.save`, reloadable with `d3rlpy.load_learnable`), and on stdout one `@wam {json}` line per event
(`start`, `metrics` every `log_every` steps, `done`), which the command turns into metrics.jsonl and
a progress bar. Ctrl-C stops at the next step and still saves the policy (`"interrupted": true`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

PROTOCOL_PREFIX = "@wam "
"""Start of the stdout lines the command parses (d3rlpy's own log lines are passed through to worker.log)."""
FRAME_STACK = 4


def emit(event: str, **fields) -> None:
    print(PROTOCOL_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def load_export(path: Path):
    """The export's arrays and attributes: a dict of numpy arrays and a dict of attributes."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                        "episode_lengths")}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    lengths = arrays["episode_lengths"].astype(np.int64)
    assert arrays["observations"].shape[0] == int((lengths + 1).sum()), "export: frames != sum(T + 1)"
    assert arrays["actions"].shape[0] == int(lengths.sum()), "export: steps != sum(T)"
    return arrays, attrs


def build_episodes(arrays: dict):
    """One d3rlpy `Episode` per exported episode (see the module docstring for terminal vs truncated)."""
    import numpy as np
    from d3rlpy.dataset import Episode

    obs, acts, rews = arrays["observations"], arrays["actions"], arrays["rewards"]
    terms, outs = arrays["terminals"], arrays["timeouts"]
    episodes = []
    f0 = s0 = 0
    for t in arrays["episode_lengths"].tolist():
        frames = obs[f0:f0 + t + 1, None]  # [T+1, 1, 84, 84] uint8 (a view)
        a = acts[s0:s0 + t].astype(np.int64).reshape(-1, 1)  # [T, 1]
        r = rews[s0:s0 + t].astype(np.float32).reshape(-1, 1)  # [T, 1]
        terminated = bool(terms[s0 + t - 1])
        assert terminated != bool(outs[s0 + t - 1]), "export: an episode must end by a terminal or a timeout"
        if terminated:
            episodes.append(Episode(observations=frames[:t], actions=a, rewards=r, terminated=True))
        else:  # keep the final frame as the last next-observation: pad one dummy step after it
            a = np.concatenate([a, np.zeros((1, 1), np.int64)])
            r = np.concatenate([r, np.zeros((1, 1), np.float32)])
            episodes.append(Episode(observations=frames, actions=a, rewards=r, terminated=False))
        f0 += t + 1
        s0 += t
    return episodes


def build_algo(cfg: dict, action_size: int):
    """The d3rlpy algorithm of `cfg["algo"]` with the settings the command resolved (all given explicitly)."""
    import d3rlpy

    common = dict(
        learning_rate=cfg["learning_rate"],
        batch_size=cfg["batch_size"],
        optim_factory=d3rlpy.optimizers.AdamFactory(eps=cfg["adam_eps"]),
        encoder_factory=d3rlpy.models.encoders.PixelEncoderFactory(),  # Nature-DQN convs, 512 features
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler(),  # x / 255
    )
    if cfg["algo"] == "discrete-cql":
        q_func = (d3rlpy.models.q_functions.QRQFunctionFactory(n_quantiles=cfg["n_quantiles"])
                  if cfg["n_quantiles"] > 0 else d3rlpy.models.q_functions.MeanQFunctionFactory())
        return d3rlpy.algos.DiscreteCQLConfig(
            **common, gamma=cfg["gamma"], alpha=cfg["alpha"], target_update_interval=cfg["target_update_interval"],
            q_func_factory=q_func,
        ).create(device=False)
    if cfg["algo"] == "discrete-bc":
        return d3rlpy.algos.DiscreteBCConfig(**common, beta=cfg["beta"]).create(device=False)
    raise SystemExit(f"unknown algo {cfg['algo']!r}")


def train(export: Path, cfg: dict, out: Path) -> int:
    import d3rlpy
    import torch
    from d3rlpy.algos.utility import build_scalers_with_transition_picker
    from d3rlpy.constants import ActionSpace
    from d3rlpy.dataset import (
        FrameStackTrajectorySlicer,
        FrameStackTransitionPicker,
        InfiniteBuffer,
        ReplayBuffer,
    )

    torch.set_num_threads(int(cfg["threads"]))
    d3rlpy.seed(int(cfg["seed"]))  # python, numpy (d3rlpy samples with np.random), torch
    arrays, attrs = load_export(export)
    action_size = len(json.loads(attrs["legal_ids"]))
    dataset = ReplayBuffer(InfiniteBuffer(), episodes=build_episodes(arrays),
                           transition_picker=FrameStackTransitionPicker(FRAME_STACK),
                           trajectory_slicer=FrameStackTrajectorySlicer(FRAME_STACK),
                           action_space=ActionSpace.DISCRETE, action_size=action_size)
    algo = build_algo(cfg, action_size)
    build_scalers_with_transition_picker(algo, dataset)  # what `algo.fit` does first (the pixel scaler needs no fit)
    algo.build_with_dataset(dataset)
    emit("start", transitions=int(dataset.transition_count), episodes=len(dataset.episodes),
         action_size=action_size, d3rlpy_version=d3rlpy.__version__, torch_version=torch.__version__)

    steps, log_every = int(cfg["steps"]), int(cfg["log_every"])
    sums: dict[str, float] = {}
    count = 0
    t0 = time.perf_counter()
    step = 0
    interrupted = False
    try:
        while step < steps:
            losses = algo.update(dataset.sample_transition_batch(algo.config.batch_size))
            step += 1
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if step % log_every == 0 or step == steps:
                emit("metrics", step=step, seconds=time.perf_counter() - t0,
                     **{k: v / count for k, v in sums.items()})
                sums, count = {}, 0
    except KeyboardInterrupt:
        interrupted = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # saving must not be cut short by a second Ctrl-C
    if count:
        emit("metrics", step=step, seconds=time.perf_counter() - t0, **{k: v / count for k, v in sums.items()})
    seconds = time.perf_counter() - t0
    if step == 0:
        emit("done", steps=0, seconds=seconds, interrupted=interrupted, policy=None)
        return 0
    algo.save_policy(str(out / "policy.pt"))
    algo.save(str(out / "d3rlpy_model.d3"))
    emit("done", steps=step, seconds=seconds, interrupted=interrupted, policy="policy.pt",
         model="d3rlpy_model.d3", steps_per_second=step / seconds if seconds > 0 else 0.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="HDF5 export written by `wam baseline train`")
    p.add_argument("--config", type=Path, required=True, help="settings JSON written by `wam baseline train`")
    p.add_argument("--out", type=Path, required=True, help="run directory for policy.pt and d3rlpy_model.d3")
    args = p.parse_args(argv)
    try:
        import d3rlpy  # noqa: F401
        import h5py  # noqa: F401
    except ImportError as e:
        emit("error", message=f"{sys.executable} cannot import {e.name} ({e}); run `make baselines` to create "
                              ".venv-baselines with d3rlpy 2.8.1, h5py and numpy")
        return 3
    return train(args.export, json.loads(args.config.read_text()), args.out)


if __name__ == "__main__":
    sys.exit(main())
