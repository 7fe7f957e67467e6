"""`wam tokenizer train` and `wam tokenize`: train the frame tokenizer, then fill the datasets' token caches.

    wam tokenizer train --preset debug --data DIR... --out RUN [--steps N] [--resume]
    wam tokenize --tokenizer RUN --data DIR...

Both end with one summary line: held-out PSNR against the mean-frame baseline and codebook usage.
Details of the model and the training loop: docs/tokenizer.md, `wam.worldmodel.tokenizer(_train)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from wam.datasets.errors import WamError
from wam.worldmodel.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainArgs:
    """Train the VQ-VAE frame tokenizer on the frames of one or more datasets."""

    data: tuple[str, ...] = ()
    """Dataset directories (or roots holding datasets); the last 10 % of each one's episodes are held out."""
    out: str = ""
    """Run directory: config.json, metrics.jsonl, checkpoints/, plots/ (reconstruction grids)."""
    preset: str = "debug"
    """Size preset: debug, small, jowa-40m, jowa-70m, jowa-150m (sets every --tokenizer.* default)."""
    steps: int | None = None
    """Training steps (default: the preset's); with --resume, extends or shortens the run."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (with its stored configuration)."""
    progress: bool = True
    """Show a progress bar."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Architecture, codebook upkeep and training hyper-parameters."""

    @classmethod
    def from_preset(cls, name: str) -> TokenizerTrainArgs:
        return cls(preset=name, tokenizer=TokenizerConfig.from_preset(name))


@dataclass
class TokenizeArgs:
    """Encode every frame of the datasets into their token caches with a trained tokenizer."""

    tokenizer: str
    """Tokenizer run directory (its newest checkpoint) or checkpoint file."""
    data: tuple[str, ...]
    """Dataset directories (or roots holding datasets)."""
    batch_size: int = 256
    """Frames encoded per forward pass."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    progress: bool = True
    """Show a progress bar."""


def train(args: TokenizerTrainArgs) -> int:
    """`wam tokenizer train`."""
    from wam.worldmodel.tokenizer_train import train_tokenizer

    if not args.out:
        raise WamError("give the run directory with --out RUN")
    # with --resume the run's stored configuration is used; --steps still applies
    result = train_tokenizer(args.tokenizer, args.data, args.out, resume=args.resume, progress=args.progress,
                             steps=args.steps)
    print(result.summary_line())
    return 0


def tokenize(args: TokenizeArgs) -> int:
    """`wam tokenize`."""
    from wam.worldmodel.tokenizer import load_tokenizer
    from wam.worldmodel.tokenizer_train import encode_datasets
    from wam.worldmodel.trainer import resolve_device

    model = load_tokenizer(args.tokenizer, device=resolve_device(args.device))
    s = encode_datasets(model, args.data, batch_size=args.batch_size, progress=args.progress)
    facts = model.extra
    quality = (f"held-out PSNR {facts['heldout_psnr']:.2f} dB vs mean-frame baseline {facts['baseline_psnr']:.2f} dB"
               if "heldout_psnr" in facts else "no held-out evaluation recorded")
    usage = (f"codebook usage {s.usage:.0%} of {model.cfg.codebook_size} codes in the encoded frames"
             if s.usage is not None else
             f"codebook usage {facts.get('heldout_usage', float('nan')):.0%} on held-out frames")
    print(f"tokenized {len(s.encoded)} of {len(s.datasets)} dataset(s) ({len(s.skipped)} already cached), "
          f"{s.frames} frames in {s.seconds:.1f} s with tokenizer {s.tokenizer_id}: {quality}, {usage}")
    return 0
