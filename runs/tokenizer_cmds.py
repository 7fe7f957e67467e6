"""`wam tokenizer train`, `wam tokenize` and `wam tokenizer probe`: train the frame tokenizer, fill the datasets'
token caches, and probe the frozen tokens for object coordinates.

    wam tokenizer train --preset debug --data DIR... --out RUN [--steps N] [--resume]
    wam tokenize --tokenizer RUN --data DIR...
    wam tokenizer probe RUN --data DIR... --out DIR [--max-frames 20000] [--no-pixels]

The first two end with one summary line: held-out PSNR against the mean-frame baseline and codebook usage.
Details of the model and the training loop: docs/tokenizer.md, `wam.worldmodel.tokenizer(_train)`; of the
probe: docs/probe.md, `wam.worldmodel.probe`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from wam.datasets.errors import WamError
from wam.worldmodel.probe import ProbeConfig
from wam.worldmodel.tokenizer import TokenizerConfig, TokenizerTrainConfig

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainArgs:
    """Train the VQ-VAE frame tokenizer on the frames of one or more datasets."""

    data: tuple[str, ...] = ()
    """Dataset directories (or roots holding datasets); the last 10 % of each one's episodes are held out."""
    out: str = ""
    """Run directory: config.json, metrics.jsonl, checkpoints/, plots/ (reconstruction grids)."""
    preset: str = "debug"
    """Size preset: debug, small, jowa-40m, jowa-70m, jowa-150m (sets every --tokenizer.* and --train.* default)."""
    steps: int | None = None
    """Training steps (default: --train.steps, the preset's); with --resume, extends or shortens the run."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (with its stored configuration)."""
    progress: bool = True
    """Show a progress bar."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """What the tokenizer is: architecture, reconstruction loss, codebook upkeep."""
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    """How it is trained: optimiser, schedule, frame pool, evaluation and checkpoint cadence, device, seed."""

    @classmethod
    def from_preset(cls, name: str) -> TokenizerTrainArgs:
        return cls(preset=name, tokenizer=TokenizerConfig.from_preset(name), train=TokenizerTrainConfig.from_preset(name))


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


@dataclass
class TokenizerProbeArgs:
    """Probe a frozen tokenizer: held-out R² of RAM object coordinates from its tokens vs the raw pixels (AtariARI)."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """Tokenizer run directory (its newest checkpoint) or checkpoint file."""
    data: tuple[str, ...] = ()
    """Dataset directories (or roots holding datasets) with recorded RAM (`wam data collect` records it)."""
    out: str = ""
    """Output directory: probe.json, probe.md (table), probe.png (bars)."""
    device: str = "cpu"
    """Device of the tokenizer when frames must be encoded (cpu, cuda or auto); the probes run on the CPU."""
    progress: bool = True
    """Print a line after each stage."""
    probe: Annotated[ProbeConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ProbeConfig)
    """Probe settings."""


def train(args: TokenizerTrainArgs) -> int:
    """`wam tokenizer train`."""
    from wam.worldmodel.tokenizer_train import train_tokenizer

    if not args.out:
        raise WamError("give the run directory with --out RUN")
    # with --resume the run's stored configuration is used; --steps still applies
    result = train_tokenizer(args.tokenizer, args.train, args.data, args.out, resume=args.resume,
                             progress=args.progress, steps=args.steps)
    print(result.summary_line())
    return 0


def tokenize(args: TokenizeArgs) -> int:
    """`wam tokenize`."""
    from wam.worldmodel.device import resolve_device
    from wam.worldmodel.tokenizer import load_tokenizer
    from wam.worldmodel.tokenizer_train import encode_datasets

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


def probe(args: TokenizerProbeArgs) -> int:
    """`wam tokenizer probe`."""
    import sys

    from wam.worldmodel.probe import probe_tokenizer

    if not args.out:
        raise WamError("give the output directory with --out DIR")

    def say(line: str) -> None:
        if args.progress:
            print(line, file=sys.stderr, flush=True)

    report = probe_tokenizer(args.run, args.data, args.out, args.probe, device=args.device, say=say)
    print(report.summary_line())
    return 0
