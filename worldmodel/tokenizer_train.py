"""Training the frame tokenizer, and encoding datasets into the token cache.

`train_tokenizer(cfg, data, out)` trains a `VQTokenizer` on single frames of one or more datasets:

- **Held-out episodes.** The last `holdout_fraction` of each dataset's episodes (at least one; a dataset
  with a single episode gives none) are never trained on; every `eval_interval` steps a fixed set of
  `eval_frames` frames spread evenly over them is encoded and decoded: held-out PSNR (from the mean squared
  error over all those pixels), codebook usage (fraction of the codes that occur) and perplexity, beside the
  PSNR of the **mean-frame baseline** (each dataset's per-pixel mean training frame, predicting every frame).
- **Frames.** A `FramePool` keeps up to `pool_frames` training frames in RAM: every training episode when
  they fit, otherwise random windows of `pool_window` frames, a quarter of them replaced every
  `pool_refresh_interval` steps. Batches are drawn uniformly from the pool.
- **Loop.** AdamW (warm-up, cosine decay to 10 %), gradient clipping, optional bf16 autocast, a tqdm bar,
  `metrics.jsonl` rows (training averages every `log_interval` steps, held-out figures at evaluations),
  a PNG grid of held-out frames beside their reconstructions every `plot_interval` steps
  (`plots/recon_step_XXXXXXXX.png`, matplotlib's Agg canvas), atomic self-describing checkpoints of kind
  "tokenizer" (config, weights, optimizer, step, RNG states, pool and sampler state, tokenizer id, data,
  the last evaluation). `resume=True` continues from the newest checkpoint exactly (same batches, same
  weights as an uninterrupted run on CPU). Ctrl-C finishes the step, saves and raises KeyboardInterrupt.

`encode_datasets(tokenizer, dirs)` writes every frame's tokens (uint16 `[T+1, 36]` per episode) into each
dataset's token cache through `TrajectoryStore.write_tokens`, tagged with the tokenizer id. It is
idempotent (datasets already cached by this tokenizer are skipped; episodes appended since are encoded)
and refuses, before encoding anything, datasets cached by another tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wam.datasets.errors import DataError, WamError
from wam.datasets.files import atomic_write_bytes
from wam.datasets.store import TrajectoryStore, find_datasets
from wam.worldmodel.checkpoint import (
    RunDir,
    config_to_dict,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from wam.worldmodel.device import resolve_device
from wam.worldmodel.tokenizer import (
    CHECKPOINT_KIND,
    FRAME_SIZE,
    TokenizerConfig,
    VQTokenizer,
    build_tokenizer,
    foreground_fidelity,
    load_tokenizer,
    psnr,
)
from wam.worldmodel.trainer import StopFlag

log = logging.getLogger(__name__)

LOG_INTERVAL = 10
"""Steps between two rows of training averages in metrics.jsonl."""
PLOT_FRAMES = 8
"""Held-out frames shown in each reconstruction grid."""

__all__ = ["EncodeSummary", "EvalResult", "FramePool", "TrainResult", "encode_datasets", "fg_gains", "gains_text",
           "load_tokenizer", "split_episodes", "train_tokenizer"]


# ------------------------------------------------------------------------------------------ data
def split_episodes(stores: Sequence[TrajectoryStore], holdout_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dataset: (training episode ids, held-out episode ids); the held-out ones are the last episodes.

    A dataset of E >= 2 episodes holds out max(1, round(fraction * E)) of them; a single-episode dataset
    only trains. At least one episode over all datasets must be held out, and one trained on.
    """
    splits = []
    for s in stores:
        e = s.num_episodes
        n_out = 0 if e < 2 else min(e - 1, max(1, round(holdout_fraction * e)))
        splits.append((np.arange(e - n_out), np.arange(e - n_out, e)))
    if not any(len(h) for _, h in splits):
        raise DataError("tokenizer training holds out whole episodes for evaluation, but every dataset has fewer "
                        "than 2 episodes; collect more episodes (e.g. `wam data collect --episodes 10`)")
    if not any(len(t) for t, _ in splits):
        raise DataError("no training episodes left after holding out the evaluation episodes")
    return splits


class FramePool:
    """Training frames in RAM, as a list of windows `(dataset, episode, start, stop)` and their frames.

    When every training frame fits in `capacity`, the windows are whole episodes and never change;
    otherwise they are random `window`-frame windows (dataset by frame count, episode by length, start
    uniform) and `refresh` replaces a share of them. `state_dict` holds the windows, so a resumed run
    reloads exactly the same frames.
    """

    def __init__(self, stores: Sequence[TrajectoryStore], train_episodes: Sequence[np.ndarray], capacity: int,
                 window: int, rng: np.random.Generator, windows: np.ndarray | None = None):
        self.stores, self.capacity, self.window = list(stores), int(capacity), int(window)
        self.lengths = [s.episode_lengths()[ep] + 1 for s, ep in zip(self.stores, train_episodes)]  # frames
        self.train_episodes = [np.asarray(ep, dtype=np.int64) for ep in train_episodes]
        self.total_frames = int(sum(int(n.sum()) for n in self.lengths))
        self.fits = self.total_frames <= self.capacity
        if windows is None:
            windows = self._all_windows() if self.fits else self._random_windows(max(1, capacity // window), rng)
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)  # [W, 4]
        self.frames, self.dataset_of = self._load(self.windows)
        log.info("frame pool: %d frames in RAM (%s) of %d training frames", len(self.frames),
                 "all episodes" if self.fits else f"{len(self.windows)} random windows of {window}", self.total_frames)

    def _all_windows(self) -> np.ndarray:
        rows = [(d, ep, 0, n) for d, (eps, ns) in enumerate(zip(self.train_episodes, self.lengths))
                for ep, n in zip(eps.tolist(), ns.tolist())]
        return np.array(rows, dtype=np.int64).reshape(-1, 4)

    def _random_windows(self, count: int, rng: np.random.Generator) -> np.ndarray:
        per_dataset = np.array([n.sum() for n in self.lengths], dtype=np.float64)
        rows = np.zeros((count, 4), dtype=np.int64)
        for k in range(count):
            d = int(rng.choice(len(per_dataset), p=per_dataset / per_dataset.sum()))
            lengths = self.lengths[d]
            j = int(rng.choice(len(lengths), p=lengths / lengths.sum()))
            n = int(lengths[j])
            start = int(rng.integers(0, max(1, n - self.window + 1)))
            rows[k] = (d, self.train_episodes[d][j], start, min(n, start + self.window))
        return rows

    def _load(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int((windows[:, 3] - windows[:, 2]).sum())
        frames = np.empty((n, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)  # [N, 84, 84]
        dataset_of = np.empty(n, dtype=np.int64)
        at = 0
        for d, ep, start, stop in windows.tolist():
            frames[at:at + stop - start] = self.stores[d].read_window(ep, start, stop, "observations")
            dataset_of[at:at + stop - start] = d
            at += stop - start
        return frames, dataset_of

    def refresh(self, fraction: float, rng: np.random.Generator) -> None:
        """Replace `fraction` of the windows by new random ones (no-op when every frame is in RAM)."""
        if self.fits:
            return
        k = max(1, int(len(self.windows) * fraction))
        replace = rng.choice(len(self.windows), size=k, replace=False)
        self.windows[replace] = self._random_windows(k, rng)
        self.frames, self.dataset_of = self._load(self.windows)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """([B, 84, 84] uint8 frames, [B] dataset index) drawn uniformly (with replacement) from the pool."""
        idx = rng.integers(0, len(self.frames), size=batch_size)
        return self.frames[idx], self.dataset_of[idx]

    def median_frames(self, games: Sequence[str], max_frames: int = 4096) -> np.ndarray:
        """[n_datasets, 84, 84] uint8: each dataset gets the per-pixel median frame of its *game* (all the
        pool's frames of the datasets of that game, or `max_frames` of them drawn evenly): the background
        that foreground fidelity and the foreground-weighted loss measure objects against."""
        out = np.zeros((len(self.stores), FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)
        for game in dict.fromkeys(games):
            members = [d for d, g in enumerate(games) if g == game]
            idx = np.flatnonzero(np.isin(self.dataset_of, members))
            if not len(idx):
                continue
            if len(idx) > max_frames:
                idx = idx[np.linspace(0, len(idx) - 1, num=max_frames).round().astype(np.int64)]
            med = np.median(self.frames[idx], axis=0).round().astype(np.uint8)
            out[members] = med
        return out

    def mean_frames(self) -> np.ndarray:
        """[n_datasets, 84, 84] float32 in [0, 1]: each dataset's per-pixel mean frame over the pool."""
        out = np.zeros((len(self.stores), FRAME_SIZE, FRAME_SIZE), dtype=np.float64)
        for d in range(len(self.stores)):
            sel = self.frames[self.dataset_of == d]
            if len(sel):
                out[d] = sel.mean(axis=0, dtype=np.float64) / 255.0
        return out.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": torch.from_numpy(self.windows.copy())}


def heldout_frames(stores: Sequence[TrajectoryStore], heldout: Sequence[np.ndarray], count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [M, 84, 84], dataset index [M]): up to `count` frames spread evenly over every dataset's
    held-out episodes (an equal share per dataset that has any)."""
    with_heldout = [d for d, h in enumerate(heldout) if len(h)]
    share = max(1, count // len(with_heldout))
    frames, owner = [], []
    for d in with_heldout:
        s = stores[d]
        lengths = s.episode_lengths()[heldout[d]] + 1  # frames per held-out episode
        total = int(lengths.sum())
        picks = np.unique(np.linspace(0, total - 1, num=min(share, total)).round().astype(np.int64))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for j, ep in enumerate(heldout[d].tolist()):
            local = picks[(picks >= starts[j]) & (picks < starts[j] + lengths[j])] - starts[j]
            if len(local):
                obs = s.read_window(ep, int(local[0]), int(local[-1]) + 1, "observations")
                frames.append(obs[local - local[0]])
                owner.append(np.full(len(local), d, dtype=np.int64))
    return np.concatenate(frames), np.concatenate(owner)


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalResult:
    """Held-out figures of one evaluation."""

    psnr: float
    """PSNR (dB) of the reconstructions of the held-out frames (one MSE over all their pixels)."""
    baseline_psnr: float
    """PSNR (dB) of predicting each held-out frame by its dataset's mean training frame."""
    usage: float
    """Fraction of the codebook that occurs in the held-out frames' tokens."""
    perplexity: float
    """exp(entropy) of the held-out token distribution."""
    psnr_per_dataset: list[float]
    """Held-out PSNR of each dataset (NaN for a dataset without held-out episodes)."""
    fg_psnr: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per game: PSNR (dB) of the reconstructions over the held-out foreground pixels (docs/tokenizer.md)."""
    fg_baseline_psnr: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per game: PSNR of the game's median training frame over the same pixels."""
    fg_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per game: fraction of the held-out pixels that are foreground."""

    @property
    def fg_gain(self) -> dict[str, float]:
        """Per game: foreground gain over the median frame (dB), fg_psnr - fg_baseline_psnr."""
        return {g: self.fg_psnr[g] - self.fg_baseline_psnr[g] for g in self.fg_psnr}

    @property
    def fg_gain_min(self) -> float:
        """The smallest per-game foreground gain (dB): the game whose objects the tokens keep worst."""
        gains = [v for v in self.fg_gain.values() if math.isfinite(v)]
        return min(gains) if gains else float("nan")

    def metrics(self) -> dict[str, float]:
        out = {"heldout_psnr": self.psnr, "baseline_psnr": self.baseline_psnr, "heldout_usage": self.usage,
               "heldout_perplexity": self.perplexity}
        if self.fg_psnr:
            out["fg_gain_min"] = self.fg_gain_min
            for g, v in self.fg_gain.items():
                out[f"fg_gain/{g}"] = v
                out[f"fg_psnr/{g}"] = self.fg_psnr[g]
                out[f"fg_baseline_psnr/{g}"] = self.fg_baseline_psnr[g]
        return out

    def fg_text(self) -> str:
        """e.g. "foreground gain over the median frame: Pong +8.1 dB, Boxing +6.3 dB"."""
        if not self.fg_psnr:
            return "no foreground figures"
        return "foreground gain over the median frame: " + gains_text(self.fg_gain)


def fg_gains(metrics: dict[str, Any]) -> dict[str, float]:
    """The per-game foreground gains (`fg_gain/<game>` keys) of a metrics row or a checkpoint's summary."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("fg_gain/")}


def gains_text(gains: dict[str, float]) -> str:
    """"Boxing +9.3 dB, Pong +10.0 dB"."""
    return ", ".join(f"{g} {v:+.1f} dB" for g, v in gains.items())


@torch.no_grad()
def evaluate(model: VQTokenizer, frames: np.ndarray, owner: np.ndarray, mean_frames: np.ndarray,
             batch_size: int = 256, median_frames: np.ndarray | None = None, games: Sequence[str] | None = None
             ) -> tuple[EvalResult, torch.Tensor]:
    """Encode/decode held-out `frames` [M, 84, 84] (fp32, eval mode); returns the figures and the reconstructions.

    With `median_frames` (uint8 [n_datasets, 84, 84]) and `games` (the game of each dataset), the foreground
    fidelity of each game is measured too (`foreground_fidelity`, threshold `model.cfg.foreground_threshold`).
    """
    was_training = model.training
    model.eval()
    try:
        tokens = model.encode(frames, batch_size=batch_size)  # [M, 36]
        recon = model.decode(tokens, batch_size=batch_size).cpu()  # [M, 84, 84]
    finally:
        model.train(was_training)
    target = torch.from_numpy(frames).float() / 255.0
    sq = (recon - target).pow(2).flatten(1).mean(1)  # [M]
    base_sq = (torch.from_numpy(mean_frames[owner]) - target).pow(2).flatten(1).mean(1)  # [M]
    counts = torch.bincount(tokens.flatten().cpu(), minlength=model.cfg.codebook_size).double()
    probs = counts / counts.sum()
    perplexity = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
    per_dataset = [psnr(sq[torch.from_numpy(owner == d)].mean()) if (owner == d).any() else float("nan")
                   for d in range(len(mean_frames))]
    fg_psnr, fg_base, fg_frac = {}, {}, {}
    if median_frames is not None and games is not None:
        for game in dict.fromkeys(games[d] for d in np.unique(owner)):
            sel = np.isin(owner, [d for d, g in enumerate(games) if g == game])
            fid = foreground_fidelity(frames[sel], recon[torch.from_numpy(sel)], median_frames[owner[sel]],
                                      model.cfg.foreground_threshold)
            fg_psnr[game], fg_base[game], fg_frac[game] = fid.psnr, fid.background_psnr, fid.fraction
    result = EvalResult(psnr=psnr(sq.mean()), baseline_psnr=psnr(base_sq.mean()),
                        usage=float((counts > 0).double().mean()), perplexity=perplexity,
                        psnr_per_dataset=per_dataset, fg_psnr=fg_psnr, fg_baseline_psnr=fg_base,
                        fg_fraction=fg_frac)
    return result, recon


def plot_reconstructions(path: Path, frames: np.ndarray, recon: torch.Tensor, step: int, result: EvalResult,
                         titles: Sequence[str]) -> None:
    """Write a PNG: held-out frames (top row) above their reconstructions (bottom row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(frames)
    fig = Figure(figsize=(1.6 * n, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        for row, img in ((0, frames[j] / 255.0), (1, recon[j].numpy())):
            ax = axes[row][j]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(titles[j], fontsize=7)
    axes[0][0].set_ylabel("held-out", fontsize=8)
    axes[1][0].set_ylabel("reconstruction", fontsize=8)
    fig.suptitle(f"step {step}: held-out PSNR {result.psnr:.2f} dB (mean-frame baseline "
                 f"{result.baseline_psnr:.2f} dB), codebook usage {result.usage:.0%}\n{result.fg_text()}",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _plot_selection(owner: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` held-out frames, round-robin over datasets, spread over each dataset's frames (the
    centres of equal parts, so no grid shows an episode's identical first frames side by side)."""
    per = [np.flatnonzero(owner == d) for d in np.unique(owner)]
    want = [max(1, count // len(per) + (k < count % len(per))) for k in range(len(per))]
    picks = [idx[((np.arange(min(w, len(idx))) + 0.5) * len(idx) / min(w, len(idx))).astype(np.int64)]
             for idx, w in zip(per, want)]
    return np.concatenate(picks)[:count]


# -------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What a training call ends with (also the command's one-line summary)."""

    run_dir: Path
    step: int
    tokenizer_id: str
    eval: EvalResult
    checkpoint: Path
    images_per_s: float
    codebook_size: int
    model: VQTokenizer = dataclasses.field(repr=False)
    """The trained tokenizer as it was saved (training mode)."""

    def summary_line(self) -> str:
        e = self.eval
        return (f"tokenizer {self.tokenizer_id} at step {self.step}: held-out PSNR {e.psnr:.2f} dB vs mean-frame "
                f"baseline {e.baseline_psnr:.2f} dB ({e.psnr - e.baseline_psnr:+.2f} dB), {e.fg_text()}, codebook usage "
                f"{e.usage:.0%} of {self.codebook_size} codes, perplexity {e.perplexity:.1f}; "
                f"{self.images_per_s:.0f} images/s; run {self.run_dir}")


def lr_at(step: int, cfg: TokenizerConfig) -> float:
    """Learning rate of (0-based) `step`: linear warm-up, then cosine from `lr` to `lr / 10` at `cfg.steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: VQTokenizer, cfg: TokenizerConfig) -> torch.optim.AdamW:
    """AdamW: weight decay on conv kernels only (not biases, norms, the pixel bias or the codebook)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    def decays(name: str, p: torch.nn.Parameter) -> bool:
        return p.dim() == 4 and not name.startswith(("decoder.pixel_bias", "decoder.backgrounds"))

    decay = [p for n, p in params if decays(n, p)]
    rest = [p for n, p in params if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def _rng_json(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _rng_from_json(text: str) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(text)
    return rng


def _resolve_data(data: Sequence[str | Path]) -> list[Path]:
    if not data:
        raise WamError("no datasets given; pass --data DIR [DIR ...] (dataset directories or roots holding them)")
    return find_datasets(list(data))


def _same_data(paths: Sequence[Path], fingerprints: list[str] | None) -> bool:
    """True when the datasets at `paths` hold what the run was trained on (moved or copied since)."""
    if not fingerprints or len(fingerprints) != len(paths):
        return False  # checkpoints written before fingerprints: only the same paths resume
    try:
        return [TrajectoryStore.open(p).fingerprint() for p in paths] == list(fingerprints)
    except WamError:
        return False


def train_tokenizer(cfg: TokenizerConfig, data: Sequence[str | Path], out: str | Path, resume: bool = False,
                    progress: bool = True, stop_at: int | None = None, steps: int | None = None) -> TrainResult:
    """Train a tokenizer on the datasets `data` into the run directory `out`; see the module docstring.

    resume: continue the run in `out` from its newest checkpoint with the run's stored config (`cfg` is
        ignored); `data` may be empty (the run's datasets are used) or must name the same datasets.
    steps: if given, overrides the config's `steps` (with `resume`: extends or shortens the run).
    stop_at: stop after this step as if Ctrl-C had been pressed, but without raising (saves a checkpoint);
        for tests and time-boxed jobs.
    """
    run = RunDir(out)
    ckpt = None
    if resume:
        latest = run.latest()
        if latest is None:
            raise WamError(f"--resume: {run.path} has no checkpoint to resume from; start without --resume")
        ckpt = load_checkpoint(latest, kind=CHECKPOINT_KIND)
        cfg = TokenizerConfig.from_stored(ckpt["config"])
        stored_data = [Path(p) for p in ckpt["data"]]
        paths = _resolve_data(data) if data else stored_data
        if [p.resolve() for p in paths] != [p.resolve() for p in stored_data] and not _same_data(
                paths, ckpt.get("data_fingerprints")):
            raise WamError(f"--resume: the run was trained on {[str(p) for p in stored_data]}, not "
                           f"{[str(p) for p in paths]}; resume with the same --data (or none)")
    elif run.latest() is not None:
        raise WamError(f"{run.path} already holds a tokenizer run; pass --resume to continue it or choose "
                       f"another --out")
    if steps is not None and steps != cfg.steps:
        log.info("training to step %d (the config says %d)", steps, cfg.steps)
        cfg = dataclasses.replace(cfg, steps=steps)
    if not resume:
        paths = _resolve_data(data)

    device = resolve_device(cfg.device)
    stores = [TrajectoryStore.open(p) for p in paths]
    titles = [s.game for s in stores]
    splits = split_episodes(stores, cfg.holdout_fraction)
    model = build_tokenizer(cfg).to(device)
    optimizer = make_optimizer(model, cfg)

    if ckpt is None:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        pool = FramePool(stores, [t for t, _ in splits], cfg.pool_frames, cfg.pool_window, rng)
        mean_frames = pool.mean_frames()
        median_frames = pool.median_frames(titles)
        step = 0
        last_eval: EvalResult | None = None
        run.write_config(cfg, data=[str(p) for p in paths], kind=CHECKPOINT_KIND)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler = ckpt["sampler"]
        rng = _rng_from_json(sampler["rng"])
        pool = FramePool(stores, [t for t, _ in splits], cfg.pool_frames, cfg.pool_window, rng,
                         windows=sampler["windows"].numpy())
        mean_frames = sampler["mean_frames"].numpy()
        median_frames = (sampler["median_frames"].numpy() if "median_frames" in sampler
                         else pool.median_frames(titles))  # checkpoints before foreground fidelity
        step = int(ckpt["step"])
        last_eval = EvalResult(**ckpt["eval"]) if ckpt.get("eval") else None
        set_rng_state(ckpt["rng"])
        run.truncate_metrics(step)
        run.write_config(cfg, data=[str(p) for p in paths], kind=CHECKPOINT_KIND)
        log.info("resumed tokenizer run %s at step %d", run.path, step)

    fingerprints = [st.fingerprint() for st in stores]  # saved with every checkpoint (moved-data resume)
    eval_frames, eval_owner = heldout_frames(stores, [h for _, h in splits], cfg.eval_frames)
    plot_idx = _plot_selection(eval_owner, PLOT_FRAMES)
    log.info("tokenizer: %d datasets, %d training frames, %d held-out evaluation frames, device %s, autocast %s",
             len(stores), pool.total_frames, len(eval_frames), device, cfg.autocast)

    def save() -> Path:
        payload = {
            "kind": CHECKPOINT_KIND, "config": config_to_dict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": rng_state(),
            "sampler": {**pool.state_dict(), "rng": _rng_json(rng), "mean_frames": torch.from_numpy(mean_frames),
                        "median_frames": torch.from_numpy(median_frames)},
            "tokenizer_id": model.tokenizer_id(), "data": [str(p) for p in paths],
            "data_fingerprints": fingerprints,
            "eval": dataclasses.asdict(last_eval) if last_eval else None,
            "summary": {**last_eval.metrics(), "eval_step": eval_step} if last_eval else {},
        }
        return run.save(step, payload)

    def run_eval() -> EvalResult:
        nonlocal eval_step
        result, recon = evaluate(model, eval_frames, eval_owner, mean_frames, median_frames=median_frames,
                                 games=titles)
        eval_step = step
        run.log_metrics(step, result.metrics())
        if step % cfg.plot_interval == 0 or step == cfg.steps:
            grid = run.path / "plots" / f"recon_step_{step:08d}.png"
            plot_reconstructions(grid, eval_frames[plot_idx], recon[plot_idx], step, result,
                                 [titles[d] for d in eval_owner[plot_idx]])
            run.log_image(step, "reconstructions", grid)
        return result

    eval_step = int(ckpt["summary"].get("eval_step", step)) if ckpt is not None and ckpt.get("summary") else step
    from wam.worldmodel.device import resolve_precision

    precision = resolve_precision({"none": "fp32"}.get(cfg.autocast, cfg.autocast), device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer", unit="step", dynamic_ncols=True)
    sums: dict[str, float] = {}
    n_logged, t_window, t_start, start_step = 0, time.perf_counter(), time.perf_counter(), step
    path: Path | None = None
    interrupted = False
    model.train()
    try:
        with StopFlag() as stop:
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                frames, owner = pool.sample(cfg.batch_size, rng)  # [B, 84, 84] uint8, [B]
                background = torch.from_numpy(median_frames[owner]).to(device)  # [B, 84, 84] uint8
                with autocast:
                    loss, logs = model.compute_loss(torch.from_numpy(frames).to(device), background)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                optimizer.step()
                step += 1
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_logged += 1
                if step % LOG_INTERVAL == 0 or step == cfg.steps:
                    now = time.perf_counter()
                    row = {k: v / n_logged for k, v in sums.items()}
                    row.update(lr=lr, images_per_s=n_logged * cfg.batch_size / max(now - t_window, 1e-9))
                    run.log_metrics(step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}",
                                        usage=f"{row['usage']:.2f}", img_s=f"{row['images_per_s']:.0f}")
                    sums, n_logged, t_window = {}, 0, now
                if step % cfg.eval_interval == 0 or step % cfg.plot_interval == 0 or step == cfg.steps:
                    last_eval = run_eval()
                    if bar is not None:
                        bar.write(f"step {step}: held-out PSNR {last_eval.psnr:.2f} dB (mean frame "
                                  f"{last_eval.baseline_psnr:.2f} dB), usage {last_eval.usage:.0%}; "
                                  f"{last_eval.fg_text()}")
                if not pool.fits and step % cfg.pool_refresh_interval == 0:
                    pool.refresh(0.25, rng)
                if bar is not None:
                    bar.update(1)
                if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                    path = save()
                if stop.requested or (stop_at is not None and step >= stop_at):
                    interrupted = stop.requested
                    break
    finally:
        if bar is not None:
            bar.close()
    if last_eval is None and not interrupted:
        last_eval = run_eval()
    if path is None or path != run.checkpoint_path(step):
        path = save()
    if interrupted:
        log.warning("interrupted at step %d; saved %s (continue with --resume)", step, path)
        raise KeyboardInterrupt
    assert last_eval is not None, "an evaluation runs before a run returns"
    elapsed = time.perf_counter() - t_start
    return TrainResult(run_dir=run.path, step=step, tokenizer_id=model.tokenizer_id(), eval=last_eval,
                       checkpoint=path, images_per_s=(step - start_step) * cfg.batch_size / max(elapsed, 1e-9),
                       codebook_size=cfg.codebook_size, model=model)


# -------------------------------------------------------------------------------------- encoding
@dataclass
class EncodeSummary:
    """What `encode_datasets` did."""

    tokenizer_id: str
    datasets: list[Path]
    encoded: list[Path]
    """Datasets whose cache was written (or completed) now."""
    skipped: list[Path]
    """Datasets already fully cached by this tokenizer."""
    frames: int
    """Frames encoded now."""
    usage: float | None
    """Fraction of the codebook occurring in the frames encoded now (None when nothing was encoded)."""
    seconds: float


def encode_datasets(tokenizer: VQTokenizer, dirs: Sequence[str | Path], batch_size: int = 256,
                    progress: bool = True) -> EncodeSummary:
    """Encode every frame of the datasets `dirs` into their token caches (uint16, tagged with the tokenizer id).

    Idempotent: a dataset fully cached by this tokenizer is skipped, one partly cached by it (episodes
    appended since) gets the missing episodes. A dataset cached by another tokenizer raises DataError
    before anything is encoded. Encoding runs in fp32, eval mode, on the tokenizer's device.
    """
    t0 = time.perf_counter()
    paths = _resolve_data(dirs)
    tid = tokenizer.tokenizer_id()
    stores = [TrajectoryStore.open(p) for p in paths]
    clash = [(s.directory, s.tokenizer_id()) for s in stores if s.tokenizer_id() not in (None, tid)]
    if clash:
        detail = "; ".join(f"{d} holds tokens of tokenizer {other}" for d, other in clash)
        raise DataError(f"{detail}, not of {tid}: a dataset holds the tokens of one tokenizer. Tokenize a copy of "
                        f"the dataset, or name the tokenizer that made the cache")
    todo = [(s, s.episodes_without_tokens()) for s in stores]
    total = int(sum(int((s.episode_lengths()[eps] + 1).sum()) for s, eps in todo if eps))
    was_training = tokenizer.training
    tokenizer.eval()
    counts = torch.zeros(tokenizer.cfg.codebook_size, dtype=torch.int64)
    encoded, skipped, frames_done = [], [], 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="tokenize", unit="frame", dynamic_ncols=True)

    def episodes(reader: TrajectoryStore, ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal frames_done
        lengths = reader.episode_lengths()
        for i in ids:
            obs = reader.read_window(i, 0, int(lengths[i]) + 1, "observations")  # [T+1, 84, 84]
            tokens = tokenizer.encode(obs, batch_size=batch_size).cpu()  # [T+1, 36]
            counts.add_(torch.bincount(tokens.flatten(), minlength=tokenizer.cfg.codebook_size))
            frames_done += len(obs)
            if bar is not None:
                bar.update(len(obs))
            yield i, tokens.numpy().astype(np.uint16)

    try:
        for store, ids in todo:
            if not ids:
                log.info("%s: token cache of %s already complete; skipped", store.directory, tid)
                skipped.append(store.directory)
                continue
            with TrajectoryStore.open(store.directory) as reader:  # a separate handle: the writer swaps files
                store.write_tokens(episodes(reader, ids), tid)
            encoded.append(store.directory)
            log.info("%s: encoded %d episode(s) with tokenizer %s", store.directory, len(ids), tid)
    finally:
        tokenizer.train(was_training)
        if bar is not None:
            bar.close()
    usage = float((counts > 0).double().mean()) if frames_done else None
    return EncodeSummary(tokenizer_id=tid, datasets=paths, encoded=encoded, skipped=skipped, frames=frames_done,
                         usage=usage, seconds=time.perf_counter() - t0)
