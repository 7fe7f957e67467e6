"""Training the frame tokenizer, and encoding datasets into the token cache.

`train_tokenizer(cfg, train, data, out)` trains a `VQTokenizer` (`cfg`, a `TokenizerConfig`: what the tokenizer
is) on single frames of one or more datasets, with the settings of `train` (a `TokenizerTrainConfig`):

- **Held-out episodes.** The last `holdout_fraction` of each dataset's episodes (at least one; a dataset
  with a single episode gives none) are never trained on; every `eval_every` steps a fixed set of
  `eval_frames` frames spread evenly over them is encoded and decoded: held-out PSNR (from the mean squared
  error over all those pixels), codebook usage (fraction of the codes that occur) and perplexity, beside the
  PSNR of the **mean-frame baseline** (each dataset's per-pixel mean training frame, predicting every frame).
- **Frames.** A `FramePool` keeps up to `pool_frames` training frames in RAM: every training episode when
  they fit, otherwise random windows of `pool_window` frames, a quarter of them replaced every
  `pool_refresh_every` steps. Batches are drawn uniformly from the pool.
- **Loop.** The generic `Trainer` (`worldmodel/trainer.py`, the world-action model's loop too) trains a
  `TokenizerObjective` on batches of a `FrameSource`: AdamW (betas 0.9, 0.999; decay on conv kernels only),
  linear warm-up, cosine decay to 10 %, gradient clipping, optional bf16 autocast, a tqdm bar,
  `metrics.jsonl` rows every 10 steps (the window's training averages; the held-out figures join the row of
  their step), a PNG grid of held-out frames beside their reconstructions every `plot_every` steps
  (`plots/recon_step_XXXXXXXX.png`, matplotlib's Agg canvas), atomic self-describing checkpoints of kind
  "tokenizer" (config and training config, weights, optimizer, schedule, step, RNG states, pool and sampler
  state, tokenizer id, data, the last evaluation). `resume=True` continues from the newest checkpoint exactly (same batches, same
  weights as an uninterrupted run on CPU; checkpoints of the loop before it was shared resume too). Ctrl-C
  finishes the step, saves and raises KeyboardInterrupt.

`encode_datasets(tokenizer, dirs)` writes every frame's tokens (uint16 `[T+1, 36]` per episode) into each
dataset's token cache through `TrajectoryStore.write_tokens`, tagged with the tokenizer id. It is
idempotent (datasets already cached by this tokenizer are skipped; episodes appended since are encoded)
and refuses, before encoding anything, datasets cached by another tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wam.datasets.errors import WamError
from wam.datasets.store import TrajectoryStore
from wam.worldmodel.checkpoint import RunDir, config_to_dict, load_checkpoint
from wam.worldmodel.device import resolve_device
from wam.worldmodel.frame_pool import FramePool, heldout_frames, resolve_data, split_episodes
from wam.worldmodel.tokenize_cache import EncodeSummary, encode_datasets
from wam.worldmodel.tokenizer import (
    CHECKPOINT_KIND,
    TokenizerConfig,
    TokenizerTrainConfig,
    VQTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from wam.worldmodel.tokenizer_eval import (
    PLOT_FRAMES,
    TokenizerEvalResult,
    evaluate_tokenizer,
    fg_gains,
    gains_text,
    plot_reconstructions,
    plot_selection,
)
from wam.worldmodel.trainer import Trainer, TrainerConfig
from wam.worldmodel.trainer import make_optimizer as make_trainer_optimizer

log = logging.getLogger(__name__)

LOG_INTERVAL = 10
"""Steps between two rows of training averages in metrics.jsonl."""

__all__ = ["EncodeSummary", "FramePool", "TokenizerEvalResult", "TokenizerTrainResult", "encode_datasets", "fg_gains",
           "gains_text", "load_tokenizer", "split_episodes", "train_tokenizer"]


# -------------------------------------------------------------------------------------- training
@dataclass
class TokenizerTrainResult:
    """What a training call ends with (also the command's one-line summary)."""

    run_dir: Path
    step: int
    tokenizer_id: str
    eval: TokenizerEvalResult
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


def trainer_config(cfg: TokenizerTrainConfig, progress: bool = True) -> TrainerConfig:
    """The generic loop's settings for a tokenizer run: AdamW (betas 0.9, 0.999), linear warm-up, then cosine
    from `lr` to `lr / 10` at `cfg.steps`, gradient clipping, optional bf16 autocast."""
    return TrainerConfig(steps=cfg.steps, lr=cfg.lr, min_lr=cfg.lr * 0.1, warmup_steps=cfg.warmup_steps,
                         schedule="cosine", weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                         grad_clip=cfg.grad_clip, precision={"none": "fp32"}.get(cfg.autocast, cfg.autocast),
                         device=cfg.device, log_every=LOG_INTERVAL, checkpoint_every=cfg.checkpoint_every,
                         progress=progress)


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay on conv kernels only (not biases, norms, the pixel bias, the backgrounds or the codebook)."""
    return p.dim() == 4 and not name.startswith(("decoder.pixel_bias", "decoder.backgrounds"))


def make_optimizer(model: VQTokenizer, cfg: TokenizerTrainConfig) -> torch.optim.AdamW:
    """The optimizer a tokenizer run trains with (`trainer_config`, `decays`)."""
    return make_trainer_optimizer(model, trainer_config(cfg), decays)


@dataclass
class FrameBatch:
    """Training frames and the dataset each comes from."""

    frames: torch.Tensor  # [B, 84, 84] uint8
    owner: torch.Tensor  # [B] int64, index into the run's datasets

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FrameBatch:
        return FrameBatch(self.frames.to(device, non_blocking=non_blocking),
                          self.owner.to(device, non_blocking=non_blocking))


class FrameSource:
    """Batches drawn uniformly from a `FramePool` with a NumPy generator; when the pool holds windows, a
    quarter of them is replaced every `refresh_every` batches. Its state (the pool's windows, the generator,
    the batches drawn, the run's mean and median frames) goes into every checkpoint."""

    def __init__(self, pool: FramePool, rng: np.random.Generator, batch_size: int, refresh_every: int,
                 mean_frames: np.ndarray, median_frames: np.ndarray) -> None:
        self.pool, self.rng, self.batch_size, self.refresh_every = pool, rng, batch_size, refresh_every
        self.mean_frames, self.median_frames = mean_frames, median_frames
        self.drawn = 0

    def sample(self) -> FrameBatch:
        if self.drawn and not self.pool.fits and self.drawn % self.refresh_every == 0:
            self.pool.refresh(0.25, self.rng)
        frames, owner = self.pool.sample(self.batch_size, self.rng)  # [B, 84, 84] uint8, [B]
        self.drawn += 1
        return FrameBatch(torch.from_numpy(frames), torch.from_numpy(np.asarray(owner, np.int64)))

    def state_dict(self) -> dict[str, Any]:
        return {**self.pool.state_dict(), "rng": _rng_json(self.rng), "drawn": self.drawn,
                "mean_frames": torch.from_numpy(self.mean_frames),
                "median_frames": torch.from_numpy(self.median_frames)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The generator and the count; the pool is built from the same state's windows (`train_tokenizer`)."""
        self.rng = _rng_from_json(state["rng"])
        self.drawn = int(state["drawn"])


class TokenizerObjective(nn.Module):
    """The tokenizer's loss on a frame batch, each frame against its game's median frame (the background)."""

    def __init__(self, model: VQTokenizer, median_frames: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("median", torch.from_numpy(median_frames), persistent=False)

    def forward(self, batch: FrameBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.compute_loss(batch.frames, self.median[batch.owner])


def _rng_json(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _rng_from_json(text: str) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(text)
    return rng


def _same_data(paths: Sequence[Path], fingerprints: list[str] | None) -> bool:
    """True when the datasets at `paths` hold what the run was trained on (moved or copied since)."""
    if not fingerprints or len(fingerprints) != len(paths):
        return False  # checkpoints written before fingerprints: only the same paths resume
    try:
        return [TrajectoryStore.open(p).fingerprint() for p in paths] == list(fingerprints)
    except WamError:
        return False


def _starting_point(cfg: TokenizerConfig, train: TokenizerTrainConfig, data: Sequence[str | Path], run: RunDir,
                    resume: bool, steps: int | None
                    ) -> tuple[TokenizerConfig, TokenizerTrainConfig, list[Path], dict[str, Any] | None]:
    """(config, training config, dataset paths, checkpoint to resume or None) of a `train_tokenizer` call, with
    its clear errors."""
    ckpt = None
    if resume:
        latest = run.latest()
        if latest is None:
            raise WamError(f"--resume: {run.path} has no checkpoint to resume from; start without --resume")
        ckpt = load_checkpoint(latest, kind=CHECKPOINT_KIND)
        cfg = TokenizerConfig.from_stored(ckpt["config"])
        train = TokenizerTrainConfig.from_checkpoint(ckpt)
        stored_data = [Path(p) for p in ckpt["data"]]
        paths = resolve_data(data) if data else stored_data
        if [p.resolve() for p in paths] != [p.resolve() for p in stored_data] and not _same_data(
                paths, ckpt.get("data_fingerprints")):
            raise WamError(f"--resume: the run was trained on {[str(p) for p in stored_data]}, not "
                           f"{[str(p) for p in paths]}; resume with the same --data (or none)")
    elif run.latest() is not None:
        raise WamError(f"{run.path} already holds a tokenizer run; pass --resume to continue it or choose "
                       f"another --out")
    if steps is not None and steps != train.steps:
        log.info("training to step %d (the config says %d)", steps, train.steps)
        train = dataclasses.replace(train, steps=steps)
    if not resume:
        paths = resolve_data(data)
    return cfg, train, paths, ckpt


def _frame_source(cfg: TokenizerTrainConfig, stores: list[TrajectoryStore], train_splits: list, titles: list[str],
                  ckpt: dict[str, Any] | None) -> tuple[FrameSource, dict[str, Any] | None]:
    """The frame source of a fresh run, or of a resumed one with the checkpoint in the shared loop's form."""
    if ckpt is None:
        rng = np.random.default_rng(cfg.seed)
        pool = FramePool(stores, train_splits, cfg.pool_frames, cfg.pool_window, rng)
        return FrameSource(pool, rng, cfg.batch_size, cfg.pool_refresh_every, pool.mean_frames(),
                           pool.median_frames(titles)), None
    state = ckpt["sampler"][0] if isinstance(ckpt["sampler"], list) else ckpt["sampler"]  # dict: the old loop's
    state = {"drawn": int(ckpt["step"]), **state}
    rng = _rng_from_json(state["rng"])  # the pool is rebuilt from its windows and draws nothing from it
    pool = FramePool(stores, train_splits, cfg.pool_frames, cfg.pool_window, rng, windows=state["windows"].numpy())
    median = (state["median_frames"].numpy() if "median_frames" in state
              else pool.median_frames(titles))  # checkpoints before foreground fidelity
    source = FrameSource(pool, rng, cfg.batch_size, cfg.pool_refresh_every, state["mean_frames"].numpy(), median)
    return source, {**ckpt, "sampler": [state]}


def train_tokenizer(cfg: TokenizerConfig, train: TokenizerTrainConfig, data: Sequence[str | Path], out: str | Path,
                    resume: bool = False, progress: bool = True, stop_at: int | None = None, steps: int | None = None
                    ) -> TokenizerTrainResult:
    """Train tokenizer `cfg` with settings `train` on datasets `data` into run directory `out` (module docstring).

    resume: continue the run in `out` from its newest checkpoint with the run's stored configs (`cfg` and
        `train` are ignored); `data` may be empty (the run's datasets are used) or must name the same datasets.
    steps: if given, overrides `train.steps` (with `resume`: extends or shortens the run).
    stop_at: stop after this step as if Ctrl-C had been pressed, but without raising (saves a checkpoint);
        for tests and time-boxed jobs.
    """
    run = RunDir(out)
    cfg, train, paths, ckpt = _starting_point(cfg, train, data, run, resume, steps)
    device = resolve_device(train.device)
    stores = [TrajectoryStore.open(p) for p in paths]
    titles, splits = [s.game for s in stores], split_episodes(stores, train.holdout_fraction)
    model = build_tokenizer(cfg, seed=train.seed).to(device)
    if ckpt is None:
        torch.manual_seed(train.seed)  # after the model is built, as the runs recorded in docs/ were
    source, ckpt = _frame_source(train, stores, [t for t, _ in splits], titles, ckpt)
    last_eval = TokenizerEvalResult(**ckpt["eval"]) if ckpt is not None and ckpt.get("eval") else None
    run.write_config(cfg, train=config_to_dict(train), data=[str(p) for p in paths], kind=CHECKPOINT_KIND)

    eval_frames, eval_owner = heldout_frames(stores, [h for _, h in splits], train.eval_frames)
    plot_idx = plot_selection(eval_owner, PLOT_FRAMES)
    log.info("tokenizer: %d datasets, %d training frames, %d held-out evaluation frames, device %s, autocast %s",
             len(stores), source.pool.total_frames, len(eval_frames), device, train.autocast)
    seen = {"eval": last_eval,
            "step": int(ckpt["summary"].get("eval_step", ckpt["step"])) if ckpt and ckpt.get("summary") else 0}
    end = train.steps if stop_at is None else min(stop_at, train.steps)

    def run_eval(step: int) -> TokenizerEvalResult:
        result, recon = evaluate_tokenizer(model, eval_frames, eval_owner, source.mean_frames,
                                           median_frames=source.median_frames, games=titles)
        seen.update(eval=result, step=step)
        if step % train.plot_every == 0 or step == train.steps:
            grid = run.path / "plots" / f"recon_step_{step:08d}.png"
            plot_reconstructions(grid, eval_frames[plot_idx], recon[plot_idx], step, result,
                                 [titles[d] for d in eval_owner[plot_idx]])
            run.log_image(step, "reconstructions", grid)
        log.info("step %d: held-out PSNR %.2f dB (mean frame %.2f dB), usage %.0f%%; %s", step, result.psnr,
                 result.baseline_psnr, 100 * result.usage, result.fg_text())
        return result

    def eval_hook(step: int) -> dict[str, float]:
        due = step % train.eval_every == 0 or step % train.plot_every == 0 or step == train.steps
        return run_eval(step).metrics() if due or (step == end and seen["eval"] is None) else {}

    def checkpoint_extra() -> dict[str, Any]:
        e = seen["eval"]
        return {"tokenizer_id": model.tokenizer_id(),  # a hash of the weights as they are now
                "eval": dataclasses.asdict(e) if e else None,
                "summary": {**e.metrics(), "eval_step": seen["step"]} if e else {}}

    meta = {"kind": CHECKPOINT_KIND, "config": config_to_dict(cfg), "train": config_to_dict(train),
            "data": [str(p) for p in paths], "data_fingerprints": [st.fingerprint() for st in stores]}  # moved-data resume
    trainer = Trainer(TokenizerObjective(model, source.median_frames), source, trainer_config(train, progress),
                      run_dir=run, checkpoint_meta=meta, evaluate=eval_hook, eval_every=1,
                      count=lambda b: len(b.frames), unit="images", decays=decays, window_mean=True,
                      checkpoint_extra=checkpoint_extra, desc="tokenizer")
    if ckpt is not None:
        trainer.load_state(ckpt)
        log.info("resumed tokenizer run %s at step %d", run.path, trainer.step)
    start_step = trainer.step
    try:
        result = trainer.fit(until_step=end)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; saved a checkpoint (continue with --resume)", trainer.step)
        raise
    if seen["eval"] is None:  # a resumed run that was already at its end
        run.log_metrics(trainer.step, run_eval(trainer.step).metrics())
    path = result.checkpoint
    if path is None or path != run.checkpoint_path(trainer.step):
        path = trainer.save()
    assert path is not None and seen["eval"] is not None
    return TokenizerTrainResult(run_dir=run.path, step=trainer.step, tokenizer_id=model.tokenizer_id(),
                                eval=seen["eval"], checkpoint=path, codebook_size=cfg.codebook_size, model=model,
                                images_per_s=result.tokens_per_s if trainer.step > start_step else 0.0)


