"""Minari's metadata files of a dataset (`data/metadata.json`, `namespace_metadata.json`) and the provenance
record wam keeps beside them. Written crash-safe; the HDF5 file stays the truth (`TrajectoryStore.open`
rewrites a metadata.json left behind by an interrupted commit).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from wam.datasets.errors import WamError
from wam.datasets.files import atomic_write_json
from wam.datasets.layout import (
    FRAME_SHAPE,
    METADATA_FILE,
    MINARI_VERSION,
    NAMESPACE,
    NAMESPACE_FILE,
    NUM_ACTIONS,
    SCHEMA_VERSION,
    game_dir_name,
)


def write_json_atomic(path: Path, obj: Any) -> None:
    """metadata.json and namespace files: crash-safe, indented by 1 as Minari writes them."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


def _box_space_json(shape: tuple[int, ...], low: int, high: int, dtype: str) -> str:
    """A Box space exactly as `minari.serialization.serialize_space` writes it."""
    return json.dumps({"type": "Box", "dtype": dtype, "shape": list(shape),
                       "low": np.full(shape, low).tolist(), "high": np.full(shape, high).tolist()})


def _discrete_space_json(n: int) -> str:
    return json.dumps({"type": "Discrete", "dtype": "int64", "start": 0, "n": int(n)})


def full_provenance(game: str, provenance: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def _version(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    prov = {"game": game, **{k: v for k, v in provenance.items() if k != "game"}}
    prov.setdefault("ale_py_version", _version("ale-py"))
    prov.setdefault("wam_version", _version("wam"))
    prov["schema_version"] = SCHEMA_VERSION
    prov.setdefault("created_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return prov


def _dataset_id(directory: Path, game: str) -> str:
    name = directory.name if re.fullmatch(r"[-\w]+?-v\d+", directory.name) else (
        re.sub(r"[^-\w]", "_", directory.name) + "-v0")
    return f"{NAMESPACE}/{game_dir_name(game)}/{name}"


def write_metadata(directory: Path, prov: dict, episodes: int, steps: int) -> None:
    game = str(prov.get("game", ""))
    meta = {
        "dataset_id": _dataset_id(directory, game),
        "minari_version": MINARI_VERSION,
        "data_format": "hdf5",
        "jpeg_encoding": False,
        "observation_space": _box_space_json(FRAME_SHAPE, 0, 255, "uint8"),
        "action_space": _discrete_space_json(NUM_ACTIONS),
        "total_episodes": int(episodes),
        "total_steps": int(steps),
        "algorithm_name": str(prov.get("policy", "")),
        "description": f"wam Atari trajectories of {game} (84x84 grayscale, full 18-action space, raw rewards); "
                       f"protocol {prov.get('protocol')}, behaviour policy {prov.get('policy')}",
        "wam_schema_version": SCHEMA_VERSION,
        "wam_provenance": prov,
    }
    legal = legal_actions(game)
    if legal is not None:  # so other tools need not know ALE's minimal action sets (docs/data-format.md)
        meta["wam_legal_actions"] = legal
    write_json_atomic(directory / "data" / METADATA_FILE, meta)


def legal_actions(game: str) -> dict[str, list] | None:
    """The game's legal actions in the full 18-action space: {"ids": [...], "names": [...]}, or None for a
    name ale-py does not know."""
    from wam.datasets.atari import ACTION_NAMES, legal_action_mask

    try:
        ids = [int(i) for i in np.flatnonzero(legal_action_mask(game))]
    except (WamError, ValueError, KeyError):
        return None
    return {"ids": ids, "names": [ACTION_NAMES[i] for i in ids]}


def write_namespaces(directory: Path) -> None:
    """Minari's namespace_metadata.json for `atari` and `atari/<game>` when the directory follows the layout."""
    game_dir = directory.parent
    if game_dir.parent.name != NAMESPACE:
        return
    for ns_dir, meta in ((game_dir.parent, {}), (game_dir, {"description": f"Atari {game_dir.name} (wam)"})):
        path = ns_dir / NAMESPACE_FILE
        if not path.exists():
            write_json_atomic(path, meta)
