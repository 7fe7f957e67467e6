"""`wam pretrain` and `wam finetune`: joint offline training of the world-action model.

    wam pretrain --preset debug --data DIR... --tokenizer RUN --core transformer --out RUN [--steps N] [--resume]
    wam finetune --from RUN|scratch --data DIR --game NEW --transitions 5000 --out RUN [--freeze core ...]
    ... --workers N [--ray-address ADDR]      (Ray Train DDP, see wam.runs.ray_train)

Both build the same pieces (`run_training`): a `SegmentSampler` over the datasets (the token cache
when every dataset has one from this tokenizer, else frames encoded on the fly by the frozen
tokenizer), a `WorldActionModel`, `WorldActionObjective` and the generic `Trainer`. The run directory
gets `config.json`, `metrics.jsonl` and checkpoints of kind "world-action-model" that also record
the tokenizer's id and path; `--resume` continues from the newest one exactly (see docs/training.md).

`--data synthetic` trains on random tokens (no dataset, no tokenizer): a smoke test of the training
stack and of a Ray cluster, and what the distributed-parity test uses.

`--objective jowa|q-only|bc` picks the objective (the baselines "no WM loss" and behaviour cloning
train on the same data with the same trainer); `--q-targets FILE` adds distillation toward the
planner's offline-corrected Q (`wam plan correct`): `QTargetSource` looks up the targets of every
sampled step and hands the trainer `QTargetBatch`es (see docs/training.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from wam.datasets.batch import Batch
from wam.datasets.config import preset_value
from wam.datasets.errors import WamError
from wam.runs.distill import q_target_source
from wam.worldmodel.checkpoint import RunDir, config_from_dict, config_to_dict, load_checkpoint
from wam.worldmodel.device import resolve_device
from wam.worldmodel.losses import LossConfig, WorldActionObjective, objective_name
from wam.worldmodel.model import CHECKPOINT_KIND, FREEZABLE_PARTS, WorldActionModel, WorldActionModelConfig
from wam.worldmodel.synthetic import SyntheticTokenSource
from wam.worldmodel.trainer import Trainer, TrainerConfig, TrainResult

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
Flat = tyro.conf.OmitArgPrefixes  # nested configs' fields appear as --steps, --core, --lambda-cql, ...


# --------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class TrainingPreset:
    """How a preset trains (its model is `MODEL_PRESETS[name]`, its tokenizer `TOKENIZER_PRESETS[name]`)."""

    batch_size: int
    train: TrainerConfig
    loss: LossConfig


# The CPU presets (docs/training.md has the measurements behind each choice):
# - Polyak averaging of the target head, tau 0.02 (chosen on the 8-state toy chain of wam.worldmodel.toy_mdp);
# - CQL weight 0.01: JOWA's 0.1 on the C51 head's expected value (gradients scaled by the atom spread) moved
#   the 3-state toy's Q 1.6-2.0 from Q* and greedy copied the data's most frequent action in every state;
#   0.01 stayed within 0.03 and picked the optimal one;
# - in-sample TD bootstrap (the data's next action), measured on the `small` recipe's data ("In-sample
#   targets").
# The paper presets keep JOWA's hard target copy every 1,000 steps, CQL 0.1 and the max bootstrap.
_CPU_LOSS = dict(target_tau=0.02, lambda_cql=0.01, bootstrap="data")
_JOWA_TRAIN = TrainerConfig(steps=1_750_000, lr=1e-4, min_lr=5e-5, warmup_steps=1000, precision="auto",
                            log_every=100, checkpoint_every=10_000)
_JOWA = TrainingPreset(512, _JOWA_TRAIN, LossConfig(target_update_every=1000, target_tau=0.0, lambda_cql=0.1,
                                                    bootstrap="max"))
TRAINING_PRESETS: dict[str, TrainingPreset] = {
    "debug": TrainingPreset(8, TrainerConfig(steps=200, lr=1e-3, min_lr=2e-4, warmup_steps=20, log_every=10,
                                             checkpoint_every=100),
                            LossConfig(target_update_every=50, **_CPU_LOSS)),
    "small": TrainingPreset(32, TrainerConfig(steps=4000, lr=1e-3, min_lr=1e-4, warmup_steps=100, log_every=50,
                                              checkpoint_every=500),
                            # mixed Monte-Carlo targets: Q follows the state, planning beats greedy
                            # (docs/training.md)
                            LossConfig(target_update_every=200, mc_mix=0.2, **_CPU_LOSS)),
    "jowa-40m": _JOWA,
    "jowa-70m": _JOWA,
    "jowa-150m": _JOWA,
}


def training_preset(name: str) -> TrainingPreset:
    """The named training preset (configs copied, so a caller may change them)."""
    p = preset_value(TRAINING_PRESETS, name, "training preset")
    return TrainingPreset(p.batch_size, dataclasses.replace(p.train), dataclasses.replace(p.loss))


@dataclass
class DataOptions:
    """Fields shared by both commands (data, output, resume, distribution)."""

    data: tuple[str, ...] = ()
    """Dataset directories (or roots searched for datasets); `synthetic` = random tokens, no dataset needed."""
    out: str = ""
    """Run directory for config.json, metrics.jsonl and checkpoints."""
    tokenizer: str = ""
    """Tokenizer run directory or checkpoint (frozen): its codebook is the vocabulary."""
    preset: str = "debug"
    """Preset of model and training sizes: debug, small, jowa-40m, jowa-70m, jowa-150m."""
    batch_size: int = 8
    """Segments per optimiser micro-batch, over all workers."""
    source: Literal["auto", "tokens", "frames"] = "auto"
    """Observations: the token cache, frames encoded by the tokenizer on the fly, or auto (cache when complete)."""
    prefetch: int = 2
    """Batches the sampler prepares ahead in a background thread."""
    seed: int = 0
    """Seed of the weights, dropout and the data order."""
    resume: bool = False
    """Continue the newest checkpoint in --out exactly (same settings); a fresh run when there is none."""
    workers: int = 1
    """Training processes; more than 1 trains with Ray Train (DDP: gloo on CPU, NCCL on GPU)."""
    ray_address: str | None = None
    """Ray cluster address for --workers (default: a local Ray session)."""
    q_targets: str = ""
    """Corrected-Q file of `wam plan correct`: distil the planner's Q of the sampled steps (weight --lambda-distill)."""
    calibration_episodes: int = 0
    """Hold the last N episodes of each dataset out of training and log, at every checkpoint step, the Q of their
    data actions against their discounted return (`q_mc_gap/<game>`, ...; needs the token cache); 0 = off."""


@dataclass
class PretrainConfig(DataOptions):
    """Pretrain one world-action model on offline trajectories of many games."""

    model: Annotated[WorldActionModelConfig, Flat] = field(default_factory=WorldActionModelConfig)
    loss: Annotated[LossConfig, Flat] = field(default_factory=LossConfig)
    train: Annotated[TrainerConfig, Flat] = field(default_factory=TrainerConfig)

    @classmethod
    def from_preset(cls, name: str) -> PretrainConfig:
        p = training_preset(name)
        return cls(preset=name, batch_size=p.batch_size, model=WorldActionModelConfig.from_preset(name),
                   train=p.train, loss=p.loss)


@dataclass
class FinetuneConfig(DataOptions):
    """Fine-tune a pretrained model on a new game from its first N transitions (or train it from scratch)."""

    from_run: Annotated[str, tyro.conf.arg(name="from")] = ""
    """Pretrained run directory or checkpoint, or `scratch` for the same model without pretraining."""
    game: str = ""
    """The new game (its datasets are given with --data)."""
    transitions: int = 5000
    """Use only the first N transitions of each dataset."""
    freeze: tuple[str, ...] = ()
    """Parts not trained: embeddings, core, obs_head, reward_head, termination_head, q_head."""
    recalibrate_q: bool = True
    """On a new game, restart the Q head's output layer (and its target) at the calibrated start E[Q] =
    q_init, keeping the trunk and the head's hidden layers: the pretrained head reads an unseen game's frames
    at E[Q] ~ 28 and in-sample TD decays that by about 1 a 100 steps (docs/training.md, "Fine-tuning")."""
    model: Annotated[WorldActionModelConfig, Flat] = field(default_factory=WorldActionModelConfig)
    """(Only for --from scratch: the architecture; a pretrained model keeps its own.)"""
    loss: Annotated[LossConfig, Flat] = field(default_factory=LossConfig)
    train: Annotated[TrainerConfig, Flat] = field(default_factory=TrainerConfig)

    @classmethod
    def from_preset(cls, name: str) -> FinetuneConfig:
        p = training_preset(name)
        train = dataclasses.replace(p.train, steps=min(p.train.steps, 20_000 if name.startswith("jowa") else p.train.steps))
        return cls(preset=name, batch_size=p.batch_size, model=WorldActionModelConfig.from_preset(name), train=train,
                   loss=p.loss)


# ------------------------------------------------------------------------------------- building
@dataclass
class _Pieces:
    source: Any
    batch_transform: Callable[[Batch], Batch] | None
    tokenizer_meta: dict[str, str]
    games: list[str]
    tokens_per_frame: int | None = None  # the tokenizer's (None: synthetic tokens, the model's own)


def _unknown_returns(batch: Batch) -> Batch:
    return dataclasses.replace(batch, mc_return=torch.full_like(batch.rewards, float("nan")))


def _load_tokenizer(path: str, device: str) -> Any:
    from wam.worldmodel.tokenizer import load_tokenizer

    return load_tokenizer(path, device=resolve_device(device))


def _data_pieces(cfg: DataOptions, horizon: int, vocab: int | None, tokenizer_path: str, device: str, rank: int,
                 world: int,
                 max_transitions: int | None = None, game_names: tuple[str, ...] | None = None,
                 synthetic_games: tuple[str, ...] = ("Synthetic",), tokens_per_obs: int = 36,
                 returns: tuple[float, str] | None = None) -> tuple[_Pieces, int]:
    """The batch source (this rank's share of the batch), the frames->tokens transform and the vocabulary."""
    if cfg.batch_size % world:
        raise WamError(f"--batch-size {cfg.batch_size} does not split over --workers {world}")
    per_rank = cfg.batch_size // world
    if tuple(cfg.data) == (SYNTHETIC,):
        assert vocab is not None, "synthetic data needs the model's vocab_size"
        src = SyntheticTokenSource(cfg.batch_size, horizon, vocab, games=synthetic_games, seed=cfg.seed,
                                   rank=rank, world_size=world, tokens_per_obs=tokens_per_obs)
        log.info("data: synthetic random tokens (%d games, vocab %d)", len(synthetic_games), vocab)
        unknown = None
        if returns is not None:  # random tokens have no episodes: every return unknown, every target pure TD
            log.info("synthetic tokens have no Monte-Carlo returns: --mc-mix leaves every TD target as it is")
            unknown = _unknown_returns
        return _Pieces(src, unknown, {"id": "synthetic", "path": ""}, list(synthetic_games)), vocab
    if not cfg.data:
        raise WamError("give the training data with --data DIR [DIR ...] (or --data synthetic for a smoke test)")
    if not tokenizer_path:
        raise WamError("give the frozen tokenizer with --tokenizer RUN (its codebook is the model's vocabulary)")
    from wam.datasets.sampler import SegmentSampler
    from wam.datasets.store import TrajectoryStore

    tokenizer = _load_tokenizer(tokenizer_path, device)
    tid = tokenizer.tokenizer_id()
    # every rank draws its own stream: batch k of rank r is a function of (seed + r, k)
    sampler = SegmentSampler(list(cfg.data), horizon=horizon, batch_size=per_rank, source=cfg.source,
                             seed=cfg.seed + rank, prefetch=cfg.prefetch, max_transitions=max_transitions,
                             game_names=game_names, hold_out_episodes=cfg.calibration_episodes, returns=returns)
    transform: Callable[[Batch], Batch] | None = None
    if sampler.source == "tokens":
        ids = {TrajectoryStore.open(p).tokenizer_id() for p in sampler.datasets}
        if ids != {tid}:
            sampler.close()
            raise WamError(f"the datasets' token caches come from tokenizer(s) {sorted(map(str, ids))} but "
                           f"--tokenizer is {tid}; re-encode them with `wam tokenize` or use --source frames")
        log.info("data: token cache of tokenizer %s", tid)
    else:
        log.info("data: no complete token cache; encoding frames with the frozen tokenizer %s on the fly", tid)

        def transform(batch: Batch) -> Batch:
            b, t = batch.obs.shape[:2]
            tokens = tokenizer.encode(batch.obs.reshape(b * t, *batch.obs.shape[2:])).view(b, t, -1)
            return dataclasses.replace(batch, obs=tokens)

    meta = {"id": tid, "path": str(Path(tokenizer_path).resolve())}
    return (_Pieces(sampler, transform, meta, list(sampler.games), int(tokenizer.cfg.tokens_per_frame)),
            int(tokenizer.cfg.codebook_size))


def _with_game_map(transform: Callable[[Batch], Batch] | None, source_games: list[str],
                   model_games: tuple[str, ...]) -> Callable[[Batch], Batch] | None:
    """Map the source's game ids onto the model's task rows (and apply `transform` first)."""
    missing = [g for g in source_games if g not in model_games]
    if missing:
        raise WamError(f"the data holds games {missing} that the model has no task embedding for "
                       f"(model games: {list(model_games)})")
    table = torch.tensor([model_games.index(g) for g in source_games], dtype=torch.long)
    if torch.equal(table, torch.arange(len(source_games))) and transform is None:
        return None

    def apply(batch: Batch) -> Batch:
        if transform is not None:
            batch = transform(batch)
        return dataclasses.replace(batch, game_ids=table[batch.game_ids])

    return apply


def run_training(cfg: PretrainConfig | FinetuneConfig, rank: int = 0, world: int = 1,
                 on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Build everything a process needs and train (single process, or one rank of a DDP run)."""
    finetune = isinstance(cfg, FinetuneConfig)
    command = "finetune" if finetune else "pretrain"
    _check_run_options(cfg, command)
    run = RunDir(cfg.out)
    ckpt = load_checkpoint(run.latest(), kind=CHECKPOINT_KIND) if cfg.resume and run.latest() else None
    if cfg.resume and ckpt is None:
        log.info("--resume: no checkpoint in %s yet, starting a fresh run", run.path)
    torch.manual_seed(cfg.seed)
    model_cfg, pretrained, tokenizer_path = _starting_point(cfg, ckpt)
    synthetic_games = (cfg.game,) if finetune else model_cfg.games or ("Synthetic",)
    pieces, vocab = _data_pieces(
        cfg, model_cfg.horizon, model_cfg.vocab_size, tokenizer_path, cfg.train.device, rank, world,
        max_transitions=cfg.transitions if finetune else None,
        game_names=(cfg.game,) if finetune else None, synthetic_games=synthetic_games,
        tokens_per_obs=model_cfg.tokens_per_obs,
        returns=(cfg.loss.gamma, cfg.loss.reward_transform) if cfg.loss.mc_mix > 0 else None)
    try:
        if vocab != model_cfg.vocab_size and (pretrained is not None or ckpt is not None):
            raise WamError(f"the tokenizer has {vocab} codes but the model was trained with a vocabulary of "
                           f"{model_cfg.vocab_size}; use the tokenizer the model was trained with")
        k = pieces.tokens_per_frame
        if k is not None and k != model_cfg.tokens_per_obs and (pretrained is not None or ckpt is not None):
            raise WamError(f"the tokenizer gives {k} tokens a frame but the model was trained on "
                           f"{model_cfg.tokens_per_obs}; use the tokenizer the model was trained with")
        if ckpt is None and pretrained is None:
            games = tuple(pieces.games) if not finetune else (cfg.game,)
            model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab, games=games,
                                            tokens_per_obs=k or model_cfg.tokens_per_obs)
        model = pretrained if pretrained is not None else WorldActionModel(model_cfg)
        if finetune and pretrained is not None:
            new_game = cfg.game not in model.cfg.games
            log.info("fine-tuning %s on new game %s (task row %d)", cfg.from_run, cfg.game, model.add_game(cfg.game))
            if new_game and cfg.recalibrate_q:
                model.recalibrate_q()
                log.info("Q head output restarted at E[Q] = %g for the new game (--no-recalibrate-q keeps it)",
                         model.cfg.q_init)
        if finetune:
            bad = [p for p in cfg.freeze if p not in FREEZABLE_PARTS]
            if bad:
                raise WamError(f"cannot freeze {bad}; choose from {', '.join(FREEZABLE_PARTS)}")
            model.freeze(tuple(cfg.freeze))
        transform = _with_game_map(pieces.batch_transform, pieces.games, model.cfg.games)
        objective = WorldActionObjective(model, cfg.loss)
        source, q_targets_meta = pieces.source, {}
        if cfg.q_targets:
            source, q_targets_meta = q_target_source(pieces.source, cfg.q_targets)
            pieces.source = source  # closed below
        meta = {"kind": CHECKPOINT_KIND, "command": command, "tokenizer": pieces.tokenizer_meta,
                "config": {"model": model.config_dict(), "loss": config_to_dict(cfg.loss),
                           "run": config_to_dict(cfg), "objective": objective.objective},
                "q_targets": q_targets_meta}
        evaluate = _calibration_hook(model, cfg, pieces) if cfg.calibration_episodes and rank == 0 else None
        trainer = Trainer(objective, source, cfg.train, run, checkpoint_meta=meta, batch_transform=transform,
                          on_log=on_log, flops_per_token=model.flops_per_token(objective.uses_world_model),
                          evaluate=evaluate, eval_every=cfg.train.checkpoint_every if evaluate else 0)
        if ckpt is not None:
            trainer.load_state(ckpt)
        elif rank == 0:
            run.write_config(cfg, command=command, objective=objective.objective, model_resolved=model.config_dict(),
                             tokenizer=pieces.tokenizer_meta, q_targets_file=q_targets_meta)
        log.info("%s: objective %s, %s core, %.2fM parameters (backbone+heads), %d games, %d steps", command,
                 objective.objective, model.cfg.core, model.count_parameters() / 1e6, len(model.cfg.games),
                 cfg.train.steps)
        return trainer.fit()
    finally:
        close = getattr(pieces.source, "close", None)
        if close is not None:
            close()


def _check_run_options(cfg: PretrainConfig | FinetuneConfig, command: str) -> None:
    """One clear error for options that cannot train, before anything is loaded."""
    if not cfg.out:
        raise WamError(f"give the run directory with --out (wam {command})")
    for flag, value in (("--steps", cfg.train.steps), ("--batch-size", cfg.batch_size), ("--n-step", cfg.loss.n_step)):
        if value < 1:
            raise WamError(f"{flag} must be at least 1, got {value}")
    if isinstance(cfg, FinetuneConfig) and not cfg.game:
        raise WamError("give the new game with --game NAME")
    if cfg.q_targets and objective_name(cfg.loss) == "bc":
        raise WamError("--q-targets (distillation toward corrected Q) does not apply to --objective bc; "
                       "use --objective jowa or q-only")
    if cfg.q_targets and tuple(cfg.data) == (SYNTHETIC,):
        raise WamError("--q-targets needs the datasets the targets were planned on, not --data synthetic")


def _starting_point(cfg: PretrainConfig | FinetuneConfig, ckpt: dict | None
                    ) -> tuple[WorldActionModelConfig, WorldActionModel | None, str]:
    """(model config, pretrained model or None, tokenizer path) of a run: a resumed run's own, a fine-tuning
    run's pretrained model's, or the command line's for a new model."""
    tokenizer_path = cfg.tokenizer
    if ckpt is not None:
        return (config_from_dict(WorldActionModelConfig, ckpt["config"]["model"]), None,
                tokenizer_path or ckpt.get("tokenizer", {}).get("path", ""))
    if isinstance(cfg, FinetuneConfig) and cfg.from_run != "scratch":
        if not cfg.from_run:
            raise WamError("give the pretrained run with --from RUN (or --from scratch)")
        pretrained, pre_ckpt = WorldActionModel.from_checkpoint(cfg.from_run)
        return pretrained.cfg, pretrained, tokenizer_path or pre_ckpt.get("tokenizer", {}).get("path", "")
    if isinstance(cfg, FinetuneConfig) and not cfg.tokenizer and tuple(cfg.data) != (SYNTHETIC,):
        raise WamError("--from scratch needs --tokenizer RUN (there is no pretrained run to take it from)")
    return cfg.model, None, tokenizer_path


def _calibration_hook(model: WorldActionModel, cfg: PretrainConfig | FinetuneConfig,
                      pieces: _Pieces) -> Callable[[int], dict[str, float]]:
    """`evaluate(step)` for the trainer: Q calibration (`wam.worldmodel.diagnostics.q_calibration`) on the
    sampler's held-out episodes, flat per game: q_mc_gap/<game>, q_mc_abs_gap/<game>, q_heldout/<game>,
    mc_return/<game> and, where Q and the returns vary, q_mc_corr/<game>."""
    from wam.datasets.store import TrajectoryStore
    from wam.worldmodel.diagnostics import EpisodeTokens, q_calibration

    if tuple(cfg.data) == (SYNTHETIC,):
        raise WamError("--calibration-episodes needs real datasets, not --data synthetic")
    sampler = getattr(pieces.source, "sampler", pieces.source)
    episodes = []
    for path, i in sampler.held_out():
        store = TrajectoryStore.open(path)
        if store.tokenizer_id() != pieces.tokenizer_meta["id"]:
            raise WamError(f"--calibration-episodes reads the token cache, and {path} has none from tokenizer "
                           f"{pieces.tokenizer_meta['id']}; run `wam tokenize` on it first")
        episodes.append(EpisodeTokens.from_store(store, i, model.cfg.games.index(store.game)))
    log.info("Q calibration on %d held-out episode(s) (%d steps) at every checkpoint step", len(episodes),
             sum(len(e.actions) for e in episodes))

    def evaluate(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for gid, r in q_calibration(model, episodes, cfg.loss.gamma, cfg.loss.reward_transform).items():
            game = model.cfg.games[gid]
            out.update({f"q_mc_gap/{game}": r["q_mc_gap"], f"q_mc_abs_gap/{game}": r["q_mc_abs_gap"],
                        f"q_heldout/{game}": r["q_data_mean"], f"mc_return/{game}": r["mc_return_mean"]})
            if "q_mc_corr" in r:  # does Q follow the state (docs/training.md)
                out[f"q_mc_corr/{game}"] = r["q_mc_corr"]
        return out

    return evaluate


def _dispatch(cfg: PretrainConfig | FinetuneConfig) -> int:
    if cfg.workers < 1:
        raise WamError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.workers > 1 or cfg.ray_address is not None:
        from wam.runs.ray_train import train_with_ray

        train_with_ray(cfg, cfg.workers, cfg.ray_address)
        return 0
    result = run_training(cfg)
    print(f"trained to step {result.step}: loss {result.last_logs.get('loss', float('nan')):.4f}; "
          f"checkpoint {result.checkpoint}")
    return 0


def pretrain(cfg: PretrainConfig) -> int:
    """Pretrain the world-action model on offline trajectories of many games."""
    return _dispatch(cfg)


def finetune(cfg: FinetuneConfig) -> int:
    """Fine-tune a pretrained world-action model on a new game (or train the same model from scratch)."""
    return _dispatch(cfg)
