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
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wam.datasets.errors import WamError
from wam.datasets.store import TrajectoryStore
from wam.worldmodel.checkpoint import (
    RunDir,
    config_to_dict,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from wam.worldmodel.device import resolve_device
from wam.worldmodel.frame_pool import FramePool, heldout_frames, resolve_data, split_episodes
from wam.worldmodel.tokenize_cache import EncodeSummary, encode_datasets
from wam.worldmodel.tokenizer import (
    CHECKPOINT_KIND,
    TokenizerConfig,
    VQTokenizer,
    build_tokenizer,
    load_tokenizer,
)
from wam.worldmodel.tokenizer_eval import (
    PLOT_FRAMES,
    EvalResult,
    evaluate,
    fg_gains,
    gains_text,
    plot_reconstructions,
    plot_selection,
)
from wam.worldmodel.trainer import StopFlag

log = logging.getLogger(__name__)

LOG_INTERVAL = 10
"""Steps between two rows of training averages in metrics.jsonl."""

__all__ = ["EncodeSummary", "EvalResult", "FramePool", "TrainResult", "encode_datasets", "fg_gains", "gains_text",
           "load_tokenizer", "split_episodes", "train_tokenizer"]


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
        paths = resolve_data(data) if data else stored_data
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
        paths = resolve_data(data)

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
    plot_idx = plot_selection(eval_owner, PLOT_FRAMES)
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


