"""Checking and summarising trajectory stores: `validate` reads every chunk, `dataset_info` sums up."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from wam.datasets.errors import DataError
from wam.datasets.layout import (
    FIELDS,
    FRAME_SHAPE,
    MAIN_FILE,
    METADATA_FILE,
    NUM_ACTIONS,
    NUM_TOKENS,
    RAM_FIELD,
    RAM_SIZE,
    frames_crc32,
    py_value,
    read_provenance,
)
from wam.datasets.metadata import legal_actions, write_metadata
from wam.datasets.store import TrajectoryStore

log = logging.getLogger(__name__)

_DTYPES = {"observations": np.uint8, "actions": np.int64, "rewards": np.float32, "terminations": np.bool_,
           "truncations": np.bool_, "infos/lives": np.int32, "obs_tokens": np.uint16,
           RAM_FIELD: np.uint8}


@dataclass(frozen=True)
class Problem:
    """One piece of damage: the file, the episode (None for the whole file) and what is wrong."""

    file: str
    episode: int | None
    reason: str

    def __str__(self) -> str:
        where = f"episode {self.episode}: " if self.episode is not None else ""
        return f"{self.file}: {where}{self.reason}"


def _resolve(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_file() and path.name == MAIN_FILE:
        return path.parent.parent
    return path


def validate(directory: str | os.PathLike) -> list[Problem]:
    """Every problem found in the dataset at `directory` (empty when sound).

    Reads every chunk of every dataset (fletcher32 and gzip checks), recomputes the frame, RAM and token
    checksums, and checks fields, dtypes, shapes, lengths, flags and metadata.json. A metadata.json
    left behind by an interrupted commit is rewritten from the HDF5 file (the truth), not reported.
    Raises DataError only when `directory` does not exist.
    """
    directory = _resolve(directory)
    path = directory / "data" / MAIN_FILE
    if not path.is_file():
        return [Problem(str(directory), None, f"not a wam dataset: no data/{MAIN_FILE} (give a dataset directory)")]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return [Problem(str(path), None, f"cannot open the HDF5 file (truncated or not HDF5): {e}")]
    problems: list[Problem] = []
    with f:
        if "wam_schema_version" not in f.attrs:
            return [Problem(str(path), None, "not a wam dataset (no wam_schema_version attribute)")]
        n = int(f.attrs.get("num_episodes", -1))
        if n < 0:
            return [Problem(str(path), None, "file attribute num_episodes is missing")]
        tokenizer_id = py_value(f.attrs["tokenizer_id"]) if "tokenizer_id" in f.attrs else None
        steps = 0
        for i in range(n):
            ep_problems, t = _check_episode(f, i, tokenizer_id)
            problems += [Problem(str(path), i, r) for r in ep_problems]
            steps += t
        extra = sorted(k for k in f.keys() if k.startswith("episode_") and not (
            k[8:].isdigit() and int(k[8:]) < n))
        if extra:
            problems.append(Problem(str(path), None, f"groups beyond num_episodes={n}: {', '.join(extra[:5])}"))
        if not problems and steps != int(f.attrs.get("num_steps", -1)):
            problems.append(Problem(str(path), None, f"num_steps attribute {int(f.attrs.get('num_steps', -1))} "
                                                     f"!= {steps} steps in the episodes"))
        provenance = read_provenance(f)
    if not problems:
        problems += _check_metadata(directory, provenance, n, steps)
    return problems


def _check_episode(f: h5py.File, i: int, tokenizer_id: str | None) -> tuple[list[str], int]:
    """(problems, T) of episode i; reads every chunk."""
    name = f"episode_{i}"
    if name not in f:
        return [f"group {name} is missing"], 0
    g = f[name]
    out: list[str] = []
    if "total_steps" not in g.attrs:
        out.append("attribute total_steps is missing")
        t = g["actions"].shape[0] if "actions" in g else 0
    else:
        t = int(g.attrs["total_steps"])
    present = [k for k in (*FIELDS, "infos/lives", RAM_FIELD, "obs_tokens") if k in g]
    n_tok = int(py_value(f.attrs.get("tokens_per_frame", NUM_TOKENS)))  # the store's tokens per frame
    for k in FIELDS:
        if k not in g:
            out.append(f"missing field '{k}'")
    arrays: dict[str, np.ndarray] = {}
    for k in present:
        ds = g[k]
        if not isinstance(ds, h5py.Dataset):
            out.append(f"'{k}' is not a dataset but a {type(ds).__name__}")
            continue
        want_shape = {"observations": (t + 1, *FRAME_SHAPE), "obs_tokens": (t + 1, n_tok),
                      RAM_FIELD: (t + 1, RAM_SIZE)}.get(k, (t,))
        if k == RAM_FIELD and ds.shape != want_shape:
            kind = "mismatched lengths" if ds.shape[1:] == want_shape[1:] else "wrong shape"
            out.append(f"{kind}: '{k}' has shape {ds.shape}, expected {want_shape} "
                       f"(total_steps={t}: one {RAM_SIZE}-byte RAM row per frame, {t + 1} frames)")
            continue
        if ds.shape != want_shape:
            what = "frames" if k in ("observations", "obs_tokens") else "steps"
            out.append(f"mismatched lengths: '{k}' has shape {ds.shape}, expected {want_shape} "
                       f"(total_steps={t}: {t + 1 if len(want_shape) > 1 else t} {what})")
            continue
        if ds.dtype != _DTYPES[k]:
            out.append(f"'{k}' has dtype {ds.dtype}, expected {np.dtype(_DTYPES[k])}")
            continue
        if not ds.fletcher32:
            out.append(f"'{k}' has no fletcher32 checksum")
        data, err = _read_all_chunks(ds)
        if err:
            out.append(f"'{k}' {err}")
        else:
            arrays[k] = data
    if "observations" in arrays and "observations_crc32" in g.attrs:
        if frames_crc32(arrays["observations"]) != int(g.attrs["observations_crc32"]):
            out.append("observations do not match their checksum (attribute observations_crc32)")
    if RAM_FIELD in g and isinstance(g[RAM_FIELD], h5py.Dataset):
        if "ram_crc32" not in g.attrs:
            out.append(f"'{RAM_FIELD}' has no checksum (attribute ram_crc32)")
        elif RAM_FIELD in arrays and frames_crc32(arrays[RAM_FIELD]) != int(g.attrs["ram_crc32"]):
            out.append(f"'{RAM_FIELD}' does not match its checksum (attribute ram_crc32): damaged")
    if "obs_tokens" in g:
        if tokenizer_id is None:
            out.append("token cache present but the file has no tokenizer_id attribute")
        if "obs_tokens_crc32" not in g.attrs:
            out.append("token cache has no checksum (attribute obs_tokens_crc32)")
        elif "obs_tokens" in arrays and frames_crc32(arrays["obs_tokens"]) != int(g.attrs["obs_tokens_crc32"]):
            out.append("token cache does not match its checksum (attribute obs_tokens_crc32): stale or damaged")
    if "actions" in arrays and t and (arrays["actions"].min() < 0 or arrays["actions"].max() >= NUM_ACTIONS):
        out.append(f"actions outside the 18-action space: [{arrays['actions'].min()}, {arrays['actions'].max()}]")
    if "terminations" in arrays and "truncations" in arrays and t:
        term, trunc = arrays["terminations"], arrays["truncations"]
        if term[:-1].any() or trunc[:-1].any():
            out.append("terminations/truncations set before the last step")
        if not (term[-1] or trunc[-1]):
            out.append("last step is neither a termination nor a truncation")
    if "rewards" in arrays and "return" in g.attrs and t:
        if not np.isclose(float(arrays["rewards"].astype(np.float64).sum()), float(g.attrs["return"]), atol=1e-3):
            out.append(f"rewards sum to {arrays['rewards'].sum()} but attribute return is {float(g.attrs['return'])}")
    return out, t


def _read_all_chunks(ds: h5py.Dataset) -> tuple[np.ndarray | None, str | None]:
    """The whole dataset read chunk by chunk, or the rows whose chunk fails (checksum/decompression)."""
    out = np.empty(ds.shape, ds.dtype)
    step = ds.chunks[0] if ds.chunks else max(1, ds.shape[0])
    for start in range(0, ds.shape[0], step):
        stop = min(start + step, ds.shape[0])
        try:
            out[start:stop] = ds[start:stop]
        except OSError as e:
            return None, f"rows {start}-{stop - 1}: data chunk is corrupt (checksum/decompression failed: {e})"
    return out, None


def _check_metadata(directory: Path, provenance: dict, episodes: int, steps: int) -> list[Problem]:
    meta_path = directory / "data" / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if meta is not None and meta.get("jpeg_encoding") is not False:
        return [Problem(str(meta_path), None, "jpeg_encoding is not false: Minari would decode raw frames as JPEG")]
    if meta is not None and meta.get("total_episodes") == episodes and meta.get("total_steps") == steps \
            and meta.get("dataset_id") and meta.get("minari_version"):
        return []
    log.warning("%s is missing or behind %s (interrupted commit); rewriting it", meta_path, MAIN_FILE)
    try:
        write_metadata(directory, provenance, episodes, steps)
    except OSError as e:
        return [Problem(str(meta_path), None, f"missing or stale and cannot be rewritten: {e}")]
    return []


def dataset_info(directory: str | os.PathLike) -> dict:
    """Summary of one dataset: game, episodes, transitions, return stats, policy, sizes, compression.

    Raises DataError when `directory` is missing or not a wam dataset.
    """
    store = TrajectoryStore.open(_resolve(directory))
    returns = store.episode_returns()
    lengths = store.episode_lengths()
    raw = stored = frame_stored = 0
    with h5py.File(store.path, "r") as f:
        for i in range(store.num_episodes):
            g = f[f"episode_{i}"]

            def visit(_name: str, obj: object) -> None:
                nonlocal raw, stored, frame_stored
                if isinstance(obj, h5py.Dataset):
                    raw += obj.size * obj.dtype.itemsize
                    stored += obj.id.get_storage_size()
                    if obj.name.endswith("/observations"):
                        frame_stored += obj.id.get_storage_size()

            g.visititems(visit)
    frames = int(lengths.sum() + len(lengths))
    on_disk = sum(p.stat().st_size for p in (store.path, store.data / METADATA_FILE) if p.exists())

    def stat(fn, a: np.ndarray) -> float | None:
        return float(fn(a)) if a.size else None

    prov = store.provenance
    return {
        "path": str(store.directory),
        "game": store.game,
        "games": [store.game],
        "protocol": prov.get("protocol"),
        "policy": prov.get("policy"),
        "epsilon": prov.get("epsilon"),
        "legal_actions": (legal_actions(store.game) or {}).get("names"),
        "episodes": store.num_episodes,
        "transitions": store.num_steps,
        "frames": frames,
        "return_mean": stat(np.mean, returns),
        "return_std": stat(np.std, returns),
        "return_min": stat(np.min, returns),
        "return_max": stat(np.max, returns),
        "length_mean": stat(np.mean, lengths),
        "has_tokens": store.has_tokens(),
        "tokenizer_id": store.tokenizer_id(),
        "has_ram": store.has_ram,
        "episodes_with_ram": store.num_episodes_with_ram,
        "bytes_on_disk": int(on_disk),
        "raw_bytes": int(raw),
        "stored_bytes": int(stored),
        "compression_ratio": float(raw / on_disk) if on_disk else None,
        "frame_bytes_on_disk_per_frame": float(frame_stored / frames) if frames else None,
        "raw_bytes_per_frame": FRAME_SHAPE[0] * FRAME_SHAPE[1],
    }
