"""Self-describing, atomic checkpoints and run directories.

A checkpoint is one `torch.save`d dict: `format_version`, `kind` (e.g. "tokenizer", "world-action-model"),
`config` (plain dict of the typed config), model/optimizer/scheduler state, `step`, RNG states and the
data sampler's position. It is written to a temp file in the same directory, fsynced and renamed, so a
crash never leaves a half-written checkpoint, and loaded with `torch.load(weights_only=True)`.

A run directory holds `config.json`, `metrics.jsonl`, `checkpoints/step_XXXXXXXX.pt` (+ `latest.pt`) and plots.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import random
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wam.datasets.errors import WamError
from wam.datasets.files import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
TENSORBOARD_DIR = "tensorboard"
"""Sub-directory of a run holding its TensorBoard event files (`tensorboard --logdir RUN`)."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (adds `format_version`)."""
    import io

    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint saved by `save_checkpoint`; a wrong file or kind is a user error."""
    path = Path(path)
    if path.is_dir():
        path = latest_checkpoint(path)
    if not path.is_file():
        raise WamError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our checkpoint"
        raise WamError(f"{path} is not a readable wam checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise WamError(f"{path} is not a wam checkpoint (no format_version)")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise WamError(f"{path} has checkpoint format {ckpt['format_version']}; this wam reads up to {FORMAT_VERSION}")
    if kind is not None and ckpt.get("kind") != kind:
        raise WamError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run directory (or the file itself)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    if not ckpts:
        raise WamError(f"no checkpoint in {run_dir} (expected {run_dir}/checkpoints/step_*.pt)")
    return ckpts[-1]


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- configs
def config_to_dict(cfg: Any) -> dict[str, Any]:
    assert dataclasses.is_dataclass(cfg), f"expected a dataclass config, got {type(cfg).__name__}"
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass config from `config_to_dict` output; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise WamError(f"config for {cls.__name__} has unknown fields {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------- run directory
class RunDir:
    """A run directory: `config.json`, `metrics.jsonl`, `checkpoints/`, plots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        self._tb: Any = None  # the TensorBoard writer, opened on first use (False: unavailable or switched off)

    def __getstate__(self) -> dict[str, Any]:  # a run directory may travel to a Ray worker; its writer does not
        return {**self.__dict__, "_tb": None}

    def tensorboard(self) -> Any:
        """The run's TensorBoard writer (`tensorboardX.SummaryWriter` on RUN/tensorboard), or None when
        `WAM_TENSORBOARD=0` or tensorboardX is missing. metrics.jsonl stays the source of truth."""
        if self._tb is None:
            self._tb = False
            if os.environ.get("WAM_TENSORBOARD", "1") != "0":
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    return None
                self._tb = SummaryWriter(str(self.path / TENSORBOARD_DIR), flush_secs=10)
                atexit.register(self._tb.close)  # its queue is written by a thread: drain it when the run ends
        return self._tb or None

    def log_image(self, step: int, tag: str, png: str | Path) -> None:
        """Put a PNG the run wrote (a reconstruction grid, a plot) into TensorBoard under `tag`."""
        writer = self.tensorboard()
        if writer is None:
            return
        import matplotlib.image

        img = matplotlib.image.imread(str(png))
        img = (img * 255).astype(np.uint8) if img.dtype != np.uint8 else img
        writer.add_image(tag, img[..., :3] if img.ndim == 3 else img, step, dataformats="HWC" if img.ndim == 3 else "HW")
        writer.flush()

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        self._tb = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: Any, **extra: Any) -> None:
        atomic_write_json(self.path / "config.json", {**config_to_dict(cfg), **extra})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        writer = self.tensorboard()
        if writer is not None:
            for key, value in row.items():
                if key not in ("step", "time"):
                    writer.add_scalar(key, value, step, walltime=row["time"])
            writer.flush()

    def read_metrics(self) -> list[dict[str, float]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after `after_step` (on resume, rows past the checkpoint are replayed)."""
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def checkpoint_path(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:08d}.pt"

    def save(self, step: int, payload: dict[str, Any], keep: int = 3) -> Path:
        """Save the checkpoint of `step` and keep only the newest `keep`."""
        path = self.checkpoint_path(step)
        save_checkpoint(path, {"step": step, **payload})
        for old in sorted((self.path / "checkpoints").glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        try:
            return latest_checkpoint(self.path)
        except WamError:
            return None


def read_tensorboard_scalars(directory: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`: tag -> [(step, value), ...] in file
    order. Reads the TFRecord framing (length, CRC, event proto, CRC) with tensorboardX's protobufs, so it
    needs no TensorFlow or tensorboard package."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
