"""`wam data ...`: inspect, validate, import and export trajectory datasets (see docs/data-format.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from wam.datasets.errors import DataError

log = logging.getLogger(__name__)


# ======================================================================================== collect
# `wam data collect` (CollectConfig, collect) is written by the lead engineer in this section.


@dataclass
class CollectConfig:
    """Collect Atari episodes with a behaviour policy on Ray workers into one HDF5 dataset per game.

    Running again with the same --out resumes: committed episodes are kept, only missing ones are added.
    """

    game: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Game to collect (repeatable): `Pong`, `pong` and `ALE/Pong-v5` all work."""
    out: Path = Path("data")
    """Dataset root; each game goes to OUT/atari/<game>/<policy>-v0/."""
    policy: str = "random"
    """Behaviour policy: `random` or `scripted` (RAM-reading rules for Pong, Breakout, Boxing, Freeway)."""
    epsilon: float = 0.0
    """Probability of replacing the policy's action with a uniform-random legal action."""
    steps: int | None = None
    """Transitions to collect in total (split evenly over the games); the last episode is cut to fit."""
    episodes: int | None = None
    """Episodes to collect per game (instead of --steps)."""
    workers: int = 2
    """Ray workers (actors), each running one environment per game."""
    protocol: str = "jowa"
    """Environment protocol: `jowa` (no sticky actions, 108k-step cap) or `machado` (sticky 0.25, 27k steps)."""
    seed: int = 0
    """Seed; the same seed gives the same dataset whatever the number of workers."""
    ray_address: str | None = None
    """Address of a running Ray cluster (default: start a local session)."""


def collect(cfg: CollectConfig) -> int:
    from wam.datasets.collect import collect as run_collect

    s = run_collect(list(cfg.game), policy=cfg.policy, epsilon=cfg.epsilon, steps=cfg.steps, episodes=cfg.episodes,
                    workers=cfg.workers, protocol=cfg.protocol, seed=cfg.seed, out=cfg.out,
                    ray_address=cfg.ray_address)
    ret = f", mean return {sum(s.returns) / len(s.returns):.1f}" if s.returns else ""
    print(f"collected {s.steps} transitions in {s.episodes} episodes ({s.steps_per_second:.0f} steps/s{ret}) "
          f"into {len(s.datasets)} dataset(s) under {cfg.out}"
          + (f"; {s.restarted_workers} worker(s) restarted" if s.restarted_workers else ""))
    return 0


# =========================================================================================== info


@dataclass
class InfoConfig:
    """Summarise datasets: game, policy, episodes, transitions, returns, RAM recorded, size on disk, compression."""

    paths: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Dataset directories, or roots holding several datasets."""
    json: bool = False
    """Print JSON instead of a table."""


def info(cfg: InfoConfig) -> int:
    from wam.datasets.store import find_datasets
    from wam.datasets.validate import dataset_info

    if not cfg.paths:
        raise DataError("give at least one dataset directory or root")
    infos = [dataset_info(d) for d in find_datasets(cfg.paths)]
    total = _total(infos)
    if cfg.json:
        print(json.dumps({"datasets": infos, "total": total}, indent=1))
    else:
        print(format_info(infos, total))
    return 0


def _total(infos: list[dict]) -> dict:
    raw = sum(i["raw_bytes"] for i in infos)
    disk = sum(i["bytes_on_disk"] for i in infos)
    return {"datasets": len(infos), "games": sorted({i["game"] for i in infos}),
            "episodes": sum(i["episodes"] for i in infos), "transitions": sum(i["transitions"] for i in infos),
            "bytes_on_disk": disk, "raw_bytes": raw, "compression_ratio": raw / disk if disk else None}


def format_info(infos: list[dict], total: dict) -> str:
    """A plain-text table, one row per dataset and a total."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (f"{'dataset':<44} {'game':<14} {'policy':<16} {'episodes':>8} {'steps':>10} "
            f"{'return mean±std [min, max]':>30} {'actions':>7} {'RAM':>7} {'MB':>8} {'B/frame':>8} {'ratio':>6}")
    lines = [head]
    for i in infos:
        ret = f"{num(i['return_mean'], '.1f')}±{num(i['return_std'], '.1f')} " \
              f"[{num(i['return_min'], '.0f')}, {num(i['return_max'], '.0f')}]"
        name = "/".join(Path(i["path"]).parts[-3:])
        lines.append(f"{name:<44} {i['game']:<14} {str(i['policy'])[:16]:<16} {i['episodes']:>8} "
                     f"{i['transitions']:>10} {ret:>30} {len(i.get('legal_actions') or []) or '-':>7} "
                     f"{_ram_cell(i):>7} {i['bytes_on_disk'] / 1e6:>8.1f} "
                     f"{num(i['frame_bytes_on_disk_per_frame'], '.0f'):>8} {num(i['compression_ratio'], '.1f'):>6}")
    for game, names in sorted({i["game"]: tuple(i.get("legal_actions") or ()) for i in infos}.items()):
        if names:
            lines.append(f"legal actions of {game} (their ids in the full 18-action space: metadata.json): "
                         + ", ".join(names))
    lines.append(f"total: {total['datasets']} dataset(s), {len(total['games'])} game(s), {total['episodes']} "
                 f"episodes, {total['transitions']} transitions, {total['bytes_on_disk'] / 1e6:.1f} MB on disk "
                 f"({num(total['compression_ratio'], '.1f')}x smaller than raw)")
    return "\n".join(lines)


def _ram_cell(i: dict) -> str:
    """Whether a dataset recorded the console RAM: yes (every episode), no, or k/n episodes."""
    k = i.get("episodes_with_ram", 0)
    if i.get("has_ram"):
        return "yes"
    return "no" if not k else f"{k}/{i['episodes']}"


# ======================================================================================= validate


@dataclass
class ValidateConfig:
    """Read every chunk of datasets; exit 0 and print a summary when sound, else one line per problem and exit 1."""

    paths: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Dataset directories, or roots holding several datasets."""


def validate(cfg: ValidateConfig) -> int:
    from wam.datasets.layout import is_dataset
    from wam.datasets.store import find_datasets
    from wam.datasets.validate import validate as validate_dataset

    if not cfg.paths:
        raise DataError("give at least one dataset directory or root")
    targets: list[Path] = []
    for p in cfg.paths:
        if not p.exists():
            raise DataError(f"{p} does not exist")
        if p.is_dir() and not is_dataset(p) and any(p.rglob("data/main_data.hdf5")):
            targets += find_datasets([p])
        else:
            targets.append(p)  # a dataset, or something that is not one (reported as a problem)
    problems = []
    for t in targets:
        problems += validate_dataset(t)
    if problems:
        for prob in problems:
            print(prob)
        print(f"{len(problems)} problem(s) in {len({p.file for p in problems})} file(s)")
        return 1
    from wam.datasets.store import TrajectoryStore

    stores = [TrajectoryStore.open(t) for t in targets]
    print(f"ok: {len(stores)} dataset(s), {sum(s.num_episodes for s in stores)} episodes, "
          f"{sum(s.num_steps for s in stores)} transitions; every chunk read and checksummed")
    return 0


# ======================================================================================== imports


@dataclass
class ImportDqnReplayConfig:
    """Import DQN-Replay logged replay buffers ($store$_*_ckpt.N.gz) of one game and run."""

    src: Annotated[Path, tyro.conf.Positional]
    """DQN-Replay directory of the game (holding <run>/replay_logs/), or the replay_logs directory itself."""
    game: str
    """Atari game (e.g. Pong); its minimal action set maps the logged actions to the 18 full-space ids."""
    out: Path
    """Root of wam datasets; the dataset goes to <out>/atari/<game>/<name>-v0."""
    run: int = 1
    """Run number (1-5) of the DQN agent whose buffers are imported."""
    checkpoints: tuple[int, ...] = ()
    """Checkpoints to import, repeating the flag: --checkpoints 0 --checkpoints 1 (default: every complete one)."""
    name: str | None = None
    """Dataset name (default dqn-replay-run<run>)."""
    stack_padding: int = 3
    """Blank transitions Dopamine adds before every episode (stack size 4 - 1); 0 if the files have none."""
    overwrite: bool = False
    """Replace an existing dataset of the same name."""


def import_dqn_replay(cfg: ImportDqnReplayConfig) -> int:
    from wam.datasets.dqn_replay import import_dqn_replay as run_import

    s = run_import(cfg.src, cfg.game, cfg.out, run=cfg.run, checkpoints=list(cfg.checkpoints) or None, name=cfg.name,
                   stack_padding=cfg.stack_padding, overwrite=cfg.overwrite)
    print(f"imported {s.episodes} episodes ({s.steps} transitions) from checkpoints {s.checkpoints} into "
          f"{s.dataset}; dropped partial episodes: {s.dropped_leading} leading, {s.dropped_trailing} trailing")
    return 0


@dataclass
class ImportMinariConfig:
    """Import a Minari Atari dataset (210x160 RGB frames) into wam's format (84x84 grayscale)."""

    src: Annotated[Path, tyro.conf.Positional]
    """Minari dataset directory, e.g. ~/.minari/datasets/atari/pong/expert-v0."""
    out: Path
    """Root of wam datasets; the dataset goes to <out>/atari/<game>/<name>-v0."""
    game: str | None = None
    """Atari game (default: read from the dataset's env spec or id)."""
    name: str | None = None
    """Dataset name (default: the Minari dataset's name, e.g. expert)."""
    overwrite: bool = False
    """Replace an existing dataset of the same name."""


def import_minari(cfg: ImportMinariConfig) -> int:
    from wam.datasets.minari_io import import_minari as run_import

    s = run_import(cfg.src, cfg.out, game=cfg.game, name=cfg.name, overwrite=cfg.overwrite)
    ram = f"; console RAM kept for {s.episodes_with_ram} episode(s)" if s.episodes_with_ram else ""
    print(f"imported {s.episodes} episodes ({s.steps} transitions) of {s.game} into {s.dataset}{ram}")
    return 0


@dataclass
class ExportMinariConfig:
    """Export a wam dataset to a Minari root (load it with minari.load_dataset and MINARI_DATASETS_PATH)."""

    directory: Annotated[Path, tyro.conf.Positional]
    """wam dataset directory (…/atari/<game>/<name>-v<k>)."""
    out: Path
    """Minari datasets root (e.g. ~/.minari/datasets); the dataset keeps its id atari/<game>/<name>-v<k>."""
    overwrite: bool = False
    """Replace an existing Minari dataset with the same id."""


def export_minari(cfg: ExportMinariConfig) -> int:
    from wam.datasets.minari_io import export_minari as run_export

    target = run_export(cfg.directory, cfg.out, overwrite=cfg.overwrite)
    print(f"exported {cfg.directory} to {target}")
    return 0
