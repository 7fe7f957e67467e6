"""`wam bench tokenizer`: speed and quality of the VQ-VAE frame tokenizer, against references of the same run.

For the `debug` and `small` presets, in fp32 and bf16 (`torch.autocast`):

- **train images/s**: median time of a full training step (forward, loss, backward, clipping, AdamW) on
  real Atari frames; **encode frames/s**: `VQTokenizer.encode` (no gradients);
- **achieved FLOP/s as a fraction of the 2048^2 matmul peak** of the same dtype measured in this run;
  FLOPs per frame are counted from the layers (`VQTokenizer.flops_per_frame`: 2 x multiply-adds of every
  convolution and of the codebook search); a training step counts 3 x the forward FLOPs;
- **held-out quality**: each preset trained by `train_tokenizer` on random-policy episodes of Zaxxon and
  TimePilot (last episode of each held out): held-out PSNR, the mean-frame baseline's PSNR, their
  difference, and codebook usage on the held-out frames. `quick=True` trains a few steps only (a smoke
  run, < 90 s on 2 idle cores); the full run trains debug for its preset's 600 steps and small for 1,500
  (not its preset's 5,000: tens of minutes).

The machine may be shared: the JSON records the load average before and after.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

GAMES = ("Zaxxon", "TimePilot")


def _collect(root: Path, episodes: int, max_steps: int) -> list[Path]:
    """Random-policy episodes of GAMES written through the trajectory store."""
    from wam.datasets.atari import legal_action_mask, make_env
    from wam.datasets.collect import run_episode
    from wam.datasets.policies import make_policy
    from wam.datasets.store import Episode, TrajectoryStore, dataset_dir

    dirs = []
    for k, game in enumerate(GAMES):
        env, policy = make_env(game, seed=k, max_episode_steps=max_steps), make_policy("random", game)
        store = TrajectoryStore.create(dataset_dir(root, game, "random"), game=game,
                                       provenance={"protocol": "jowa", "policy": "random", "seed": k})
        with store.writer(commit_every=episodes) as w:
            for i in range(episodes):
                w.append(Episode(**run_episode(env, policy, legal_action_mask(game), seed=100 * k + i)))
        dirs.append(store.directory)
    return dirs


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _speed_one(preset: str, precision: str, frames: np.ndarray, peak: float, reps: int) -> dict[str, Any]:
    """Train and encode throughput of one preset in one precision."""
    from wam.worldmodel.tokenizer import TokenizerConfig, TokenizerTrainConfig, build_tokenizer
    from wam.worldmodel.tokenizer_train import make_optimizer

    cfg, train = TokenizerConfig.from_preset(preset), TokenizerTrainConfig.from_preset(preset)
    model = build_tokenizer(cfg, seed=train.seed)
    flops = model.flops_per_frame()
    opt = make_optimizer(model, train)
    batch = torch.from_numpy(frames[np.random.default_rng(0).integers(0, len(frames), train.batch_size)])
    enc = torch.from_numpy(frames[:256])

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast():
            loss, _ = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()

    def encode():
        with autocast():
            model.encode(enc, batch_size=256)

    model.train()
    train_ips = train.batch_size / _median_time(step, reps)
    enc_fps = len(enc) / _median_time(encode, reps)
    enc_flops = flops["encoder"] + flops["quantizer"]
    return {
        "train_images_per_s": train_ips, "encode_frames_per_s": enc_fps,
        "train_flops_per_s": train_ips * 3 * flops["total"], "encode_flops_per_s": enc_fps * enc_flops,
        "train_peak_fraction": train_ips * 3 * flops["total"] / peak,
        "encode_peak_fraction": enc_fps * enc_flops / peak,
        "batch_size": train.batch_size, "gflops_per_frame_forward": flops["total"] / 1e9,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def _speed(preset: str, frames: np.ndarray, peaks: dict[str, float], reps: int) -> dict[str, Any]:
    return {prec: _speed_one(preset, prec, frames, peaks[prec], reps) for prec in peaks}


def _quality(preset: str, dirs: list[Path], steps: int, work: Path) -> dict[str, Any]:
    from wam.worldmodel.tokenizer import TokenizerConfig, TokenizerTrainConfig
    from wam.worldmodel.tokenizer_train import train_tokenizer

    cfg, preset_train = TokenizerConfig.from_preset(preset), TokenizerTrainConfig.from_preset(preset)
    train = dataclasses.replace(preset_train, steps=steps, eval_every=steps, plot_every=steps,
                                checkpoint_every=steps, warmup_steps=min(preset_train.warmup_steps, steps // 5 + 1))
    t0 = time.perf_counter()
    r = train_tokenizer(cfg, train, dirs, work / f"run-{preset}", progress=False)
    e = r.eval
    return {"steps": steps, "seconds": time.perf_counter() - t0, "heldout_psnr": e.psnr,
            "baseline_psnr": e.baseline_psnr, "psnr_gain_db": e.psnr - e.baseline_psnr, "usage": e.usage,
            "perplexity": e.perplexity, "codebook_size": cfg.codebook_size, "train_images_per_s": r.images_per_s,
            "fg_gain_db": e.fg_gain, "fg_psnr": e.fg_psnr, "fg_baseline_psnr": e.fg_baseline_psnr,
            "fg_fraction": e.fg_fraction}


def run(quick: bool = False) -> dict:
    from wam.runs.bench import machine_info
    from wam.worldmodel.device import bf16_is_fast, matmul_peak_flops

    load_before = os.getloadavg()
    peaks = {"fp32": matmul_peak_flops(torch.float32)}
    if bf16_is_fast("cpu"):  # else bf16 is emulated (~100x slower): not timed, no MFU over a meaningless peak
        peaks["bf16"] = matmul_peak_flops(torch.bfloat16)
    work = Path(tempfile.mkdtemp(prefix="wam-bench-tokenizer-"))
    try:
        dirs = _collect(work / "data", episodes=3 if quick else 6, max_steps=100 if quick else 200)
        from wam.datasets.store import TrajectoryStore

        frames = np.concatenate([TrajectoryStore.open(d).read_episode(0).observations for d in dirs])
        speed = {p: _speed(p, frames, peaks, reps=2 if quick else 6) for p in ("debug", "small")}
        steps = {"debug": 20, "small": 5} if quick else {"debug": 600, "small": 1500}
        quality = {p: _quality(p, dirs, steps[p], work) for p in ("debug", "small")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quick": quick, "games": list(GAMES), "matmul_peak_flops": peaks, "speed": speed, "quality": quality,
            "machine": {**machine_info(), "load_before": list(load_before), "load_after": list(os.getloadavg())}}


def markdown(result: dict) -> str:
    peaks = result["matmul_peak_flops"]
    lines = [
        "### Tokenizer (VQ-VAE, 84x84 frame -> 36 tokens)",
        "",
        f"Matmul peak (2048^2) measured in the same run: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
        + (f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s." if "bf16" in peaks
           else "bf16 unsupported here (no AVX-512-bf16/AMX: not timed)."),
        "",
        "| preset | precision | train images/s | train FLOP/s / peak | encode frames/s | encode FLOP/s / peak |",
        "|---|---|---|---|---|---|",
    ]
    for preset, s in result["speed"].items():
        for prec in s:
            x = s[prec]
            lines.append(f"| {preset} | {prec} | {x['train_images_per_s']:.0f} | {x['train_peak_fraction']:.1%} | "
                         f"{x['encode_frames_per_s']:.0f} | {x['encode_peak_fraction']:.1%} |")
    lines += ["", f"Held-out quality (random-policy episodes of {', '.join(result['games'])}; last episode of each "
              "held out):", "",
              "| preset | steps | held-out PSNR (dB) | mean-frame baseline (dB) | gain (dB) | foreground gain over "
              "the median frame (dB, per game) | codebook usage |",
              "|---|---|---|---|---|---|---|"]
    for preset, q in result["quality"].items():
        fg = ", ".join(f"{g} {v:+.1f}" for g, v in q.get("fg_gain_db", {}).items()) or "n/a"
        lines.append(f"| {preset} | {q['steps']} | {q['heldout_psnr']:.2f} | {q['baseline_psnr']:.2f} | "
                     f"{q['psnr_gain_db']:+.2f} | {fg} | {q['usage']:.0%} of {q['codebook_size']} |")
    m = result["machine"]
    lines += ["", f"Machine: {m.get('cpu_model', m.get('processor'))}, {m.get('cpus')} CPUs, torch {m.get('torch')}; "
              f"load average before/after {m['load_before'][0]:.1f}/{m['load_after'][0]:.1f}"
              + (" (quick run)" if result.get("quick") else "") + "."]
    return "\n".join(lines)
