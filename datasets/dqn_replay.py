"""Import DQN-Replay (Agarwal et al., 2020) logged replay buffers of one game into a trajectory store.

Source layout (one directory per game and run, e.g. `<src>/Pong/1/replay_logs/`): for each
checkpoint N, four files `$store$_{observation,action,reward,terminal}_ckpt.{N}.gz`, each a gzip'd
`np.save` of the rows logged between two checkpoints, in the order they were added:
observation `(n, 84, 84)` uint8, action `(n,)` int32 (index into the game's MINIMAL action set),
reward `(n,)` float32 (raw, unclipped), terminal `(n,)` uint8.

Conventions (Dopamine's `OutOfGraphReplayBuffer`, which the dataset logged):

- row i is one transition: `observation[i]` is the frame the agent saw, `action[i]` the action it
  took there, `reward[i]` the reward that followed and `terminal[i]` whether the episode ended
  with it. The frame after the last action of an episode is never logged.
- at every episode start Dopamine adds `stack_size - 1 = 3` blank transitions (zero frame, action
  0, reward 0, terminal 0) so that frame stacks never reach into the previous episode. They are
  checked (a non-blank row there raises DataError) and skipped (`stack_padding`).
- episodes run across checkpoint files: rows are streamed file after file and stitched.

What wam stores for an episode of T logged rows: `observations[t] = observation[t]` for t < T and
`observations[T] = observation[T-1]` (a repeated placeholder: the true final frame is not in the
data; episode attribute `final_observation = "repeated"`), `actions = minimal_set[action]` (full
18-action ids), `rewards = reward`, `terminations[T-1] = True` (DQN-Replay logs an episode end as
terminal, so cut-offs cannot be told apart), `truncations` all False. Because the last step is a
termination, no TD target ever bootstraps from the placeholder frame.

Incomplete episodes are dropped, never stored: the rows after the last terminal of the last
checkpoint read (an episode still running when logging stopped), and, when the first checkpoint
read is not checkpoint 0 or the checkpoints are not contiguous, the rows before the first terminal
of each contiguous run (an episode whose start is in a checkpoint not read).

Memory is bounded: observations are read from the gzip stream `block_rows` rows at a time and only
the episode being assembled is held in RAM. The import is all-or-nothing: episodes are committed
once, at the end (a crash leaves the dataset empty; rerun with `overwrite`).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wam.datasets.errors import DataError
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir

log = logging.getLogger(__name__)

STORE_FIELDS = ("observation", "action", "reward", "terminal")
_FILE_RE = re.compile(r"^\$store\$_(observation|action|reward|terminal)_ckpt\.(\d+)\.gz$")
DQN_REPLAY_PROTOCOL = "dqn-replay"
"""Protocol recorded for imported data: Dopamine Atari (sticky actions 0.25, frame skip 4 with max-pool,
84x84 INTER_AREA grayscale, 27,000-step cap, no life-loss termination in the env)."""


def minimal_action_set(game: str) -> np.ndarray:
    """int64 `[n]`: the full-space ids of the game's minimal action set, in ALE's order.

    DQN-Replay's action i is `minimal_action_set(game)[i]` (Dopamine's gym env uses this order).
    """
    import ale_py
    import ale_py.roms

    from wam.datasets.atari import game_rom_id

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(ale_py.roms.get_rom_path(game_rom_id(game)))
    return np.array([a.value for a in ale.getMinimalActionSet()], np.int64)


def resolve_replay_dir(src: str | os.PathLike, run: int) -> Path:
    """The directory holding the `$store$_*` files: `src/<run>/replay_logs`, `src/replay_logs` or `src`."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src} does not exist; give the DQN-Replay directory of one game")
    for cand in (src / str(run) / "replay_logs", src / "replay_logs", src):
        if cand.is_dir() and any(_FILE_RE.match(p.name) for p in cand.iterdir()):
            return cand
    raise DataError(f"no $store$_*_ckpt.N.gz files under {src} (looked in {src}/{run}/replay_logs, "
                    f"{src}/replay_logs and {src})")


def list_checkpoints(replay_dir: Path) -> list[int]:
    """Checkpoint numbers for which all four store files exist (sorted)."""
    found: dict[int, set[str]] = {}
    for p in replay_dir.iterdir():
        m = _FILE_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(m.group(1))
    return sorted(n for n, kinds in found.items() if kinds == set(STORE_FIELDS))


def _store_file(replay_dir: Path, kind: str, ckpt: int) -> Path:
    return replay_dir / f"$store$_{kind}_ckpt.{ckpt}.gz"


class _NpyGzRows:
    """Rows of a gzip'd `.npy` file, read a block at a time (never the whole array)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = gzip.open(path, "rb")
        try:
            version = np.lib.format.read_magic(self._fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise DataError(f"{path}: unsupported .npy version {version}")
            self.shape, fortran, self.dtype = read_header(self._fh)
        except (OSError, ValueError, EOFError) as e:
            self._fh.close()
            raise DataError(f"{path} is not a gzip'd np.save file: {e}") from e
        if fortran and len(self.shape) > 1:
            self._fh.close()
            raise DataError(f"{path}: Fortran-ordered arrays are not supported")
        self.rows = int(self.shape[0]) if self.shape else 0
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._done = 0

    def read(self, n: int) -> np.ndarray:
        n = min(n, self.rows - self._done)
        buf = self._fh.read(n * self._row_bytes)
        if len(buf) != n * self._row_bytes:
            raise DataError(f"{self.path} ends early (after row {self._done + len(buf) // max(self._row_bytes, 1)} "
                            f"of {self.rows}): the download is incomplete")
        self._done += n
        return np.frombuffer(buf, self.dtype).reshape((n, *self.shape[1:]))

    def close(self) -> None:
        self._fh.close()


def _load_small(path: Path) -> np.ndarray:
    reader = _NpyGzRows(path)
    try:
        return reader.read(reader.rows)
    finally:
        reader.close()


@dataclass
class DqnReplaySummary:
    """What an import did."""

    dataset: str
    episodes: int = 0
    steps: int = 0
    checkpoints: list[int] = field(default_factory=list)
    rows_read: int = 0
    dropped_leading: int = 0
    """Partial episodes dropped at the start of a contiguous run of checkpoints (their start is not read)."""
    dropped_trailing: int = 0
    """Partial episodes dropped at the end of a run (still running when the last file read ends)."""


class _Assembler:
    """Turns the row stream of contiguous checkpoints into complete episodes (a state machine)."""

    def __init__(self, minimal: np.ndarray, stack_padding: int, run: int, writer, summary: DqnReplaySummary):
        self.minimal = minimal
        self.stack_padding = stack_padding
        self.run = run
        self.writer = writer
        self.summary = summary
        self.mode = "padding"
        self.pad_left = stack_padding
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (obs, action, reward) blocks
        self.ckpt = -1
        self.first_ckpt = -1

    def start_run(self, from_episode_start: bool) -> None:
        """A new contiguous run of checkpoints begins; drop what the previous run left open."""
        if self.mode == "episode" and self.parts:
            self.summary.dropped_trailing += 1
        self.parts = []
        self.mode = "padding" if from_episode_start else "skip"
        self.pad_left = self.stack_padding

    def end(self) -> None:
        self.start_run(True)

    def feed(self, obs: np.ndarray, act: np.ndarray, rew: np.ndarray, term: np.ndarray, where: str) -> None:
        """Rows of one block: obs `[n, 84, 84]`, act/rew/term `[n]`."""
        n = len(act)
        pos = 0
        ends = np.flatnonzero(term)
        while pos < n:
            nxt = ends[np.searchsorted(ends, pos)] if ends.size and ends[-1] >= pos else None
            if self.mode == "skip":
                if nxt is None:
                    return
                self.summary.dropped_leading += 1
                pos = int(nxt) + 1
                self.mode, self.pad_left = "padding", self.stack_padding
            elif self.mode == "padding":
                k = min(self.pad_left, n - pos)
                blank = (not obs[pos:pos + k].any() and not act[pos:pos + k].any() and not rew[pos:pos + k].any()
                         and not term[pos:pos + k].any())
                if not blank:
                    raise DataError(f"{where}: rows {pos}-{pos + k - 1} should be Dopamine's blank transitions at an "
                                    f"episode start (zero frame, action 0, reward 0); if these files have none, "
                                    f"import with --stack-padding 0")
                pos += k
                self.pad_left -= k
                if self.pad_left == 0:
                    self.mode, self.parts, self.first_ckpt = "episode", [], self.ckpt
            else:
                stop = n if nxt is None else int(nxt) + 1
                if stop > pos:
                    self.parts.append((obs[pos:stop], act[pos:stop], rew[pos:stop]))
                pos = stop
                if nxt is not None:
                    self._emit()
                    self.mode, self.pad_left = "padding", self.stack_padding
                    if self.stack_padding == 0:
                        self.mode, self.parts, self.first_ckpt = "episode", [], self.ckpt

    def _emit(self) -> None:
        frames = np.concatenate([p[0] for p in self.parts])  # [T, 84, 84] o_0 .. o_{T-1}
        idx = np.concatenate([p[1] for p in self.parts]).astype(np.int64)
        rewards = np.concatenate([p[2] for p in self.parts]).astype(np.float32)
        self.parts = []
        if idx.min() < 0 or idx.max() >= len(self.minimal):
            raise DataError(f"checkpoint {self.ckpt}: action index {idx.max()} outside the game's minimal action set "
                            f"of {len(self.minimal)} actions: wrong --game?")
        t = len(idx)
        observations = np.concatenate([frames, frames[-1:]])  # [T+1, 84, 84]; o_T repeats o_{T-1}
        term = np.zeros(t, bool)
        term[-1] = True
        ep = Episode(observations=observations, actions=self.minimal[idx], rewards=rewards, terminations=term,
                     truncations=np.zeros(t, bool),
                     attrs={"source": "dqn-replay", "run": self.run, "checkpoint": self.first_ckpt,
                            "final_observation": "repeated"})
        self.writer.append(ep)
        self.summary.episodes += 1
        self.summary.steps += t


def import_dqn_replay(src: str | os.PathLike, game: str, out: str | os.PathLike, run: int = 1,
                      checkpoints: list[int] | None = None, name: str | None = None, stack_padding: int = 3,
                      block_rows: int = 20_000, overwrite: bool = False) -> DqnReplaySummary:
    """Import checkpoints of one DQN-Replay run of `game` into `<out>/atari/<game>/<name>-v0`.

    `checkpoints` defaults to every complete checkpoint found; `name` to `dqn-replay-run<run>`.
    """
    from wam.datasets.atari import canonical_game

    game = canonical_game(game)
    replay_dir = resolve_replay_dir(src, run)
    available = list_checkpoints(replay_dir)
    ckpts = sorted(set(available if checkpoints is None else checkpoints))
    missing = [c for c in ckpts if c not in available]
    if missing or not ckpts:
        raise DataError(f"checkpoints {missing or ckpts} are not (all four files) in {replay_dir}; "
                        f"found {available}")
    minimal = minimal_action_set(game)
    directory = dataset_dir(out, game, name or f"dqn-replay-run{run}")
    if directory.exists():
        if overwrite:
            shutil.rmtree(directory)
        elif TrajectoryStore.open(directory).num_episodes:
            raise DataError(f"{directory} already holds episodes; pass --overwrite to replace them")
    provenance = {"protocol": DQN_REPLAY_PROTOCOL, "policy": f"dqn-replay/run{run}", "epsilon": None,
                  "source": str(replay_dir), "run": run, "checkpoints": ckpts, "stack_padding": stack_padding,
                  "minimal_action_set": minimal.tolist(), "importer": "wam data import-dqn-replay"}
    store = TrajectoryStore.create(directory, game=game, provenance=provenance)
    summary = DqnReplaySummary(dataset=str(directory), checkpoints=ckpts)
    with store.writer(commit_every=2**62, commit_seconds=float("inf")) as writer:
        asm = _Assembler(minimal, stack_padding, run, writer, summary)
        prev = None
        for ckpt in ckpts:
            if prev is None or ckpt != prev + 1:
                asm.start_run(from_episode_start=(ckpt == 0))
            prev = ckpt
            asm.ckpt = ckpt
            _feed_checkpoint(replay_dir, ckpt, asm, block_rows, summary)
            log.info("checkpoint %d: %d episodes, %d steps so far", ckpt, summary.episodes, summary.steps)
        asm.end()
    log.info("imported %d episodes (%d steps) of %s into %s; dropped %d leading and %d trailing partial episodes",
             summary.episodes, summary.steps, game, directory, summary.dropped_leading, summary.dropped_trailing)
    return summary


def _feed_checkpoint(replay_dir: Path, ckpt: int, asm: _Assembler, block_rows: int,
                     summary: DqnReplaySummary) -> None:
    small = {k: _load_small(_store_file(replay_dir, k, ckpt)) for k in ("action", "reward", "terminal")}
    obs = _NpyGzRows(_store_file(replay_dir, "observation", ckpt))
    try:
        if obs.shape[1:] != (84, 84) or obs.dtype != np.uint8:
            raise DataError(f"{obs.path}: expected uint8 (n, 84, 84) frames, got {obs.dtype} {obs.shape}")
        lens = {k: len(v) for k, v in small.items()} | {"observation": obs.rows}
        if len(set(lens.values())) != 1:
            raise DataError(f"checkpoint {ckpt} in {replay_dir}: files disagree on the row count {lens}")
        where = f"checkpoint {ckpt} in {replay_dir}"
        for start in range(0, obs.rows, block_rows):
            block = obs.read(block_rows)  # [n, 84, 84]
            stop = start + len(block)
            asm.feed(block, small["action"][start:stop], small["reward"][start:stop], small["terminal"][start:stop],
                     where)
            summary.rows_read += len(block)
    finally:
        obs.close()
