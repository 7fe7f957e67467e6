"""How well a reconstruction keeps a frame: PSNR, the foreground (the moving objects) against the game's
median frame, the foreground-weighted loss weights and the image-gradient term (docs/tokenizer.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wam.worldmodel.tokenizer_config import FOREGROUND_THRESHOLD


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two image batches [N, 1, H, W]."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def psnr(mse: torch.Tensor | float) -> float:
    """PSNR in dB of a mean squared error on [0, 1] pixels (capped at 100 dB for a perfect match)."""
    mse = float(mse)
    return 100.0 if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


def foreground_mask(frames: torch.Tensor, background: torch.Tensor, threshold: int = FOREGROUND_THRESHOLD
                    ) -> torch.Tensor:
    """bool [N, 84, 84]: the pixels of uint8 `frames` that differ from the uint8 `background` (one frame
    [84, 84] or one per frame [N, 84, 84], the game's median training frame) by more than `threshold`
    grey levels: the moving objects (players, ball, cars)."""
    return (frames.to(torch.int16) - background.to(torch.int16)).abs() > threshold


def foreground_weights(fg: torch.Tensor, weight: float, max_share: float = 0.5, small_object: int = 0
                       ) -> torch.Tensor:
    """float [N, 1, H, W] per-pixel weights of the reconstruction loss, mean 1, from the foreground mask `fg`
    (bool [N, 1, H, W]): background pixels weigh 1, foreground ones 1 + `weight`, capped so that a frame's
    foreground takes at most `max_share` of its weight; with `small_object` > 0 a foreground pixel with c
    foreground pixels in its 5x5 neighbourhood has its extra weight multiplied by max(1, small_object / c)
    (see `TokenizerConfig`)."""
    n_fg = fg.flatten(1).sum(1).float().clamp_min(1.0).view(-1, 1, 1, 1)  # [N, 1, 1, 1]
    cap = max_share / (1.0 - max_share) * (fg[0].numel() - n_fg) / n_fg  # foreground at most `max_share`
    fg_w = cap.clamp(max=1.0 + weight).clamp_min(1.0)
    if small_object > 0:  # a small object weighs as much as one of `small_object` pixels
        near = F.avg_pool2d(fg.float(), 5, stride=1, padding=2, count_include_pad=True) * 25.0
        fg_w = 1.0 + (fg_w - 1.0) * (small_object / near.clamp_min(1.0)).clamp_min(1.0)
    w = torch.where(fg, fg_w, torch.ones_like(fg_w))
    return w / w.mean()


@dataclass
class ForegroundFidelity:
    """Reconstruction quality on the foreground pixels only (see `foreground_fidelity`)."""

    psnr: float
    """PSNR (dB) of the reconstruction over the foreground pixels."""
    background_psnr: float
    """PSNR (dB) of the median frame itself over the same pixels (what a tokenizer that drops every object gets)."""
    fraction: float
    """Fraction of the pixels that are foreground."""

    @property
    def gain(self) -> float:
        """psnr - background_psnr: how much better than the median frame the objects are rebuilt (dB)."""
        return self.psnr - self.background_psnr


def foreground_fidelity(frames: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor,
                        background: np.ndarray | torch.Tensor, threshold: int = FOREGROUND_THRESHOLD
                        ) -> ForegroundFidelity:
    """Foreground PSNR of `recon` (float [N, 84, 84] in [0, 1]) against uint8 `frames` [N, 84, 84], next to
    the PSNR of the uint8 median frame `background` ([84, 84] or [N, 84, 84]) on the same pixels.

    One MSE over all foreground pixels of all frames (NaN figures when no pixel is foreground).
    """
    frames_t, bg_t = torch.as_tensor(frames), torch.as_tensor(background)
    fg = foreground_mask(frames_t, bg_t, threshold)
    n = int(fg.sum())
    if n == 0:
        return ForegroundFidelity(psnr=float("nan"), background_psnr=float("nan"), fraction=0.0)
    target = frames_t.double() / 255.0
    err = (torch.as_tensor(recon).double() - target)[fg].pow(2).mean()
    base = (bg_t.double().expand_as(target) / 255.0 - target)[fg].pow(2).mean()
    return ForegroundFidelity(psnr=psnr(err), background_psnr=psnr(base), fraction=n / fg.numel())
