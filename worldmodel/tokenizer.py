"""The frame tokenizer: a VQ-VAE that turns one 84x84 grayscale frame into 6x6 = 36 discrete tokens (or 11x11 =
121 with three channel levels, `TokenizerConfig.grid`).

    frames uint8 [N, 84, 84] -> /255 -> conv encoder (84 -> 42 -> 21 -> 11 -> 6) -> z [N, D, 6, 6]
      -> nearest codebook entry (fp32 distances, straight-through gradient) -> z_q [N, D, 6, 6]
      -> conv decoder (6 -> 11 -> 21 -> 42 -> 84) -> frames float [N, 84, 84] (clamped to [0, 1] by `decode`)

Tokens are numbered row by row over the 6x6 grid (`tokens[:, 6 * row + col]`), int64, in `[0, codebook_size)`.

Loss (`compute_loss`): L1 reconstruction + an image-gradient L1 term (edges of small sprites; needs no
downloaded weights, see docs/tokenizer.md) + beta * commitment `||z - sg(e)||^2` (+ the codebook term
`||sg(z) - e||^2` when the codebook is learned by gradient instead of EMA). The codebook is kept alive by
EMA updates and/or dead-code restarts (a code whose running usage falls below a threshold is moved onto a
random encoder output of the current batch). Everything runs under `torch.autocast(..., torch.bfloat16)`;
the codebook search always runs in fp32.

`load_tokenizer(run_dir_or_checkpoint)` rebuilds a trained, frozen tokenizer from its checkpoint and checks
its `tokenizer_id` (a hash of the config and the weights that determine tokens and reconstructions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wam.datasets.config import preset_value
from wam.datasets.errors import WamError

log = logging.getLogger(__name__)

FRAME_SIZE = 84
"""Side of the square grayscale frames the tokenizer reads."""
GRID_SIZE = 6
"""Side of the default latent token grid (JOWA's); each frame becomes GRID_SIZE**2 tokens. An 11x11 grid is a
config option (`TokenizerConfig.grid`)."""
TOKENS_PER_FRAME = GRID_SIZE * GRID_SIZE
FOREGROUND_THRESHOLD = 24
"""Default grey-level distance from the per-game median frame above which a pixel is foreground."""
# Spatial sizes of the levels: space-to-depth 84 -> 42, then 3x3 stride-2 convs with padding 1: 42 -> 21 -> 11 -> 6.
_SIZES = (42, 21, 11, 6)
_LEVELS = {6: 4, 11: 3}  # token grid side -> resolution levels
CHECKPOINT_KIND = "tokenizer"


# ------------------------------------------------------------------------------------------ config
@dataclass
class TokenizerConfig:
    """VQ-VAE tokenizer: architecture, codebook upkeep and its training hyper-parameters.

    The defaults are the `debug` preset; `TokenizerConfig.from_preset(name)` gives the others.
    """

    # -- architecture
    codebook_size: int = 1024
    """Number of codebook entries K (the token vocabulary; at most 65,536 so tokens fit uint16)."""
    codebook_dim: int = 32
    """Dimension D of each codebook entry (and of the encoder's output per grid cell)."""
    grid: int = 6
    """Side of the token grid: 6 (36 tokens a frame, 14x14-pixel cells, JOWA's) or 11 (121 tokens, 7.6x7.6-pixel
    cells: the encoder stops a level earlier and the last entry of `channels` is dropped)."""
    channels: tuple[int, ...] = (16, 32, 64, 64)
    """Channels of the resolution levels (42, 21, 11 and 6 cells wide; 84x84 is folded into 42x42x4); with
    grid 11 the first three."""
    res_blocks: int = 0
    """Residual blocks per resolution level (in encoder and decoder alike)."""
    background_bank: int = 8
    """0: the decoder adds one learned 84x84 bias image to its output. M > 0: it adds a mixture of M learned
    background images, weighted by a softmax over a linear read of the mean of the frame's codes, so each
    game's static screen is held exactly and the tokens are not spent cancelling other games' screens."""
    # -- losses
    commitment_beta: float = 1.0
    """Weight beta of the commitment loss ||z - sg(e)||^2 (JOWA uses 1)."""
    mse_weight: float = 10.0
    """Weight of a squared-error term beside the L1 term: Atari errors are few and large (a missing sprite),
    which L1 alone (a median) learns slowly; see docs/tokenizer.md."""
    gradient_loss_weight: float = 1.0
    """Weight of the image-gradient L1 term (the weight-free stand-in for the perceptual loss)."""
    foreground_weight: float = 30.0
    """Extra weight of foreground pixels in the L1 and MSE terms: a pixel that differs from its game's median
    training frame by more than `foreground_threshold` grey levels weighs 1 + foreground_weight (the
    players, ball, cars: 1-3 % of the pixels, and what decides play); 0 weighs every pixel alike (JOWA).
    See docs/tokenizer.md."""
    foreground_max_share: float = 0.5
    """Cap on the share of a frame's L1/MSE weight that its foreground pixels take together: a foreground pixel
    weighs min(1 + foreground_weight, s / (1 - s) * n_background / n_foreground). It bites only on screens
    that are mostly foreground (scrolling games: 22 % of Zaxxon's pixels), where the full weight would leave
    the rest of the screen almost unweighted."""
    foreground_small_object: int = 0
    """Pixels below which a foreground object counts as small, and its pixels' extra weight grows so that it
    weighs as much in total as an object of this many pixels: a foreground pixel with c foreground pixels in
    its 5x5 neighbourhood has its extra weight multiplied by max(1, foreground_small_object / c). Pong's ball
    (1-2 pixels at 84x84) otherwise weighs a tenth of a paddle. 0 = off (every foreground pixel alike)."""
    foreground_threshold: int = FOREGROUND_THRESHOLD
    """Grey levels (0-255) by which a pixel must differ from its game's median frame to count as foreground,
    for the loss weighting above and for the foreground PSNR reported at every evaluation."""
    # -- codebook upkeep
    ema_decay: float = 0.95
    """Decay of the EMA codebook updates; 0 learns the codebook by gradient (codebook loss) instead."""
    dead_code_threshold: float = 0.5
    """A code whose running count of assignments per batch falls below this is restarted; 0 disables restarts."""
    usage_decay: float = 0.95
    """Decay of the running per-code assignment counts that dead-code restarts look at."""
    normalize_codes: bool = True
    """Quantize l2-normalised encoder outputs against l2-normalised codes (cosine distance): keeps the
    latents from shrinking towards the codes and keeps far more of the codebook in use."""
    # -- training
    lr: float = 1e-3
    """AdamW learning rate (peak, after warm-up; 2e-3 diverged with the foreground weighting)."""
    weight_decay: float = 0.0
    """AdamW weight decay (codebook excluded)."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up; the rate then follows a cosine to 10 % of `lr` at `steps`."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    batch_size: int = 32
    """Frames per training step."""
    steps: int = 600
    """Training steps."""
    eval_interval: int = 100
    """Evaluate on held-out episodes (PSNR, codebook usage) every this many steps (and at the end)."""
    plot_interval: int = 200
    """Write a PNG grid of held-out frames beside their reconstructions every this many steps (and at the end)."""
    checkpoint_interval: int = 200
    """Save a checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    holdout_fraction: float = 0.1
    """Fraction of each dataset's episodes (the last ones) held out for evaluation (at least one)."""
    eval_frames: int = 256
    """Held-out frames used for each evaluation (spread evenly over the held-out episodes)."""
    pool_frames: int = 20_000
    """Training frames kept in RAM; larger datasets are sampled as random windows, refreshed as training runs."""
    pool_window: int = 32
    """Length of the windows (consecutive frames) read into the training pool."""
    pool_refresh_interval: int = 500
    """Replace a quarter of the pool's windows every this many steps (only when the data do not fit)."""
    autocast: str = "none"
    """Mixed precision of training: "none" (fp32), "bf16" (torch.autocast; codebook search stays fp32) or "auto"
    (bf16 where the device runs it natively, `wam.worldmodel.trainer.bf16_is_fast`, else fp32)."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda"."""
    seed: int = 0
    """Seed of the weights, the sampler and the codebook restarts."""

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        if not 2 <= self.codebook_size <= 65_536:
            raise WamError(f"codebook_size must be in [2, 65536] (tokens are stored as uint16), got {self.codebook_size}")
        if self.grid not in (6, 11):
            raise WamError(f"grid must be 6 (36 tokens a frame) or 11 (121 tokens), got {self.grid}")
        if self.grid == 11 and len(self.channels) == 4:
            self.channels = self.channels[:3]  # type: ignore[assignment]
        if len(self.channels) != _LEVELS[self.grid]:
            raise WamError(f"channels needs one entry per resolution level: {_LEVELS[self.grid]} for grid {self.grid} "
                           f"({', '.join(map(str, _SIZES[:_LEVELS[self.grid]]))} cells wide), got {self.channels}")
        if self.autocast not in ("none", "bf16", "auto"):
            raise WamError(f"autocast must be 'none', 'bf16' or 'auto', got {self.autocast!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise WamError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 < self.usage_decay < 1.0:
            raise WamError(f"ema_decay must be in [0, 1) and usage_decay in (0, 1), got {self.ema_decay}, {self.usage_decay}")
        if not 0.0 < self.foreground_max_share < 1.0:
            raise WamError(f"foreground_max_share must be in (0, 1), got {self.foreground_max_share}")
        if self.foreground_small_object < 0:
            raise WamError(f"foreground_small_object must be >= 0, got {self.foreground_small_object}")
        if self.foreground_weight < 0 or not 0 <= self.foreground_threshold <= 255:
            raise WamError(f"foreground_weight must be >= 0 and foreground_threshold in [0, 255], got "
                           f"{self.foreground_weight}, {self.foreground_threshold}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise WamError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in ("batch_size", "steps", "eval_interval", "plot_interval", "checkpoint_interval", "eval_frames",
                     "pool_frames", "pool_window", "pool_refresh_interval"):
            if getattr(self, name) <= 0:
                raise WamError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_preset(cls, name: str) -> TokenizerConfig:
        """The named preset: debug, small, jowa-40m, jowa-70m or jowa-150m."""
        return dataclasses.replace(preset_value(TOKENIZER_PRESETS, name, what="tokenizer preset"))

    @classmethod
    def from_stored(cls, data: dict) -> TokenizerConfig:
        """The config a checkpoint or config.json recorded. Fields added since take the value that reproduces the
        behaviour of the version that wrote it (`LEGACY_DEFAULTS`), not today's default."""
        from wam.worldmodel.checkpoint import config_from_dict

        return config_from_dict(cls, {**LEGACY_DEFAULTS, **data})

    def architecture_dict(self) -> dict[str, object]:
        """The fields that decide what the weights mean (hashed into the tokenizer id)."""
        keys = ("codebook_size", "codebook_dim", "channels", "res_blocks", "normalize_codes")
        if self.background_bank:  # only when set, so tokenizers trained before the bank keep their ids
            keys += ("background_bank",)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}


LEGACY_DEFAULTS: dict[str, object] = {"background_bank": 0, "foreground_weight": 0.0, "foreground_small_object": 0}
"""Values of fields added after tokenizers were first saved, for configs recorded without them (before the
background bank and the foreground weighting, every tokenizer had one bias image and an unweighted loss)."""

# The paper presets share one tokenizer: JOWA trains it once (stage 1, 2,048 x 512 codebook, 250k steps) and
# freezes it for every model size.
_JOWA = TokenizerConfig(
    codebook_size=2048, codebook_dim=512, channels=(128, 128, 256, 256), res_blocks=2, background_bank=0,
    foreground_weight=0.0,
    ema_decay=0.99, usage_decay=0.99, dead_code_threshold=0.05, lr=1e-4, weight_decay=0.01, warmup_steps=2000,
    batch_size=128, steps=250_000, eval_interval=5000, plot_interval=10_000, checkpoint_interval=10_000,
    eval_frames=2048, pool_frames=500_000, pool_refresh_interval=5000, autocast="auto",
)
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # The defaults. Keeps the objects: foreground-weighted loss, a bank of 8 learned screens, 1,024 codes
    # (docs/tokenizer.md, "Keeping the objects", for the ablation that chose them).
    "debug": TokenizerConfig(),
    # debug + one residual block per level: the `small` recipe's tokenizer, minutes on 2 CPU cores. The block
    # lifted Freeway's foreground gain from +6.7 to above +8 dB (docs/tokenizer.md, "Keeping the objects").
    "small": TokenizerConfig(res_blocks=1, steps=3000),
    "jowa-40m": _JOWA,
    "jowa-70m": _JOWA,
    "jowa-150m": _JOWA,
}


# ------------------------------------------------------------------------------------------ layers
def _groups(channels: int) -> int:
    """GroupNorm groups: 8 channels per group, at most 32 groups."""
    return max(1, min(32, channels // 8))


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2 + identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """[N, 1, 84, 84] in [0, 1] -> [N, D, 6, 6].

    Space-to-depth (2x2 pixels -> 4 channels) brings the frame to 42x42, then three stride-2 3x3 convs
    go 42 -> 21 -> 11 -> 6; `res_blocks` residual blocks follow each level, a 1x1 conv gives D channels.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(4, c[0], 3, padding=1), nn.SiLU()]
        layers += [ResBlock(c[0]) for _ in range(cfg.res_blocks)]
        for c_in, c_out in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
            layers += [ResBlock(c_out) for _ in range(cfg.res_blocks)]
        layers += [nn.Conv2d(c[-1], cfg.codebook_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to a fixed size, then a 3x3 conv (no checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int, size: int):
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=(self.size, self.size), mode="nearest"))


class Decoder(nn.Module):
    """[N, D, 6, 6] -> [N, 1, 84, 84] (unbounded; the target range is [0, 1]); mirrors the encoder.

    6 -> 11 -> 21 -> 42 by nearest resize + 3x3 conv, then a 3x3 conv to 4 channels and depth-to-space
    (4 channels -> 2x2 pixels) to 84x84.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, c[-1], 3, padding=1), nn.SiLU()]
        layers += [ResBlock(c[-1]) for _ in range(cfg.res_blocks)]
        for level in range(len(c) - 1, 0, -1):
            layers += [Upsample(c[level], c[level - 1], _SIZES[level - 1]), nn.SiLU()]
            layers += [ResBlock(c[level - 1]) for _ in range(cfg.res_blocks)]
        layers += [nn.Conv2d(c[0], 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)
        # Learned background images: the static parts of the screens (borders, backgrounds) are learned once
        # here, and the tokens spend their information on what changes. One image (`pixel_bias`) is shared by
        # every game; a bank of M is mixed per frame by a softmax over a linear read of the mean code.
        self.bank = cfg.background_bank
        if self.bank:
            self.backgrounds = nn.Parameter(torch.zeros(1, self.bank, FRAME_SIZE, FRAME_SIZE))
            self.background_head = nn.Linear(cfg.codebook_dim, self.bank)
        else:
            self.pixel_bias = nn.Parameter(torch.zeros(1, 1, FRAME_SIZE, FRAME_SIZE))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.bank:
            return self.net(z) + self.pixel_bias
        mix = torch.softmax(self.background_head(z.mean(dim=(2, 3))), dim=1)  # [N, M]
        background = (mix[:, :, None, None] * self.backgrounds).sum(1, keepdim=True)  # [N, 1, 84, 84]
        return self.net(z) + background


# --------------------------------------------------------------------------------------- quantizer
@dataclass
class Quantized:
    """Output of `VectorQuantizer`: straight-through codes, indices and the quantization losses."""

    z_q: torch.Tensor
    """[N, D] fp32: z + sg(e - z); the forward value is the codebook entry, the gradient flows to z."""
    indices: torch.Tensor
    """[N] int64 codebook indices."""
    commitment: torch.Tensor
    """Scalar ||z - sg(e)||^2 (mean over elements)."""
    codebook: torch.Tensor
    """Scalar ||sg(z) - e||^2 (zero-gradient constant when the codebook is learned by EMA)."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of [N, D] vectors against a [K, D] codebook (fp32).

    Codebook upkeep in training mode (`self.training`): a data-dependent initialisation on the first
    batch (codes = random encoder outputs), EMA updates when `ema_decay > 0`, and dead-code restarts when
    `dead_code_threshold > 0`. All of it is driven by torch's global RNG, which checkpoints save.
    """

    def __init__(self, codebook_size: int, dim: int, ema_decay: float, usage_decay: float,
                 dead_code_threshold: float, normalize: bool):
        super().__init__()
        self.normalize = normalize
        self.codebook_size, self.dim = codebook_size, dim
        self.ema_decay, self.usage_decay, self.dead_code_threshold = ema_decay, usage_decay, dead_code_threshold
        self.use_ema = ema_decay > 0
        self.embedding = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim),
                                      requires_grad=not self.use_ema)  # [K, D]
        # Running number of assignments per batch of each code (dead-code detection).
        self.register_buffer("usage", torch.ones(codebook_size))  # [K]
        # EMA statistics (kept but unused when the codebook is learned by gradient).
        self.register_buffer("ema_count", torch.ones(codebook_size))  # [K]
        self.register_buffer("ema_sum", self.embedding.detach().clone())  # [K, D]
        self.register_buffer("initialized", torch.tensor(False))
        self.restarts = 0
        """Codes restarted since construction (logging only; not saved)."""

    @staticmethod
    def _nearest(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """[N] int64: index of the nearest codebook row (squared L2) of each row of z; fp32, chunked over N."""
        e_sq = codebook.pow(2).sum(1)  # [K]
        out = []
        for zc in z.split(chunk):
            # ||z||^2 is the same for every code, so argmin(||e||^2 - 2 z.e) is the nearest code.
            dist = torch.addmm(e_sq, zc, codebook.t(), beta=1.0, alpha=-2.0)  # [n, K]
            out.append(dist.argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=z.device)

    def codes(self) -> torch.Tensor:
        """[K, D] fp32 codebook as used for search and lookup (unit rows when `normalize`)."""
        e = self.embedding.float()
        return F.normalize(e, dim=1) if self.normalize else e

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[...] int64 -> [..., D] fp32 codebook rows."""
        return F.embedding(indices, self.codes())

    def forward(self, z: torch.Tensor) -> Quantized:
        """z: [N, D] (any float dtype; computed in fp32, l2-normalised first when `normalize`)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.normalize:
                z = F.normalize(z, dim=1)
            if self.training and not bool(self.initialized):
                self._init_from(z.detach())
            indices = self._nearest(z.detach(), self.codes().detach())  # [N]
            e = self.lookup(indices)  # [N, D]
            commitment = F.mse_loss(z, e.detach())
            codebook = F.mse_loss(z.detach(), e) if not self.use_ema else z.new_zeros(())
            z_q = z + (e - z).detach()  # straight-through: forward = e, backward = identity into z
            if self.training:
                self._update(z.detach(), indices)
        return Quantized(z_q=z_q, indices=indices, commitment=commitment, codebook=codebook)

    @torch.no_grad()
    def _random_rows(self, z: torch.Tensor, n: int) -> torch.Tensor:
        """n rows of z drawn at random (with replacement when z has fewer than n rows)."""
        if z.shape[0] >= n:
            rows = z[torch.randperm(z.shape[0], device=z.device)[:n]]
        else:
            rows = z[torch.randint(0, z.shape[0], (n,), device=z.device)]
            rows = rows + 1e-3 * z.std() * torch.randn_like(rows)
        return rows

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor) -> None:
        """Data-dependent initialisation: every code starts at a random encoder output."""
        rows = self._random_rows(z, self.codebook_size)
        self.embedding.copy_(rows)
        self.ema_sum.copy_(rows)
        self.ema_count.fill_(1.0)
        self.usage.fill_(1.0)
        self.initialized.fill_(True)
        log.debug("codebook initialised from %d encoder outputs", z.shape[0])

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        """EMA codebook update and dead-code restarts from one training batch."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # [K]
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        if self.use_ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, z)  # [K, D]
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n  # Laplace smoothing, [K]
            self.embedding.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self.restart_dead_codes(z)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> int:
        """Move every code used less than `dead_code_threshold` times per batch onto a random row of z [N, D].

        Returns the number of codes restarted. A restarted code starts with a usage of 1 batch-assignment.
        """
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)  # [n_dead]
        if dead.numel() == 0:
            return 0
        rows = self._random_rows(z, dead.numel())
        self.embedding[dead] = rows
        self.ema_sum[dead] = rows
        self.ema_count[dead] = 1.0
        self.usage[dead] = 1.0
        self.restarts += dead.numel()
        return int(dead.numel())


# ---------------------------------------------------------------------------------------- the model
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


@dataclass
class TokenizerOutput:
    """Everything one forward pass computes (for losses, tests and plots)."""

    recon: torch.Tensor
    """[N, 84, 84] float (unclamped) reconstruction."""
    target: torch.Tensor
    """[N, 84, 84] float frames in [0, 1]."""
    z: torch.Tensor
    """[N, 36, D] encoder output."""
    quantized: Quantized
    tokens: torch.Tensor
    """[N, 36] int64."""


class VQTokenizer(nn.Module):
    """84x84 uint8 frame <-> 36 tokens (see the module docstring)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.ema_decay, cfg.usage_decay,
                                         cfg.dead_code_threshold, cfg.normalize_codes)
        self.decoder = Decoder(cfg)
        self.extra: dict[str, object] = {}
        """Run facts attached by `load_tokenizer` (held-out PSNR, ...); not part of the weights."""

    @property
    def device(self) -> torch.device:
        return self.quantizer.embedding.device

    # -- pieces --------------------------------------------------------------------------------------
    def _to_input(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [N, 84, 84] (tensor or array) -> float [N, 1, 84, 84] in [0, 1] on the model's device."""
        x = torch.as_tensor(frames, device=self.device)
        if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (FRAME_SIZE, FRAME_SIZE):
            raise ValueError(f"frames must be uint8 [N, {FRAME_SIZE}, {FRAME_SIZE}], got {x.dtype} {tuple(x.shape)}")
        return x.unsqueeze(1).float().div_(255.0)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, 84, 84] -> [N, 36, D] encoder output, grid cells row by row."""
        z = self.encoder(x)  # [N, D, 6, 6]
        return z.flatten(2).transpose(1, 2)  # [N, 36, D]

    def _reconstruct(self, z_q: torch.Tensor) -> torch.Tensor:
        """[N, 36, D] -> [N, 84, 84] unclamped reconstruction."""
        n = z_q.shape[0]
        g = self.cfg.grid
        grid = z_q.transpose(1, 2).reshape(n, self.cfg.codebook_dim, g, g)  # [N, D, 6, 6]
        return self.decoder(grid).squeeze(1)  # [N, 84, 84]

    def forward(self, frames: torch.Tensor | np.ndarray) -> TokenizerOutput:
        """frames uint8 [N, 84, 84] -> reconstruction, latents, codes (training mode updates the codebook)."""
        x = self._to_input(frames)  # [N, 1, 84, 84]
        z = self._latents(x)  # [N, 36, D]
        n = z.shape[0]
        k = self.cfg.tokens_per_frame
        q = self.quantizer(z.reshape(n * k, -1))
        z_q = q.z_q.reshape(n, k, -1)  # [N, 36, D]
        recon = self._reconstruct(z_q)
        return TokenizerOutput(recon=recon, target=x.squeeze(1), z=z, quantized=q, tokens=q.indices.reshape(n, k))

    # -- public API ----------------------------------------------------------------------------------
    def compute_loss(self, frames: torch.Tensor | np.ndarray, background: torch.Tensor | np.ndarray | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs) on a batch of uint8 frames [N, 84, 84].

        loss = L1 + mse_weight * MSE + gradient_loss_weight * image-gradient L1 + beta * commitment
        (+ the codebook loss without EMA). With `background` (uint8 [N, 84, 84], each frame's game median
        frame) and `foreground_weight > 0`, L1 and MSE are weighted means with weight 1 + foreground_weight
        on foreground pixels (`foreground_mask`), capped so that they take at most `foreground_max_share` of
        each frame's weight. logs: loss, recon_l1, recon_mse, grad_l1, commitment, psnr
        (of the clamped reconstruction), perplexity (of the batch's code distribution), usage (fraction of
        the codebook used in the batch) and, with a background, fg_fraction and fg_psnr (of the batch).
        """
        out = self(frames)
        recon = out.recon.float().unsqueeze(1)  # [N, 1, 84, 84]
        target = out.target.unsqueeze(1)
        fg = None
        if background is not None:
            bg = torch.as_tensor(background, device=recon.device)
            fg = foreground_mask(torch.as_tensor(frames, device=recon.device), bg,
                                 self.cfg.foreground_threshold).unsqueeze(1)  # [N, 1, 84, 84] bool
        err = recon - target
        if fg is not None and self.cfg.foreground_weight > 0:
            w = foreground_weights(fg, self.cfg.foreground_weight, self.cfg.foreground_max_share,
                                   self.cfg.foreground_small_object)
            l1 = (err.abs() * w).mean()
            mse_raw = (err.pow(2) * w).mean()
        else:
            l1 = err.abs().mean()
            mse_raw = err.pow(2).mean()
        grad_l1 = image_gradient_l1(recon, target)
        q = out.quantized
        loss = (l1 + self.cfg.mse_weight * mse_raw + self.cfg.gradient_loss_weight * grad_l1
                + self.cfg.commitment_beta * q.commitment + q.codebook)
        with torch.no_grad():
            counts = torch.bincount(q.indices, minlength=self.cfg.codebook_size).float()
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
            mse = (recon.clamp(0, 1) - target).pow(2).mean()
        logs = {
            "loss": loss.item(), "recon_l1": l1.item(), "recon_mse": mse_raw.item(), "grad_l1": grad_l1.item(),
            "commitment": q.commitment.item(), "psnr": psnr(mse), "perplexity": float(perplexity),
            "usage": float((counts > 0).float().mean()),
        }
        if fg is not None:
            with torch.no_grad():
                n_fg = fg.sum()
                logs["fg_fraction"] = float(fg.float().mean())
                if n_fg > 0:
                    fg_mse = ((recon.clamp(0, 1) - target).pow(2) * fg).sum() / n_fg
                    logs["fg_psnr"] = psnr(fg_mse)
        return loss, logs

    @torch.no_grad()
    def encode(self, frames: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """uint8 frames [N, 84, 84] -> tokens int64 [N, 36] (on the model's device), in batches.

        Never updates the codebook (the quantizer runs in eval mode whatever the module's mode).
        """
        x_all = torch.as_tensor(frames)
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            out = []
            for chunk in x_all.split(batch_size):
                z = self._latents(self._to_input(chunk))  # [n, 36, D]
                n = z.shape[0]
                idx = self.quantizer(z.reshape(n * self.cfg.tokens_per_frame, -1)).indices
                out.append(idx.reshape(n, self.cfg.tokens_per_frame))
        finally:
            self.quantizer.train(was_training)
        if not out:
            return torch.zeros(0, self.cfg.tokens_per_frame, dtype=torch.long, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """tokens (any integer dtype, e.g. the uint16 cache) [N, 36] -> frames float32 [N, 84, 84] in [0, 1]."""
        t_all = torch.as_tensor(np.asarray(tokens, dtype=np.int64) if isinstance(tokens, np.ndarray) else tokens)
        if t_all.dim() != 2 or t_all.shape[1] != self.cfg.tokens_per_frame:
            raise ValueError(f"tokens must be [N, {self.cfg.tokens_per_frame}], got {tuple(t_all.shape)}")
        out = []
        for chunk in t_all.split(batch_size):
            z_q = self.quantizer.lookup(chunk.to(self.device, torch.long))  # [n, 36, D]
            out.append(self._reconstruct(z_q).float().clamp_(0.0, 1.0))
        if not out:
            return torch.zeros(0, FRAME_SIZE, FRAME_SIZE, device=self.device)
        return torch.cat(out)

    def tokenizer_id(self) -> str:
        """A stable id: hash of the architecture and of every weight that decides tokens and reconstructions.

        Training-only statistics (EMA sums, usage counters) are left out, so a frozen tokenizer keeps its id.
        """
        h = hashlib.sha256(json.dumps(self.cfg.architecture_dict(), sort_keys=True).encode())
        skip = ("quantizer.usage", "quantizer.ema_count", "quantizer.ema_sum", "quantizer.initialized")
        for name, tensor in sorted(self.state_dict().items()):
            if name in skip:
                continue
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return "vq-" + h.hexdigest()[:16]

    def flops_per_frame(self) -> dict[str, float]:
        """Multiply-adds x 2 of one frame through encoder, codebook search and decoder (convs and matmuls only)."""
        counts = {"encoder": 0.0, "decoder": 0.0}
        hooks = []

        def conv_hook(part):
            def hook(module: nn.Conv2d, _inp, out):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                counts[part] += 2.0 * k * out.shape[1] * out.shape[2] * out.shape[3]
            return hook

        for part, net in (("encoder", self.encoder), ("decoder", self.decoder)):
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    hooks.append(m.register_forward_hook(conv_hook(part)))
        try:
            with torch.no_grad():
                z = self._latents(torch.zeros(1, 1, FRAME_SIZE, FRAME_SIZE, device=self.device))
                self._reconstruct(z)
        finally:
            for hk in hooks:
                hk.remove()
        counts["quantizer"] = 2.0 * self.cfg.tokens_per_frame * self.cfg.codebook_size * self.cfg.codebook_dim
        counts["total"] = counts["encoder"] + counts["decoder"] + counts["quantizer"]
        return counts


# ------------------------------------------------------------------------------------------ loading
def build_tokenizer(cfg: TokenizerConfig) -> VQTokenizer:
    """A fresh tokenizer with weights drawn from `cfg.seed` (the global torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return VQTokenizer(cfg)


def load_tokenizer(run_or_path: str | Path, device: str | torch.device = "cpu") -> VQTokenizer:
    """The frozen tokenizer (eval mode, no gradients) of a run directory (its newest checkpoint) or a checkpoint.

    The id recomputed from the weights must equal the one recorded at save time (else the file is damaged).
    """
    from wam.worldmodel.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(Path(run_or_path)) if Path(run_or_path).is_dir() else Path(run_or_path)
    ckpt = load_checkpoint(path, kind=CHECKPOINT_KIND)
    cfg = TokenizerConfig.from_stored(ckpt["config"])
    model = VQTokenizer(cfg)
    model.load_state_dict(ckpt["model"])
    model.requires_grad_(False).eval().to(device)
    tid = model.tokenizer_id()
    if tid != ckpt.get("tokenizer_id"):
        raise WamError(f"{path}: the weights hash to tokenizer id {tid} but the checkpoint records "
                       f"{ckpt.get('tokenizer_id')!r}; the file is damaged or was edited — retrain or use another checkpoint")
    model.extra = dict(ckpt.get("summary", {}), checkpoint=str(path), step=int(ckpt.get("step", 0)))
    log.info("loaded tokenizer %s from %s (step %s)", tid, path, ckpt.get("step"))
    return model


__all__ = [
    "CHECKPOINT_KIND", "FOREGROUND_THRESHOLD", "FRAME_SIZE", "GRID_SIZE", "LEGACY_DEFAULTS", "TOKENS_PER_FRAME",
    "TOKENIZER_PRESETS", "ForegroundFidelity", "TokenizerConfig",
    "TokenizerOutput", "VQTokenizer", "VectorQuantizer", "build_tokenizer", "foreground_fidelity",
    "foreground_mask", "foreground_weights", "image_gradient_l1",
    "load_tokenizer", "psnr",
]
