"""State probes: how much of the game state do a frozen tokenizer's tokens keep?

The AtariARI evaluation (Anand et al. 2019, "Unsupervised State Representation Learning in Atari")
applied to the frame tokenizer: on datasets with recorded console RAM, regress object coordinates read
from RAM (the AtariARI addresses, `RAM_VARIABLES`) from

- the **tokens**: each frame's 36 tokens looked up in the codebook (`tokenizer.quantizer.lookup`, the
  unit-norm code vectors the decoder reads), [36, D] flattened to 36·D features;
- the **pixels**: the raw 84×84 frame /255, flattened to 7,056 features (what the tokens are made from);
- a **constant**: the training mean (R² ≈ 0 or below: the floor).

with two probes each, fitted on training episodes and scored by R² on held-out episodes:

- **ridge**: closed form in float64 on standardised inputs (features constant on the fitting frames are
  dropped), intercept unpenalised, the penalty α (per frame, `λ = α · n`) chosen per variable on a
  validation split of the training episodes from `RIDGE_ALPHAS`;
- **MLP**: one hidden ReLU layer, Adam on minibatches, standardised inputs and targets, early stopping on
  the validation split (each variable keeps the weights of its best validation epoch; the zero-initialised
  output layer makes epoch 0 the training mean), seeded.

Splits follow the tokenizer's convention (`split_episodes`): the last `holdout_fraction` of each
dataset's episodes are held out (by default the tokenizer run's own fraction, so the held-out frames are
ones the tokenizer never trained on when it was trained on these datasets); of the remaining training
episodes the last `val_fraction` are the validation split (the last frames of the episode when a dataset
has a single training episode). Training frames (fit + validation) are subsampled uniformly to
`max_frames` per game, held-out frames evenly to `max_heldout_frames`. Datasets of the same game are
pooled into one probe per game.

Absent objects: some RAM coordinates hold a meaningless value when the object is not on screen (Pong's
ball y is 0 when no ball is in play, its x is then stale; the same in Breakout). Such a variable has a
`present_address`, and frames where that byte is 0 are excluded from its fitting, validation and
R² (they are counted and reported).

`probe_tokenizer(run, data, out)` writes `probe.json`, `probe.md` (table) and `probe.png` (bars);
docs/probe.md describes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wam.datasets.errors import DataError, WamError
from wam.datasets.files import atomic_write_bytes
from wam.datasets.store import TrajectoryStore, find_datasets
from wam.worldmodel.probe_fit import (
    MIN_FIT_FRAMES,
    PROBES,
    RIDGE_ALPHAS,
    MlpProbe,
    RidgeProbe,
    Standardizer,
    fit_mlp,
    fit_ridge,
    r2_score,
    spans,
)
from wam.worldmodel.probe_report import ProbeReport, plot_probe, write_markdown
from wam.worldmodel.tokenizer import VQTokenizer
from wam.worldmodel.tokenizer_train import split_episodes

log = logging.getLogger(__name__)

__all__ = ["PROBES", "RAM_VARIABLES", "RIDGE_ALPHAS", "GameData", "MlpProbe", "ProbeConfig", "ProbeReport",
           "RamVariable", "RidgeProbe", "Standardizer", "fit_mlp", "fit_ridge", "load_game_data", "probe_game",
           "probe_tokenizer", "r2_score", "token_features"]


# ------------------------------------------------------------------------------------ RAM variables
@dataclass(frozen=True)
class RamVariable:
    """One object coordinate in the console RAM (an AtariARI annotation)."""

    name: str
    """AtariARI's name, e.g. `ball_x`."""
    address: int
    """RAM byte (0..127) holding it."""
    present_address: int | None = None
    """When set, frames whose byte at this address is 0 have no such object: they are excluded (masked)."""

    def mask(self, ram: np.ndarray) -> np.ndarray:
        """bool [N]: the frames (RAM rows uint8 [N, 128]) where the variable is defined."""
        if self.present_address is None:
            return np.ones(len(ram), dtype=bool)
        return ram[:, self.present_address] != 0

    def describe_mask(self) -> str | None:
        return None if self.present_address is None else f"frames with RAM[{self.present_address}] == 0 excluded (no object)"


# AtariARI `atariari/benchmark/ram_annotations.py`. The scripted policies (wam.datasets.policies, where the
# addresses were checked against the live emulator) read the same bytes; a test keeps the two equal (they
# are not imported from there so that the `wam tokenizer` commands do not load the emulator).
RAM_VARIABLES: dict[str, tuple[RamVariable, ...]] = {
    "Pong": (
        RamVariable("player_y", 51),
        RamVariable("enemy_y", 50),
        # ball_y is 0 while no ball is in play (between points); ball_x is then stale (0, 52, 205, ...)
        RamVariable("ball_x", 49, present_address=54),
        RamVariable("ball_y", 54, present_address=54),
    ),
    "Breakout": (
        RamVariable("player_x", 72),
        # ball_y is 0 while no ball is in play (before FIRE); ball_x is then stale
        RamVariable("ball_x", 99, present_address=101),
        RamVariable("ball_y", 101, present_address=101),
    ),
    "Boxing": (
        RamVariable("player_x", 32),
        RamVariable("player_y", 34),
        RamVariable("enemy_x", 33),
        RamVariable("enemy_y", 35),
    ),
    "Freeway": (RamVariable("player_y", 14),),  # the chicken
}
"""Per game (canonical CamelCase name), the object coordinates probed."""


@dataclass
class ProbeConfig:
    """Probe settings (the `wam tokenizer probe` flags)."""

    max_frames: int = 20_000
    """Training frames per game (fit + validation), drawn uniformly from the training episodes when there are more."""
    max_heldout_frames: int = 5_000
    """Held-out frames per game, spread evenly over the held-out episodes when there are more."""
    holdout_fraction: float | None = None
    """Fraction of each dataset's episodes (the last ones) held out; default: the tokenizer run's own."""
    val_fraction: float = 0.15
    """Fraction of the training episodes (the last ones of each dataset) used to choose α and stop the MLP."""
    hidden: int = 256
    """Hidden units of the MLP probe (one ReLU layer)."""
    epochs: int = 30
    """Most MLP epochs (passes over the fitting frames)."""
    patience: int = 3
    """Stop the MLP after this many epochs without a better validation loss."""
    batch_size: int = 256
    """MLP minibatch size."""
    lr: float = 1e-3
    """MLP Adam learning rate."""
    pixels: bool = True
    """Also probe the raw pixels (the reference; most of the run time)."""
    seed: int = 0
    """Seed of the frame subsample and of the MLPs."""

    def __post_init__(self) -> None:
        for name in ("max_frames", "max_heldout_frames", "hidden", "epochs", "patience", "batch_size"):
            if getattr(self, name) <= 0:
                raise WamError(f"{name} must be positive, got {getattr(self, name)}")
        if self.holdout_fraction is not None and not 0.0 < self.holdout_fraction < 1.0:
            raise WamError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            raise WamError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise WamError(f"lr must be positive, got {self.lr}")
# ------------------------------------------------------------------------------------ data
@dataclass
class Split:
    """Frames of one split of one game with their RAM and tokens."""

    frames: np.ndarray  # uint8 [N, 84, 84]
    ram: np.ndarray  # uint8 [N, 128]
    tokens: np.ndarray  # int64 [N, K] (K tokens a frame: 36 or 121)

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class GameData:
    """A game's probe data: fitting, validation and held-out frames, pooled over its datasets."""

    game: str
    datasets: list[str]
    fit: Split
    val: Split
    heldout: Split
    episodes: dict[str, int]
    """Episodes per split: train (fit + val episodes), val, heldout."""
    training_frames: int
    """Frames in the training episodes before subsampling to `max_frames`."""
    heldout_total: int
    """Frames in the held-out episodes before subsampling to `max_heldout_frames`."""
    tokens_from: str
    """"cache" (every dataset held this tokenizer's token cache), "encoded" or "cache+encoded"."""


def token_features(tokenizer: VQTokenizer, tokens: np.ndarray | torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """float32 [N, 36·D]: each frame's tokens looked up in the codebook (`quantizer.lookup`) and flattened."""
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64) if isinstance(tokens, np.ndarray) else tokens)
    out = []
    with torch.no_grad():
        for a, b in spans(len(t), chunk):
            out.append(tokenizer.quantizer.lookup(t[a:b].to(tokenizer.device)).flatten(1).float().cpu())
    if not out:
        return torch.zeros(0, t.shape[1] * tokenizer.cfg.codebook_dim)
    return torch.cat(out)


def _rows_of(store: TrajectoryStore, episodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(episode id, frame index) of every frame of `episodes`."""
    lengths = store.episode_lengths()[episodes] + 1
    ep = np.repeat(episodes, lengths)
    t = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)
    return ep.astype(np.int64), t.astype(np.int64)


def _read_rows(store: TrajectoryStore, ep: np.ndarray, t: np.ndarray, tid: str, encode: Callable[[np.ndarray], np.ndarray]
               ) -> tuple[Split, bool]:
    """Frames, RAM and tokens of rows (ep, t) in that order; (split, whether the token cache was used)."""
    cached = store.tokenizer_id() == tid and store.has_tokens()
    frames = np.empty((len(ep), 84, 84), dtype=np.uint8)
    ram = np.empty((len(ep), 128), dtype=np.uint8)
    tokens = np.empty((len(ep), store.tokens_per_frame if cached else 0), dtype=np.int64)
    for e in np.unique(ep).tolist():
        at = np.flatnonzero(ep == e)
        lo, hi = int(t[at].min()), int(t[at].max()) + 1
        local = t[at] - lo
        frames[at] = store.read_window(e, lo, hi, "observations")[local]
        ram[at] = store.read_window(e, lo, hi, "ram")[local]
        if cached:
            tokens[at] = store.read_window(e, lo, hi, "obs_tokens")[local]
    if not cached and len(ep):
        tokens = np.asarray(encode(frames), dtype=np.int64)
    return Split(frames, ram, tokens), cached


def _concat(splits: Sequence[Split]) -> Split:
    if not splits:
        return Split(np.zeros((0, 84, 84), np.uint8), np.zeros((0, 128), np.uint8), np.zeros((0, 36), np.int64))
    return Split(*(np.concatenate([getattr(s, k) for s in splits]) for k in ("frames", "ram", "tokens")))


def load_game_data(stores: Sequence[TrajectoryStore], tokenizer: VQTokenizer, cfg: ProbeConfig,
                   holdout_fraction: float, encode_batch: int = 256) -> GameData:
    """The probe data of one game from its datasets `stores` (see the module docstring for the splits)."""
    game = stores[0].game
    if all(s.num_episodes < 2 for s in stores):
        raise DataError(f"{game}: the probe holds out whole episodes, but every dataset of the game has fewer than "
                        f"2 episodes ({', '.join(str(s.directory) for s in stores)}); collect more episodes")
    splits = split_episodes(stores, holdout_fraction)
    rng = np.random.default_rng(cfg.seed)
    tid = tokenizer.tokenizer_id()

    def encode(frames: np.ndarray) -> np.ndarray:
        return tokenizer.encode(frames, batch_size=encode_batch).cpu().numpy()

    # every training frame: (dataset, episode, t, is_val)
    table, n_train_eps, n_val_eps, n_held_eps = [], 0, 0, 0
    for d, (s, (train, held)) in enumerate(zip(stores, splits)):
        n_train_eps, n_held_eps = n_train_eps + len(train), n_held_eps + len(held)
        if len(train) == 0:
            continue
        ep, t = _rows_of(s, train)
        if len(train) >= 2:
            n_val = min(len(train) - 1, max(1, round(cfg.val_fraction * len(train))))
            is_val = np.isin(ep, train[-n_val:])
            n_val_eps += n_val
        else:  # one training episode: its last frames validate
            cut = len(t) - max(1, round(cfg.val_fraction * len(t)))
            is_val = t >= cut
        table.append(np.stack([np.full(len(ep), d), ep, t, is_val.astype(np.int64)], axis=1))
    rows = np.concatenate(table)
    training_frames = len(rows)
    if len(rows) > cfg.max_frames:
        rows = rows[np.sort(rng.choice(len(rows), size=cfg.max_frames, replace=False))]

    held_rows = []
    for d, (s, (_, held)) in enumerate(zip(stores, splits)):
        if len(held):
            ep, t = _rows_of(s, held)
            held_rows.append(np.stack([np.full(len(ep), d), ep, t], axis=1))
    held = np.concatenate(held_rows)
    heldout_total = len(held)
    if len(held) > cfg.max_heldout_frames:
        held = held[np.unique(np.linspace(0, len(held) - 1, cfg.max_heldout_frames).round().astype(np.int64))]

    parts: dict[str, list[Split]] = {"fit": [], "val": [], "heldout": []}
    used_cache: set[bool] = set()
    for d, s in enumerate(stores):
        for name, sel in (("fit", rows[(rows[:, 0] == d) & (rows[:, 3] == 0)]),
                          ("val", rows[(rows[:, 0] == d) & (rows[:, 3] == 1)]),
                          ("heldout", held[held[:, 0] == d])):
            if len(sel):
                split, cached = _read_rows(s, sel[:, 1], sel[:, 2], tid, encode)
                parts[name].append(split)
                used_cache.add(cached)
    tokens_from = "+".join(k for k, on in (("cache", True in used_cache), ("encoded", False in used_cache)) if on)
    return GameData(game=game, datasets=[str(s.directory) for s in stores], fit=_concat(parts["fit"]),
                    val=_concat(parts["val"]), heldout=_concat(parts["heldout"]),
                    episodes={"train": n_train_eps, "val": n_val_eps, "heldout": n_held_eps},
                    training_frames=training_frames, heldout_total=heldout_total, tokens_from=tokens_from)


# ------------------------------------------------------------------------------------ one game
def _targets(variables: Sequence[RamVariable], ram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 [N, V], defined bool [N, V]) of the variables in RAM rows [N, 128]."""
    y = np.stack([ram[:, v.address].astype(np.float64) for v in variables], axis=1) if len(ram) else \
        np.zeros((0, len(variables)))
    m = np.stack([v.mask(ram) for v in variables], axis=1) if len(ram) else np.zeros((0, len(variables)), bool)
    return y, m


def _nan_to_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def probe_game(data: GameData, tokenizer: VQTokenizer, cfg: ProbeConfig,
               say: Callable[[str], None] = lambda s: None) -> dict:
    """Fit every probe of `data`'s game and score it on the held-out frames; the game's entry of probe.json."""
    variables = RAM_VARIABLES[data.game]
    y_fit, m_fit = _targets(variables, data.fit.ram)
    y_val, m_val = _targets(variables, data.val.ram)
    y_ho, m_ho = _targets(variables, data.heldout.ram)
    usable = [m_fit[:, j].sum() >= MIN_FIT_FRAMES and m_ho[:, j].sum() >= 2 for j in range(len(variables))]
    preds: dict[str, np.ndarray] = {}
    alphas: dict[str, list[float | None]] = {}
    epochs: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    features: dict[str, int] = {}
    kinds: list[tuple[str, Callable[[Split], torch.Tensor], float]] = [
        ("token", lambda s: token_features(tokenizer, s.tokens), 1.0)]
    if cfg.pixels:
        kinds.append(("pixel", lambda s: torch.from_numpy(s.frames.reshape(len(s), -1)), 1.0 / 255.0))
    cols = [j for j, ok in enumerate(usable) if ok]
    if cols:
        for kind, feats, scale in kinds:
            x_fit, x_val, x_ho = feats(data.fit), feats(data.val), feats(data.heldout)
            t0 = time.perf_counter()
            ridge = fit_ridge(x_fit, y_fit[:, cols], m_fit[:, cols], x_val, y_val[:, cols], m_val[:, cols], scale)
            seconds[f"{kind}_ridge"] = time.perf_counter() - t0
            say(f"{data.game}: {kind} ridge on {ridge.std.features} features fitted in {seconds[f'{kind}_ridge']:.1f} s")
            t0 = time.perf_counter()
            mlp = fit_mlp(x_fit, y_fit[:, cols], m_fit[:, cols], x_val, y_val[:, cols], m_val[:, cols], scale,
                          hidden=cfg.hidden, epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size,
                          lr=cfg.lr, seed=cfg.seed)
            seconds[f"{kind}_mlp"] = time.perf_counter() - t0
            say(f"{data.game}: {kind} MLP trained {mlp.epochs} epochs (best per variable {mlp.best_epoch}) in "
                f"{seconds[f'{kind}_mlp']:.1f} s")
            preds[f"{kind}_ridge"], preds[f"{kind}_mlp"] = ridge.predict(x_ho), mlp.predict(x_ho)
            alphas[kind], epochs[kind], features[kind] = ridge.alpha, mlp.best_epoch, ridge.std.features
    rows = []
    for j, var in enumerate(variables):
        fit_mask, ho_mask = m_fit[:, j], m_ho[:, j]
        entry = {"name": var.name, "address": var.address, "mask": var.describe_mask(),
                 "frames": {"fit": int(fit_mask.sum()), "val": int(m_val[:, j].sum()), "heldout": int(ho_mask.sum())},
                 "masked_frames": {"fit": int((~fit_mask).sum()), "val": int((~m_val[:, j]).sum()),
                                   "heldout": int((~ho_mask).sum())},
                 "r2": dict.fromkeys(PROBES), "ratio": None, "ridge_alpha": {}, "note": None}
        if not usable[j]:
            entry["note"] = (f"not probed: the object is defined on {int(fit_mask.sum())} fitting and "
                             f"{int(ho_mask.sum())} held-out frames (need {MIN_FIT_FRAMES} and 2)")
            rows.append(entry)
            continue
        k = cols.index(j)
        y = y_ho[ho_mask, j]
        r2 = {p: r2_score(y, preds[p][ho_mask, k]) for p in preds}
        r2["constant"] = r2_score(y, np.full(len(y), y_fit[fit_mask, j].mean()))
        if not math.isfinite(r2["constant"]):
            entry["note"] = "the variable is constant on the held-out frames: R² undefined"
        entry["r2"] = {p: _nan_to_none(r2.get(p)) for p in PROBES}
        entry["ridge_alpha"] = {kind: alphas[kind][k] for kind in alphas}
        entry["mlp_best_epoch"] = {kind: epochs[kind][k] for kind in epochs}
        token_best = max(r2["token_ridge"], r2["token_mlp"])
        if "pixel_ridge" in r2:
            pixel_best = max(r2["pixel_ridge"], r2["pixel_mlp"])
            if math.isfinite(token_best) and math.isfinite(pixel_best) and pixel_best > 0:
                entry["ratio"] = token_best / pixel_best
        rows.append(entry)
    return {"game": data.game, "datasets": data.datasets, "episodes": data.episodes,
            "frames": {"fit": len(data.fit), "val": len(data.val), "heldout": len(data.heldout),
                       "training_total": data.training_frames, "heldout_total": data.heldout_total},
            "tokens_from": data.tokens_from, "features": features,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "variables": rows}
# ------------------------------------------------------------------------------------ the command
def _check_datasets(stores: Sequence[TrajectoryStore]) -> None:
    no_ram = [s for s in stores if not s.has_ram]
    if no_ram:
        detail = "; ".join(f"{s.directory} ({s.num_episodes_with_ram} of {s.num_episodes} episodes have RAM)"
                           if hasattr(s, "num_episodes_with_ram") else str(s.directory) for s in no_ram)
        raise DataError(f"the probe reads object coordinates from recorded RAM (infos/ram), which these datasets lack: "
                        f"{detail}. `wam data collect` records RAM; DQN-Replay and Minari imports have none")
    unknown = sorted({s.game for s in stores if s.game not in RAM_VARIABLES})
    if unknown:
        raise WamError(f"no RAM annotations for {', '.join(unknown)}; the probe knows "
                       f"{', '.join(sorted(RAM_VARIABLES))} (wam.worldmodel.probe.RAM_VARIABLES)")


def probe_tokenizer(run: str | Path, data: Sequence[str | Path], out: str | Path, cfg: ProbeConfig | None = None,
                    device: str = "cpu", say: Callable[[str], None] = lambda s: None) -> ProbeReport:
    """Probe the newest checkpoint of tokenizer run `run` on the datasets `data`; write probe.json/.md/.png to `out`."""
    from wam.worldmodel.device import resolve_device
    from wam.worldmodel.tokenizer import load_tokenizer

    cfg = cfg or ProbeConfig()
    t_start = time.perf_counter()
    if not data:
        raise WamError("no datasets given; pass --data DIR (dataset directories or roots holding them)")
    stores = [TrajectoryStore.open(p) for p in find_datasets(list(data))]
    _check_datasets(stores)
    tokenizer = load_tokenizer(run, device=resolve_device(device))
    holdout = cfg.holdout_fraction if cfg.holdout_fraction is not None else tokenizer.train_cfg.holdout_fraction
    by_game: dict[str, list[TrajectoryStore]] = {}
    for s in stores:
        by_game.setdefault(s.game, []).append(s)
    games = []
    for game, group in by_game.items():
        t0 = time.perf_counter()
        gd = load_game_data(group, tokenizer, cfg, holdout)
        say(f"{game}: {len(gd.fit)} fitting, {len(gd.val)} validation, {len(gd.heldout)} held-out frames "
            f"(tokens {gd.tokens_from}) loaded in {time.perf_counter() - t0:.1f} s")
        entry = probe_game(gd, tokenizer, cfg, say)
        entry["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        games.append(entry)
    extra = getattr(tokenizer, "extra", {})
    result = {
        "kind": "tokenizer_probe",
        "tokenizer": {"id": tokenizer.tokenizer_id(), "checkpoint": extra.get("checkpoint", str(run)),
                      "step": extra.get("step"), "codebook_size": tokenizer.cfg.codebook_size,
                      "codebook_dim": tokenizer.cfg.codebook_dim, "tokens_per_frame": tokenizer.cfg.tokens_per_frame},
        "config": {**dataclasses.asdict(cfg), "holdout_fraction": holdout, "ridge_alphas": list(RIDGE_ALPHAS)},
        "probes": list(PROBES),
        "games": games,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "probe.json", (json.dumps(result, indent=1, allow_nan=False) + "\n").encode())
    write_markdown(out / "probe.md", result)
    plot_probe(out / "probe.png", result)
    return ProbeReport(out=out, result=result, seconds=result["seconds"])
