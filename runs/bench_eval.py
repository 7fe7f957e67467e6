"""`wam bench eval`: agent steps/s of Ray-distributed evaluation with 1 and 2 workers (random agent).

Figures, each against a reference measured in the same run:

1. **Scaling**: steady-state agent steps/s of `wam.agents.evaluate.evaluate` with 2 workers over 1
   worker (target >= 1.8 on 2 cores). Each worker count is timed end to end (actor start-up
   included; Ray itself is started once beforehand) at two episode budgets; the marginal rate
   (Δsteps / Δseconds) between them excludes the start-up and is the figure (best of 2 repeats,
   to damp the noise of a shared machine; every repeat is in the JSON).
2. **Overhead**: the in-process evaluation loop (`play_episodes`, one env, no Ray) against the bare
   emulator (`ale.act`, no preprocessing) measured in the same run, and the 1-worker marginal rate
   against the in-process loop, i.e. what Ray and the parent cost per step.

3. **Model agents** (issue 19 §4): agent steps/s of the `debug` world-action agent (untrained weights: the
   speed does not depend on them), greedy and planning (K = 2, H = 2), in the in-process loop with 1 torch
   thread (a per-core figure) over 1, 4, 16 and 64 environments stepped in lockstep (`--envs-per-worker`),
   and where the time goes: the emulator (the random agent's loop over as many environments), the
   tokenizer's `encode`, and the rest (model calls, planning, Python per step). Targets per core: greedy
   >= 1,000 agent steps/s, planning >= 100.

The machine is shared and has 2 cores: timings are noisy; the JSON keeps every run.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

GAME = "Pong"
"""Random Pong: long episodes (about 800 agent steps uncapped), real frames."""
TARGETS = {"scaling_2_over_1": 1.8, "greedy_steps_per_s": 1000.0, "planning_steps_per_s": 100.0}
ENVS = (1, 4, 16, 64)


def _in_process_rate(steps: int, seed: int) -> dict:
    """Agent steps/s of the evaluation loop in this process (one env, random agent, no Ray)."""
    from wam.agents.base import load_agent
    from wam.agents.evaluate import play_episodes
    from wam.datasets.atari import legal_action_mask, make_env

    agent = load_agent("random", GAME)
    env = make_env(GAME, seed=seed, max_episode_steps=steps)
    play_episodes(agent, [env], legal_action_mask(GAME), [seed], 0.0)  # warm-up
    t0 = time.perf_counter()
    ((_, length, _, _, _, _),) = play_episodes(agent, [env], legal_action_mask(GAME), [seed + 1], 0.0)
    seconds = time.perf_counter() - t0
    return {"steps": length, "seconds": seconds, "steps_per_s": length / seconds}


def _raw_ale_rate(frames: int, seed: int) -> dict:
    """Agent steps/s (4 emulator frames each) of the bare emulator: `ale.act` with random actions, no preprocessing."""
    import numpy as np

    from wam.datasets.atari import FRAME_SKIP, make_env

    ale = make_env(GAME, seed=seed).unwrapped.ale
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    ale.reset_game()
    t0 = time.perf_counter()
    action = actions[0]
    for i in range(frames):
        if i % FRAME_SKIP == 0:
            action = actions[int(rng.integers(len(actions)))]
        ale.act(action)
        if ale.game_over():
            ale.reset_game()
    seconds = time.perf_counter() - t0
    return {"frames": frames, "seconds": seconds, "steps_per_s": frames / FRAME_SKIP / seconds}


def _eval_rate(root: Path, workers: int, budgets: tuple[int, int], cap: int, seed: int, repeats: int) -> dict:
    """End-to-end and marginal agent steps/s of evaluate() with `workers` workers; best of `repeats`."""
    from wam.agents.evaluate import evaluate

    repeat_rates = []
    for k in range(repeats):
        runs = []
        for i, episodes in enumerate(budgets):
            res = evaluate("random", [GAME], episodes=episodes, workers=workers, seed=seed, max_steps=cap, envs_per_worker=1,
                           out_dir=root / f"w{workers}-{k}-{i}", progress=False)
            runs.append({"episodes": episodes, "steps": res.steps, "seconds": res.seconds})
        (s0, t0), (s1, t1) = ((r["steps"], r["seconds"]) for r in runs)
        repeat_rates.append({"runs": runs, "steps_per_s": s1 / t1,
                             "marginal_steps_per_s": (s1 - s0) / max(t1 - t0, 1e-9)})
    best = max(repeat_rates, key=lambda r: r["marginal_steps_per_s"])
    return {"repeats": repeat_rates, "steps_per_s": best["steps_per_s"],
            "marginal_steps_per_s": best["marginal_steps_per_s"]}


class _TimedTokenizer:
    """The agent's tokenizer, with the seconds spent in `encode` added up."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seconds = tokenizer, 0.0

    def encode(self, frames):
        t0 = time.perf_counter()
        out = self.tokenizer.encode(frames)
        self.seconds += time.perf_counter() - t0
        return out


def _model_agent_rates(envs: tuple[int, ...], cap: int, seed: int) -> list[dict]:
    """Steps/s of greedy and planning `debug` agents over `envs` lockstep environments, with the time split
    into emulator, tokenizer and the rest (1 torch thread)."""
    import torch

    from wam.agents.base import load_agent
    from wam.agents.evaluate import play_episodes
    from wam.agents.world_action import WorldActionAgent
    from wam.datasets.atari import legal_action_mask, make_env
    from wam.planning.beam import PlannerSettings
    from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig
    from wam.worldmodel.tokenizer import TokenizerConfig, build_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    legal = legal_action_mask(GAME)
    tokenizer = build_tokenizer(TokenizerConfig.from_preset("debug")).eval()
    model = WorldActionModel(dataclasses.replace(WorldActionModelConfig.from_preset("debug"), games=(GAME,),
                                                 vocab_size=tokenizer.cfg.codebook_size))
    rows = []
    try:
        for n in envs:
            seeds = [seed + i for i in range(n)]

            def play(agent, n=n, seeds=seeds) -> float:
                env_list = [make_env(GAME, seed=s, max_episode_steps=cap) for s in seeds]
                t0 = time.perf_counter()
                play_episodes(agent, env_list, legal, seeds, 0.0)
                return time.perf_counter() - t0

            emulator_s = play(load_agent("random", GAME))  # the loop and the emulator alone
            row = {"envs": n, "steps": n * cap, "emulator_s": emulator_s}
            for mode, plan in (("greedy", None), ("planning", PlannerSettings(beam_width=2, horizon=2))):
                timed = _TimedTokenizer(tokenizer)
                agent = WorldActionAgent(model, timed, GAME, plan=plan)
                seconds = play(agent)
                row[mode] = {"seconds": seconds, "steps_per_s": n * cap / seconds,
                             "share_emulator": min(1.0, emulator_s / seconds),
                             "share_tokenizer": timed.seconds / seconds,
                             "share_rest": max(0.0, 1.0 - (emulator_s + timed.seconds) / seconds)}
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def run(quick: bool = False) -> dict:
    from wam.datasets.distributed import ray_session
    from wam.runs.bench import machine_info

    cap, budgets, repeats = (300, (2, 6), 1) if quick else (1000, (4, 16), 2)
    root = Path(tempfile.mkdtemp(prefix="wam-bench-eval-"))
    try:
        raw = _raw_ale_rate(4 * cap, seed=0)
        reference = _in_process_rate(cap, seed=0)
        agents = _model_agent_rates(ENVS[:2] if quick else ENVS, 50 if quick else 200, seed=0)
        with ray_session(num_cpus=2):
            rates = {w: _eval_rate(root, w, budgets, cap, seed=0, repeats=repeats) for w in (1, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one, two = rates[1]["marginal_steps_per_s"], rates[2]["marginal_steps_per_s"]
    scaling = two / one
    best = {m: max(r[m]["steps_per_s"] for r in agents) for m in ("greedy", "planning")}
    return {
        "model_agents": agents, "model_agent_best": best,
        "meets_greedy_target": best["greedy"] >= TARGETS["greedy_steps_per_s"],
        "meets_planning_target": best["planning"] >= TARGETS["planning_steps_per_s"],
        "game": GAME, "agent": "random", "episode_cap": cap, "episode_budgets": list(budgets), "repeats": repeats,
        "quick": quick,
        "raw_ale": raw, "in_process": reference, "workers": {str(w): r for w, r in rates.items()},
        "scaling_2_over_1": scaling, "ray_overhead_1_worker": one / reference["steps_per_s"],
        "targets": TARGETS, "meets_scaling_target": scaling >= TARGETS["scaling_2_over_1"],
        "machine": machine_info(),
    }


def markdown(result: dict) -> str:
    w = result["workers"]
    rows = [
        "| measure | agent steps/s | ratio | target |",
        "|---|---|---|---|",
        f"| bare emulator (`ale.act`, 4 frames per step, no preprocessing) | {result['raw_ale']['steps_per_s']:.0f} | "
        f"{result['raw_ale']['steps_per_s'] / result['in_process']['steps_per_s']:.2f} | |",
        f"| in-process loop, 1 env (reference) | {result['in_process']['steps_per_s']:.0f} | 1.00 | |",
        f"| `evaluate`, 1 worker (marginal) | {w['1']['marginal_steps_per_s']:.0f} | "
        f"{result['ray_overhead_1_worker']:.2f} of in-process | |",
        f"| `evaluate`, 2 workers (marginal) | {w['2']['marginal_steps_per_s']:.0f} | "
        f"{result['scaling_2_over_1']:.2f} × 1 worker | ≥ {TARGETS['scaling_2_over_1']} |",
        f"| `evaluate`, 1 / 2 workers end to end | {w['1']['steps_per_s']:.0f} / {w['2']['steps_per_s']:.0f} | "
        "incl. actor start-up | |",
    ]
    verdict = "met" if result["meets_scaling_target"] else "**missed**"
    agents = result.get("model_agents", [])
    agent_rows = ["| envs | greedy steps/s | emulator / tokenizer / rest | planning steps/s | emulator / tokenizer / rest |",
                  "|---:|---:|---|---:|---|"]
    for r in agents:
        cells = []
        for m in ("greedy", "planning"):
            x = r[m]
            cells += [f"{x['steps_per_s']:.0f}",
                      f"{x['share_emulator']:.0%} / {x['share_tokenizer']:.0%} / {x['share_rest']:.0%}"]
        agent_rows.append(f"| {r['envs']} | " + " | ".join(cells) + " |")
    agent_text = []
    if agents:
        best = result["model_agent_best"]
        verdicts = {m: "met" if result[f"meets_{m}_target"] else "**missed**" for m in ("greedy", "planning")}
        agent_text = ["", "`debug` world-action agent on one core (1 torch thread, in-process loop, untrained "
                      f"weights), episodes of {agents[0]['steps'] // agents[0]['envs']} steps; best greedy "
                      f"{best['greedy']:.0f} steps/s (target >= {TARGETS['greedy_steps_per_s']:.0f}: "
                      f"{verdicts['greedy']}), best planning K=2 H=2 {best['planning']:.0f} steps/s (target >= "
                      f"{TARGETS['planning_steps_per_s']:.0f}: {verdicts['planning']}). Shares of the time: the "
                      "emulator (the random agent's loop over as many environments), the tokenizer's encode, "
                      "the rest (model calls, planning, Python).", "", *agent_rows]
    limits = []
    if not result["meets_scaling_target"]:
        limits.append("- **scaling missed:** the two workers share the machine's cores with the driver process and "
                      "Ray's own processes; this benchmark does not separate their shares.")
    if agents and not result["meets_greedy_target"]:
        top = max(agents, key=lambda r: r["greedy"]["steps_per_s"])["greedy"]
        limits.append(f"- **greedy missed:** model calls ({top['share_rest']:.0%} of the time at the best setting): the "
                      "core runs over the whole window (4 frames, 148 tokens) every step while acting reads one "
                      "position (profiled on 2026-12-07 at 64 environments: linear layers 31 %, attention 23 %, GELU "
                      "11 %, the tokenizer's convolutions 11 %); computing only the positions acting reads needs "
                      "the core interface to change.")
    limits = ["", "What limits each miss:", "", *limits] if limits else []
    return "\n".join([
        f"Random agent on {result['game']}, episodes capped at {result['episode_cap']} agent steps, episode "
        f"budgets {result['episode_budgets']} per worker count; scaling target {verdict}.", "", *rows,
        *agent_text, *limits, "",
        f"Machine: {result['machine'].get('cpu_model')} ({result['machine'].get('cpus')} CPUs), shared: noisy.",
    ])
