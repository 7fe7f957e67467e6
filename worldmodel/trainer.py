"""A generic training loop: AdamW, warmup + cosine/linear schedule, gradient clipping and accumulation,
bf16 autocast, metrics.jsonl, a progress bar with tokens/s (and MFU), atomic self-describing
checkpoints and **bit-exact resume** on CPU.

The loop trains an *objective*: an `nn.Module` with `.model`, `forward(batch) -> (loss, logs)` and an
optional `after_step(step)` hook (e.g. `WorldActionObjective`, which hard-updates the target head).
Batches come from a *source* with `sample() -> Batch`, `state_dict()` and `load_state_dict()` (the
`SegmentSampler`, or `SyntheticTokenSource` for smoke tests and benchmarks).

Resume: a checkpoint holds the model (with its target head), optimizer, scheduler, step, the Python /
NumPy / torch RNG states and the source position(s); `Trainer.load_state` restores all of them, so
N steps straight and N/2 + resume + N/2 give the same parameters and loss trace on CPU. Rows of
`metrics.jsonl` past the checkpoint are dropped on resume (they are replayed).

Distributed: when `torch.distributed` is initialised with several processes (Ray Train launches
them, see `wam.runs.ray_train`), the objective is wrapped in DDP, rank 0 alone writes metrics and
checkpoints, and the checkpoint holds every rank's source position. Ctrl-C (SIGINT) finishes the
current step, saves a checkpoint and raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from wam.datasets.batch import Batch
from wam.worldmodel.checkpoint import RunDir, config_to_dict, rng_state, set_rng_state
from wam.worldmodel.device import (
    matmul_peak_flops,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the trainer reads batches from: anything with `.to(device, non_blocking)` (a `Batch`, or the
    tokenizer's frame batches)."""

    def sample(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping of a training run."""

    steps: int = 1000
    """Optimiser steps of the whole run (the schedule spans them)."""
    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 5e-5
    """Learning rate at the end of the schedule."""
    warmup_steps: int = 100
    """Linear warmup from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only; biases, norms and 1-D parameters are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """bf16 runs the forward pass under torch.autocast (CPU or GPU); parameters stay fp32. auto: bf16 where the
    device runs bf16 matmuls natively (`bf16_is_fast`: a CUDA GPU with bf16, a CPU with AVX-512-bf16 or AMX),
    else fp32 (on an AVX2-only CPU bf16 matmuls run ~100x slower than fp32)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    log_every: int = 10
    """Write a metrics.jsonl row every N steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every N steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run directory."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss, MFU)."""
    mfu: bool = False
    """Measure the matmul peak at start and show model-FLOPs utilisation."""


def make_optimizer(model: nn.Module, cfg: TrainerConfig,
                   decays: Callable[[str, nn.Parameter], bool] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters `decays(name, p)` picks (default: those with >= 2 dims, so
    not biases or norm scales) and none on the rest."""
    decays = decays or (lambda name, p: p.dim() >= 2)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if decays(n, p)]
    no_decay = [p for n, p in params if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: TrainerConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warmup, then cosine/linear/constant to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1 - (1 - floor) * progress
    return 1.0


def batch_tokens(batch: Batch) -> int:
    """Sequence tokens of a token batch: B x ((H+1) x 36 + H)."""
    return int(batch.obs[..., 0].numel() * batch.obs.shape[-1] + batch.actions.numel())


@dataclass
class TrainResult:
    step: int
    last_logs: dict[str, float]
    checkpoint: Path | None
    tokens_per_s: float
    data_wait_share: float


class StopFlag:
    """SIGINT -> finish the step, save, raise KeyboardInterrupt (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Trainer:
    """Trains `objective` on batches of `source`; see the module docstring.

    Args:
        objective: module with `.model` and `forward(batch) -> (loss, logs)`; optional `after_step(step)`.
        source: batch source (its position is checkpointed).
        cfg: optimisation settings.
        run_dir: where metrics and checkpoints go (None: nothing is written).
        checkpoint_meta: saved verbatim in every checkpoint: `kind`, `config` (plain dicts), tokenizer id/path...
        batch_transform: applied to every batch before the device copy (e.g. frames -> tokens).
        on_log: called with (step, logs) at every log step on every rank (Ray Train's report).
        flops_per_token: model training FLOPs per token, for MFU.
        evaluate: called on rank 0 with the step every `eval_every` steps (0 = never) and at the end; the flat
            dict it returns (e.g. `wam.worldmodel.diagnostics.q_calibration` figures) joins that step's
            metrics.jsonl row.
        count: items of a batch for the throughput figure (default: sequence tokens, `batch_tokens`), logged
            as `<unit>_per_s`.
        unit: what `count` counts ("tokens", "images").
        decays: which parameters get weight decay (`make_optimizer`).
        window_mean: log, every `log_every` steps, the mean of the window's steps (else the last step's).
        checkpoint_extra: called at every save; its dict joins the checkpoint (figures that change as the
            run goes, e.g. the tokenizer's last evaluation).
        desc: the progress bar's label.
    """

    def __init__(self, objective: nn.Module, source: BatchSource, cfg: TrainerConfig, run_dir: RunDir | None = None,
                 checkpoint_meta: dict[str, Any] | None = None,
                 batch_transform: Callable[[Batch], Batch] | None = None,
                 on_log: Callable[[int, dict[str, float]], None] | None = None,
                 flops_per_token: float | None = None,
                 evaluate: Callable[[int], dict[str, float]] | None = None, eval_every: int = 0,
                 count: Callable[[Any], int] | None = None, unit: str = "tokens",
                 decays: Callable[[str, nn.Parameter], bool] | None = None, window_mean: bool = False,
                 checkpoint_extra: Callable[[], dict[str, Any]] | None = None, desc: str = "train") -> None:
        self.cfg = cfg
        self.count = count or batch_tokens
        self.rate_key = f"{unit}_per_s"
        self.window_mean, self.checkpoint_extra, self.desc = window_mean, checkpoint_extra, desc
        self.evaluate, self.eval_every = evaluate, eval_every
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.objective = objective.to(self.device)
        self.model: nn.Module = objective.model
        self.source = source
        self.run_dir = run_dir
        self.meta = dict(checkpoint_meta or {})
        self.meta.setdefault("kind", "world-action-model")
        self.batch_transform = batch_transform
        self.on_log = on_log
        self.flops_per_token = flops_per_token
        self.step = 0
        dist = torch.distributed
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.wrapped: nn.Module = objective
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            log.info("Trainer: DDP over %d processes (rank %d)", self.world_size, self.rank)
        self.optimizer = make_optimizer(self.model, cfg, decays)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.loss_trace: list[float] = []

    # ------------------------------------------------------------------------------ checkpoint
    def _source_states(self) -> list[dict]:
        state = self.source.state_dict()
        if self.world_size == 1:
            return [state]
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def state_payload(self) -> dict[str, Any]:
        extra = self.checkpoint_extra() if self.checkpoint_extra is not None else {}
        return {**self.meta, **extra, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "sampler": self._source_states(),
                "trainer": config_to_dict(self.cfg)}

    def save(self) -> Path | None:
        """Save a checkpoint of the current step (every rank must call it; rank 0 writes)."""
        payload = self.state_payload()
        if self.run_dir is None or self.rank != 0:
            return None
        path = self.run_dir.save(self.step, payload, keep=self.cfg.keep_checkpoints)
        log.info("saved %s", path)
        return path

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Restore everything a checkpoint holds; training continues exactly where it stopped."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:  # a checkpoint of a loop that set the learning rate itself: the schedule at its step
            self.scheduler.last_epoch = self.step
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * lr_factor(self.step, self.cfg)
        states = ckpt["sampler"]
        if len(states) != self.world_size:
            log.warning("checkpoint was written by %d process(es), resuming with %d: data positions restart "
                        "from rank 0's position", len(states), self.world_size)
        self.source.load_state_dict(states[self.rank] if self.rank < len(states) else states[0])
        set_rng_state(ckpt["rng"])
        resume_at = getattr(self.objective, "resume_at", None)
        if resume_at is not None:
            resume_at(self.step)
        if self.run_dir is not None and self.rank == 0:
            self.run_dir.truncate_metrics(self.step)
        log.info("resumed at step %d", self.step)

    # ------------------------------------------------------------------------------------ loop
    def _next_batch(self) -> Batch:
        batch = self.source.sample()
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        return batch.to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return logs
        keys = sorted(logs)
        t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def train_step(self) -> tuple[dict[str, float], int, float]:
        """One optimiser step over `grad_accum` micro-batches; returns (logs, tokens, seconds waiting for data)."""
        self.wrapped.train()
        totals: dict[str, float] = {}
        tokens, wait = 0, 0.0
        n = self.cfg.grad_accum
        for i in range(n):
            t0 = time.perf_counter()
            batch = self._next_batch()
            wait += time.perf_counter() - t0
            tokens += self.count(batch)
            sync = self.world_size == 1 or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()  # type: ignore[operator]
            with ctx:
                with self._autocast():
                    loss, logs = self.wrapped(batch)
                (loss / n).backward()
            if "loss" not in logs:
                logs = {**logs, "loss": float(loss)}
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v / n
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            totals["grad_norm"] = float(norm)
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        after = getattr(self.objective, "after_step", None)
        if after is not None:
            after(self.step)
        return totals, tokens * self.world_size, wait

    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train up to `until_step` (default cfg.steps); saves at checkpoint steps, at the end and on Ctrl-C."""
        end = self.cfg.steps if until_step is None else min(until_step, self.cfg.steps)
        peak = None
        if self.cfg.mfu and self.flops_per_token:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            peak = matmul_peak_flops(dtype, self.device)
            log.info("matmul peak (%s, 2048^2): %.1f GFLOP/s", dtype, peak / 1e9)
        bar = None
        if self.cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        logs: dict[str, float] = {}
        sums: dict[str, float] = {}  # the window's sums (window_mean)
        n_window = 0
        path = None
        t_start, tok_total, wait_total = time.perf_counter(), 0, 0.0
        window_t, window_tok = time.perf_counter(), 0
        try:
            with StopFlag() as stop:
                while self.step < end:
                    logs, tokens, wait = self.train_step()
                    if self.window_mean:
                        for k, v in logs.items():
                            sums[k] = sums.get(k, 0.0) + v
                        n_window += 1
                    tok_total += tokens
                    window_tok += tokens
                    wait_total += wait
                    self.loss_trace.append(logs["loss"])
                    evals: dict[str, float] = {}
                    if (self.evaluate is not None and self.rank == 0 and self.eval_every > 0
                            and (self.step % self.eval_every == 0 or self.step == end)):
                        evals = self.evaluate(self.step)
                    if self.step % self.cfg.log_every == 0 or self.step == end:
                        now = time.perf_counter()
                        if self.window_mean:  # the learning rate stays the last step's
                            logs = {**{k: v / n_window for k, v in sums.items()}, "lr": logs["lr"]}
                            sums, n_window = {}, 0
                        logs = self._reduce_logs(logs)
                        logs[self.rate_key] = window_tok / max(now - window_t, 1e-9)
                        if peak is not None:
                            logs["mfu"] = logs[self.rate_key] * self.flops_per_token / peak
                        window_t, window_tok = now, 0
                        logs.update(evals)
                        evals = {}
                        if self.run_dir is not None and self.rank == 0:
                            self.run_dir.log_metrics(self.step, logs)
                        if self.on_log is not None:
                            self.on_log(self.step, logs)
                        if bar is not None:
                            rate = self.rate_key.replace("_per_s", "/s")  # e.g. tokens/s
                            post = {"loss": f"{logs['loss']:.3f}", rate: f"{logs[self.rate_key]:.0f}"}
                            if "mfu" in logs:
                                post["mfu"] = f"{logs['mfu']:.1%}"
                            bar.set_postfix(post)
                    if evals and self.run_dir is not None:  # an evaluation step that is not a log step
                        self.run_dir.log_metrics(self.step, evals)
                    if bar is not None:
                        bar.update(1)
                    if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                        path = self.save()
                    if stop.requested:
                        if self.step % self.cfg.checkpoint_every != 0 and self.step != end:
                            path = self.save()
                        raise KeyboardInterrupt
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t_start
        return TrainResult(self.step, logs, path, tok_total / max(elapsed, 1e-9), wait_total / max(elapsed, 1e-9))
