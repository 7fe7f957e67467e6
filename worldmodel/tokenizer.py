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

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wam.datasets.errors import WamError
from wam.worldmodel.fidelity import (
    ForegroundFidelity,
    foreground_fidelity,
    foreground_mask,
    foreground_weights,
    image_gradient_l1,
    psnr,
)
from wam.worldmodel.tokenizer_config import (
    CHECKPOINT_KIND,
    FOREGROUND_THRESHOLD,
    FRAME_SIZE,
    GRID_SIZE,
    LEGACY_DEFAULTS,
    LEVEL_SIZES,
    TOKENIZER_PRESETS,
    TOKENS_PER_FRAME,
    TokenizerConfig,
    TokenizerPreset,
    TokenizerTrainConfig,
)
from wam.worldmodel.vq import Quantized, VectorQuantizer

log = logging.getLogger(__name__)


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
            layers += [Upsample(c[level], c[level - 1], LEVEL_SIZES[level - 1]), nn.SiLU()]
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
        self.train_cfg: TokenizerTrainConfig | None = None
        """How the loaded weights were trained (set by `load_tokenizer`; its held-out split is the probe's)."""

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
def build_tokenizer(cfg: TokenizerConfig, seed: int = 0) -> VQTokenizer:
    """A fresh tokenizer with weights drawn from `seed` (training uses `TokenizerTrainConfig.seed`; the global
    torch RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
    model.train_cfg = TokenizerTrainConfig.from_checkpoint(ckpt)
    log.info("loaded tokenizer %s from %s (step %s)", tid, path, ckpt.get("step"))
    return model


__all__ = [
    "CHECKPOINT_KIND", "FOREGROUND_THRESHOLD", "FRAME_SIZE", "GRID_SIZE", "LEGACY_DEFAULTS", "TOKENS_PER_FRAME",
    "TOKENIZER_PRESETS", "ForegroundFidelity", "TokenizerConfig", "TokenizerPreset", "TokenizerTrainConfig",
    "TokenizerOutput", "VQTokenizer", "VectorQuantizer", "build_tokenizer", "foreground_fidelity",
    "foreground_mask", "foreground_weights", "image_gradient_l1",
    "load_tokenizer", "psnr",
]
