"""The tokenizer's configuration, its presets and the constants of its frame and token grid."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from wam.datasets.config import preset_value
from wam.datasets.errors import WamError

FRAME_SIZE = 84
"""Side of the square grayscale frames the tokenizer reads."""
GRID_SIZE = 6
"""Side of the default latent token grid (JOWA's); each frame becomes GRID_SIZE**2 tokens. An 11x11 grid is a
config option (`TokenizerConfig.grid`)."""
TOKENS_PER_FRAME = GRID_SIZE * GRID_SIZE
FOREGROUND_THRESHOLD = 24
"""Default grey-level distance from the per-game median frame above which a pixel is foreground."""
# Spatial sizes of the levels: space-to-depth 84 -> 42, then 3x3 stride-2 convs with padding 1: 42 -> 21 -> 11 -> 6.
LEVEL_SIZES = (42, 21, 11, 6)
GRID_LEVELS = {6: 4, 11: 3}  # token grid side -> resolution levels
CHECKPOINT_KIND = "tokenizer"


# ------------------------------------------------------------------------------------------ config
@dataclass
class TokenizerConfig:
    """VQ-VAE tokenizer: architecture, reconstruction loss and codebook upkeep (what the tokenizer is; how it is
    trained is `TokenizerTrainConfig`).

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

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        if not 2 <= self.codebook_size <= 65_536:
            raise WamError(f"codebook_size must be in [2, 65536] (tokens are stored as uint16), got {self.codebook_size}")
        if self.grid not in (6, 11):
            raise WamError(f"grid must be 6 (36 tokens a frame) or 11 (121 tokens), got {self.grid}")
        if self.grid == 11 and len(self.channels) == 4:
            self.channels = self.channels[:3]  # type: ignore[assignment]
        if len(self.channels) != GRID_LEVELS[self.grid]:
            raise WamError(f"channels needs one entry per resolution level: {GRID_LEVELS[self.grid]} for grid {self.grid} "
                           f"({', '.join(map(str, LEVEL_SIZES[:GRID_LEVELS[self.grid]]))} cells wide), got {self.channels}")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 < self.usage_decay < 1.0:
            raise WamError(f"ema_decay must be in [0, 1) and usage_decay in (0, 1), got {self.ema_decay}, {self.usage_decay}")
        if not 0.0 < self.foreground_max_share < 1.0:
            raise WamError(f"foreground_max_share must be in (0, 1), got {self.foreground_max_share}")
        if self.foreground_small_object < 0:
            raise WamError(f"foreground_small_object must be >= 0, got {self.foreground_small_object}")
        if self.foreground_weight < 0 or not 0 <= self.foreground_threshold <= 255:
            raise WamError(f"foreground_weight must be >= 0 and foreground_threshold in [0, 255], got "
                           f"{self.foreground_weight}, {self.foreground_threshold}")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_preset(cls, name: str) -> TokenizerConfig:
        """The named preset: debug, small, jowa-40m, jowa-70m or jowa-150m."""
        return dataclasses.replace(preset_value(TOKENIZER_PRESETS, name, what="tokenizer preset").model)

    @classmethod
    def from_stored(cls, data: dict) -> TokenizerConfig:
        """The config a checkpoint or config.json recorded. Fields added since take the value that reproduces the
        behaviour of the version that wrote it (`LEGACY_DEFAULTS`), not today's default. Checkpoints written
        before the split recorded the training fields in the same dict; they are left to `TokenizerTrainConfig`."""
        from wam.worldmodel.checkpoint import config_from_dict

        return config_from_dict(cls, {**LEGACY_DEFAULTS, **{k: v for k, v in data.items() if k not in TRAIN_FIELDS}})

    def architecture_dict(self) -> dict[str, object]:
        """The fields that decide what the weights mean (hashed into the tokenizer id)."""
        keys = ("codebook_size", "codebook_dim", "channels", "res_blocks", "normalize_codes")
        if self.background_bank:  # only when set, so tokenizers trained before the bank keep their ids
            keys += ("background_bank",)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}


@dataclass
class TokenizerTrainConfig:
    """How a tokenizer is trained: optimiser, schedule, data pool, evaluation and checkpoint cadence, device.

    The defaults are the `debug` preset's; `TokenizerTrainConfig.from_preset(name)` gives the others.
    """

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
    eval_every: int = 100
    """Evaluate on held-out episodes (PSNR, codebook usage) every this many steps (and at the end)."""
    plot_every: int = 200
    """Write a PNG grid of held-out frames beside their reconstructions every this many steps (and at the end)."""
    checkpoint_every: int = 200
    """Save a checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    holdout_fraction: float = 0.1
    """Fraction of each dataset's episodes (the last ones) held out for evaluation (at least one)."""
    eval_frames: int = 256
    """Held-out frames used for each evaluation (spread evenly over the held-out episodes)."""
    pool_frames: int = 20_000
    """Training frames kept in RAM; larger datasets are sampled as random windows, refreshed as training runs."""
    pool_window: int = 32
    """Length of the windows (consecutive frames) read into the training pool."""
    pool_refresh_every: int = 500
    """Replace a quarter of the pool's windows every this many steps (only when the data do not fit)."""
    autocast: str = "none"
    """Mixed precision of training: "none" (fp32), "bf16" (torch.autocast; codebook search stays fp32) or "auto"
    (bf16 where the device runs it natively, `wam.worldmodel.trainer.bf16_is_fast`, else fp32)."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda"."""
    seed: int = 0
    """Seed of the weights, the sampler and the codebook restarts."""

    def __post_init__(self) -> None:
        if self.autocast not in ("none", "bf16", "auto"):
            raise WamError(f"autocast must be 'none', 'bf16' or 'auto', got {self.autocast!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise WamError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise WamError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in ("batch_size", "steps", "eval_every", "plot_every", "checkpoint_every", "eval_frames",
                     "pool_frames", "pool_window", "pool_refresh_every"):
            if getattr(self, name) <= 0:
                raise WamError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, name: str) -> TokenizerTrainConfig:
        """The named preset's training settings: debug, small, jowa-40m, jowa-70m or jowa-150m."""
        return dataclasses.replace(preset_value(TOKENIZER_PRESETS, name, what="tokenizer preset").train)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TokenizerTrainConfig:
        """The training settings a tokenizer checkpoint recorded: its `train` dict, or, before the split, the
        training fields of its `config` dict (where the cadences were named `*_interval`)."""
        from wam.worldmodel.checkpoint import config_from_dict

        data = {RENAMED_TRAIN_FIELDS.get(k, k): v for k, v in ckpt.get("train", ckpt["config"]).items()}
        return config_from_dict(cls, {k: v for k, v in data.items() if k in TRAIN_FIELDS})


RENAMED_TRAIN_FIELDS = {"eval_interval": "eval_every", "plot_interval": "plot_every",
                        "checkpoint_interval": "checkpoint_every", "pool_refresh_interval": "pool_refresh_every"}
"""Names of training fields in checkpoints written before 2026-12-07 -> today's (`*_every`, as `TrainerConfig`)."""
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TokenizerTrainConfig)) | frozenset(RENAMED_TRAIN_FIELDS)
"""Names of the training fields, old and new (checkpoints written before the split stored them beside the
architecture)."""


@dataclass(frozen=True)
class TokenizerPreset:
    """A named tokenizer preset: what the tokenizer is, and how it is trained."""

    model: TokenizerConfig
    train: TokenizerTrainConfig


LEGACY_DEFAULTS: dict[str, object] = {"background_bank": 0, "foreground_weight": 0.0, "foreground_small_object": 0}
"""Values of fields added after tokenizers were first saved, for configs recorded without them (before the
background bank and the foreground weighting, every tokenizer had one bias image and an unweighted loss)."""

# The paper presets share one tokenizer: JOWA trains it once (stage 1, 2,048 x 512 codebook, 250k steps) and
# freezes it for every model size.
_JOWA = TokenizerPreset(
    TokenizerConfig(codebook_size=2048, codebook_dim=512, channels=(128, 128, 256, 256), res_blocks=2,
                    background_bank=0, foreground_weight=0.0, ema_decay=0.99, usage_decay=0.99,
                    dead_code_threshold=0.05),
    TokenizerTrainConfig(lr=1e-4, weight_decay=0.01, warmup_steps=2000, batch_size=128, steps=250_000,
                         eval_every=5000, plot_every=10_000, checkpoint_every=10_000, eval_frames=2048,
                         pool_frames=500_000, pool_refresh_every=5000, autocast="auto"),
)
TOKENIZER_PRESETS: dict[str, TokenizerPreset] = {
    # The defaults. Keeps the objects: foreground-weighted loss, a bank of 8 learned screens, 1,024 codes
    # (docs/tokenizer.md, "Keeping the objects", for the ablation that chose them).
    "debug": TokenizerPreset(TokenizerConfig(), TokenizerTrainConfig()),
    # debug + one residual block per level: the `small` recipe's tokenizer, minutes on 2 CPU cores. The block
    # lifted Freeway's foreground gain from +6.7 to above +8 dB (docs/tokenizer.md, "Keeping the objects").
    "small": TokenizerPreset(TokenizerConfig(res_blocks=1), TokenizerTrainConfig(steps=3000)),
    "jowa-40m": _JOWA,
    "jowa-70m": _JOWA,
    "jowa-150m": _JOWA,
}
"""Every tokenizer preset, as (architecture, training) config pairs."""
