"""Judging a tokenizer on held-out frames: PSNR against the mean frame, foreground fidelity per game, codebook
usage, and the reconstruction grid."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wam.datasets.files import atomic_write_bytes
from wam.worldmodel.tokenizer import (
    VQTokenizer,
    foreground_fidelity,
    psnr,
)

log = logging.getLogger(__name__)

PLOT_FRAMES = 8
"""Held-out frames shown in each reconstruction grid."""


@dataclass
class TokenizerEvalResult:
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
def evaluate_tokenizer(model: VQTokenizer, frames: np.ndarray, owner: np.ndarray, mean_frames: np.ndarray,
                       batch_size: int = 256, median_frames: np.ndarray | None = None,
                       games: Sequence[str] | None = None) -> tuple[TokenizerEvalResult, torch.Tensor]:
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
    result = TokenizerEvalResult(psnr=psnr(sq.mean()), baseline_psnr=psnr(base_sq.mean()),
                                 usage=float((counts > 0).double().mean()), perplexity=perplexity,
                                 psnr_per_dataset=per_dataset, fg_psnr=fg_psnr, fg_baseline_psnr=fg_base,
                                 fg_fraction=fg_frac)
    return result, recon


def plot_reconstructions(path: Path, frames: np.ndarray, recon: torch.Tensor, step: int,
                         result: TokenizerEvalResult, titles: Sequence[str]) -> None:
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


def plot_selection(owner: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` held-out frames, round-robin over datasets, spread over each dataset's frames (the
    centres of equal parts, so no grid shows an episode's identical first frames side by side)."""
    per = [np.flatnonzero(owner == d) for d in np.unique(owner)]
    want = [max(1, count // len(per) + (k < count % len(per))) for k in range(len(per))]
    picks = [idx[((np.arange(min(w, len(idx))) + 0.5) * len(idx) / min(w, len(idx))).astype(np.int64)]
             for idx, w in zip(per, want)]
    return np.concatenate(picks)[:count]
