"""`wam baseline train`: d3rlpy's DiscreteCQL / DiscreteBC trained on wam datasets, played by `wam eval`.

    make baselines                                   # once: .venv-baselines with d3rlpy 2.8.1
    wam baseline train --algo discrete-cql --data DIR... --out RUN [--steps N] [--learning-rate ...]
    wam eval --agent RUN --game GAME ...             # the same Ray evaluation as wam's own agents

Steps (see docs/baselines.md):

1. read the datasets with wam's reader and write `RUN/d3rlpy_data.h5` (`wam.agents.d3rlpy_agent.export_for_d3rlpy`:
   one game, actions as indices into its legal set, sign-clipped rewards, terminations apart from truncations);
2. run `agents/d3rlpy_worker.py` with the Python of `.venv-baselines` (d3rlpy 2.8.1 pins gymnasium 1.0.0, so
   it never enters wam's environment); it trains with d3rlpy's Atari settings (below, each overridable) and
   reports every `--log-every` steps on stdout, which becomes `metrics.jsonl` and the progress bar;
3. write `RUN/checkpoints/step_<N>.pt` of kind "d3rlpy-policy" next to d3rlpy's TorchScript `RUN/policy.pt`,
   so `load_agent(RUN)` builds a `D3rlpyAgent`.

Defaults: DiscreteCQL as d3rlpy 2.8.1's `reproductions/offline/discrete_cql.py` (learning rate 5e-5, Adam
eps 1e-2/32, batch 32, alpha 4, QR-DQN head of 200 quantiles, target update every 2,000 steps, gamma 0.99,
pixel scaler, 12.5M steps = 50M frames). d3rlpy has no Atari script for DiscreteBC; it gets the settings
of the imitator in d3rlpy's Atari DiscreteBCQ script (`reproductions/offline/discrete_bcq.py`: learning
rate 5e-5, Adam eps 1e-2/32, batch 32, beta 0.01), which trains the same loss: `DiscreteBCConfig`'s
generic beta 0.5 penalises the squared log-probabilities hard enough to keep the policy near uniform
(docs/baselines.md). Both use the Nature-DQN pixel encoder, 4-frame stacks and the pixel scaler.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wam.agents.d3rlpy_agent import ALGOS
from wam.datasets.errors import WamError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The wam checkout (`make baselines` creates `.venv-baselines` there)."""
BASELINES_VENV = ".venv-baselines"
D3RLPY_VERSION = "2.8.1"

_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "policy.pt", "d3rlpy_model.d3", "d3rlpy_data.h5",
                "d3rlpy_config.json", "worker.log", "config.json", "tensorboard")


@dataclass
class BaselineTrainArgs:
    """Train d3rlpy's DiscreteCQL or DiscreteBC on wam datasets of one game (in .venv-baselines); the run
    directory is an agent for `wam eval --agent RUN`."""

    data: tuple[str, ...] = ()
    """Dataset directories (or roots holding datasets), all of one game; repeat the flag: --data A --data B."""
    out: str = ""
    """Run directory: config.json, metrics.jsonl, d3rlpy_data.h5, policy.pt (TorchScript), d3rlpy_model.d3,
    worker.log, checkpoints/."""
    algo: Literal["discrete-cql", "discrete-bc"] = "discrete-cql"
    """d3rlpy algorithm: DiscreteCQL (conservative Q-learning, a QR-DQN head by default) or DiscreteBC."""
    steps: int = 12_500_000
    """Gradient steps (d3rlpy's Atari scripts: 50M frames / 4 = 12.5M; a few hundred is a CPU smoke test)."""
    seed: int = 0
    """Seed of Python, NumPy (d3rlpy samples batches with it) and torch (`d3rlpy.seed`)."""
    transitions: int | None = None
    """Use only the first N transitions of each dataset, as `wam finetune --transitions` (default: all)."""
    hold_out_episodes: int = 0
    """Leave out the last K episodes of each dataset, as wam's `--calibration-episodes` (the recipe's 2)."""
    learning_rate: float = 5e-5
    """Adam learning rate (d3rlpy's Atari scripts)."""
    batch_size: int = 32
    """Transitions per gradient step (d3rlpy's Atari scripts)."""
    adam_eps: float = 1e-2 / 32
    """Adam epsilon (d3rlpy's Atari scripts: 1e-2 / 32)."""
    gamma: float = 0.99
    """discrete-cql: discount factor."""
    alpha: float = 4.0
    """discrete-cql: weight of the conservative (CQL) term."""
    target_update_interval: int = 2000
    """discrete-cql: gradient steps between target-network copies."""
    n_quantiles: int = 200
    """discrete-cql: quantiles of the QR-DQN Q-function; 0 uses d3rlpy's mean (plain DQN) Q-function."""
    beta: float = 0.01
    """discrete-bc: weight of d3rlpy's penalty on the squared log-probabilities (d3rlpy's Atari DiscreteBCQ
    imitator: 0.01; DiscreteBCConfig's generic default: 0.5)."""
    log_every: int = 100
    """Steps between metrics.jsonl rows (each the mean of the losses since the previous row)."""
    threads: int = 1
    """Torch intra-op threads of the training process."""
    python: str = ""
    """Python of the d3rlpy environment (default: .venv-baselines/bin/python of this checkout, made by
    `make baselines`)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in --out (otherwise a used run directory is refused)."""
    progress: bool = True
    """Show a progress bar."""


def baselines_python(explicit: str = "", root: Path | None = None) -> Path:
    """The Python of the d3rlpy environment: `explicit`, else `<root>/.venv-baselines/bin/python`; WamError if missing."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise WamError(f"--python {explicit} does not exist; run `make baselines` first (it creates "
                           f"{BASELINES_VENV}/ with d3rlpy {D3RLPY_VERSION}) or give the Python of such an environment")
        return path
    root = REPO_ROOT if root is None else root
    path = root / BASELINES_VENV / "bin" / "python"
    if not path.is_file():
        raise WamError(f"the d3rlpy environment {root / BASELINES_VENV} is missing: run `make baselines` first "
                       f"(in {root}; it installs d3rlpy {D3RLPY_VERSION} apart from wam's environment)")
    return path


def resolve_settings(args: BaselineTrainArgs) -> dict[str, Any]:
    """The worker's settings: every option of `args` that shapes training (the algorithm's own ones only), and
    the fixed parts of the setup (what config.json and the checkpoint record). Raises WamError for values out
    of range."""
    if args.algo not in ALGOS:
        raise WamError(f"unknown --algo {args.algo!r}; choose one of {', '.join(ALGOS)}")
    s: dict[str, Any] = {
        "algo": args.algo, "steps": args.steps, "seed": args.seed, "learning_rate": float(args.learning_rate),
        "batch_size": int(args.batch_size), "adam_eps": float(args.adam_eps),
        "log_every": args.log_every, "threads": args.threads, "frame_stack": 4,
        "encoder": "nature-dqn (d3rlpy PixelEncoderFactory)", "observation_scaler": "pixel (x / 255)",
        "reward_transform": "sign",
    }
    if args.algo == "discrete-cql":
        s.update(gamma=args.gamma, alpha=args.alpha, target_update_interval=args.target_update_interval,
                 n_quantiles=args.n_quantiles)
    else:
        s.update(beta=args.beta)
    checks = [("--steps", args.steps >= 1), ("--batch-size", s["batch_size"] >= 1),
              ("--learning-rate", s["learning_rate"] > 0), ("--adam-eps", s["adam_eps"] > 0),
              ("--log-every", args.log_every >= 1), ("--threads", args.threads >= 1),
              ("--gamma", 0.0 <= args.gamma <= 1.0), ("--alpha", args.alpha >= 0),
              ("--target-update-interval", args.target_update_interval >= 1),
              ("--n-quantiles", args.n_quantiles >= 0), ("--beta", args.beta >= 0)]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise WamError(f"{', '.join(bad)} out of range: steps, batch size, log interval, threads and target "
                       "interval must be >= 1, learning rate and Adam eps > 0, gamma in [0, 1], alpha, beta and "
                       "quantiles >= 0")
    return s


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    used = [name for name in _RUN_OUTPUTS if (out / name).exists()]
    if used and not overwrite:
        raise WamError(f"{out} already holds a run ({', '.join(used)}); choose another --out or pass --overwrite")
    for name in used:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class WorkerResult:
    """What the d3rlpy worker reported."""

    start: dict[str, Any]
    done: dict[str, Any] | None
    last_metrics: dict[str, Any]
    interrupted: bool


def run_worker(python: Path, export: Path, settings: dict[str, Any], out: Path, progress: bool = True) -> WorkerResult:
    """Run `agents/d3rlpy_worker.py` under `python`; its `@wam` lines become metrics.jsonl rows and a progress bar,
    its other output goes to `out/worker.log`. Ctrl-C is passed on: the worker saves the policy of the steps done."""
    from tqdm import tqdm

    from wam.agents.d3rlpy_agent import WORKER_SCRIPT
    from wam.worldmodel.checkpoint import RunDir

    run = RunDir(out)
    cfg_path = out / "d3rlpy_config.json"
    cfg_path.write_text(json.dumps(settings, indent=2, sort_keys=True))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    threads = str(settings["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    cmd = [str(python), str(WORKER_SCRIPT), "--export", str(export), "--config", str(cfg_path), "--out", str(out)]
    log.info("running %s", " ".join(cmd))
    start: dict[str, Any] = {}
    done: dict[str, Any] | None = None
    error: str | None = None
    last: dict[str, Any] = {}
    bar = tqdm(total=settings["steps"], desc=f"d3rlpy {settings['algo']}", unit="step", dynamic_ncols=True,
               disable=not progress)
    interrupted = False
    with open(out / "worker.log", "a") as worker_log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env) as proc:
        assert proc.stdout is not None

        def handle(line: str) -> None:
            nonlocal done, error, last, start
            if not line.startswith("@wam "):
                worker_log.write(line)
                worker_log.flush()
                return
            msg = json.loads(line[5:])
            event = msg.pop("event")
            if event == "start":
                start = msg
                if msg["d3rlpy_version"] != D3RLPY_VERSION:
                    log.warning("%s has d3rlpy %s; wam's settings were checked against %s", python,
                                msg["d3rlpy_version"], D3RLPY_VERSION)
                tqdm.write(f"d3rlpy {msg['d3rlpy_version']}: {msg['transitions']} transitions in {msg['episodes']} "
                           f"episodes, {msg['action_size']} actions")
            elif event == "metrics":
                step = int(msg.pop("step"))
                seconds = float(msg.pop("seconds"))
                row = {**msg, "seconds": seconds, "steps_per_second": step / seconds if seconds > 0 else 0.0}
                run.log_metrics(step, row)
                last = {"step": step, **row}
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{msg.get('loss', float('nan')):.4g}")
            elif event == "done":
                done = msg
            elif event == "error":
                error = msg["message"]

        try:
            for line in proc.stdout:
                handle(line)
        except KeyboardInterrupt:
            interrupted = True
            proc.send_signal(signal.SIGINT)  # the worker saves the policy of the steps done, then exits
            for line in proc.stdout:
                handle(line)
        rc = proc.wait()
    bar.close()
    if error is not None:
        raise WamError(error)
    if rc != 0 or done is None:
        tail = "".join((out / "worker.log").read_text().splitlines(keepends=True)[-15:])
        raise WamError(f"the d3rlpy worker failed (exit {rc}); the end of {out / 'worker.log'}:\n{tail.rstrip()}")
    return WorkerResult(start=start, done=done, last_metrics=last, interrupted=interrupted or bool(done["interrupted"]))


def train(args: BaselineTrainArgs) -> int:
    """`wam baseline train`."""
    from wam.agents.d3rlpy_agent import EXPORT_FILE, export_for_d3rlpy, save_policy_checkpoint
    from wam.worldmodel.checkpoint import RunDir

    if not args.out:
        raise WamError("give the run directory with --out RUN")
    if not args.data:
        raise WamError("give the training data with --data DIR (a dataset directory or a root holding datasets)")
    settings = resolve_settings(args)
    python = baselines_python(args.python)
    out = Path(args.out)
    _prepare_run_dir(out, args.overwrite)
    t0 = time.perf_counter()
    export = export_for_d3rlpy(args.data, out / EXPORT_FILE, max_transitions=args.transitions,
                               hold_out_episodes=args.hold_out_episodes)
    export_seconds = time.perf_counter() - t0
    print(f"exported {export.episodes} episodes, {export.steps} steps of {export.game} ({export.terminated} "
          f"terminated, {export.truncated} truncated; {len(export.legal_ids)} legal actions) from "
          f"{len(export.datasets)} dataset(s) to {export.path} in {export_seconds:.1f}s")
    RunDir(out).write_config(args, settings=settings, export=export.as_dict())
    result = run_worker(python, export.path, settings, out, progress=args.progress)
    done = result.done
    assert done is not None
    if not done.get("policy"):
        print("interrupted before the first step: no policy saved")
        raise KeyboardInterrupt
    extra = {"export": export.as_dict(), "seconds": float(done["seconds"]), "interrupted": result.interrupted,
             "d3rlpy_version": result.start.get("d3rlpy_version", ""), "torch_version": result.start.get("torch_version", ""),
             "d3rlpy_model": done.get("model", "")}
    ckpt = save_policy_checkpoint(out, int(done["steps"]), algo=args.algo, game=export.game, legal=export.legal_ids,
                                  config=settings, extra=extra)
    loss = result.last_metrics.get("loss")
    loss_text = f", last loss {loss:.4g}" if loss is not None else ""
    what = "stopped by Ctrl-C after" if result.interrupted else "for"
    print(f"trained d3rlpy {args.algo} on {export.game} {what} {done['steps']} steps in {done['seconds']:.1f}s "
          f"({done['steps_per_second']:.1f} steps/s{loss_text}); policy {out / 'policy.pt'}, checkpoint {ckpt}")
    print(f"evaluate it: wam eval --agent {out} --game {export.game}")
    if result.interrupted:
        raise KeyboardInterrupt
    return 0
