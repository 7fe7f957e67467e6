"""`wam bench planner`: decisions/s of greedy acting vs beam-search planning, per core; model calls and tokens
per decision vs the minimum K*H*37; planning time vs the time of bare greedy decoding of that many tokens;
planner-pool throughput with 1 and 2 Ray workers.

Setup: the `debug` world-action model (d=64, 2 layers, 512-token vocabulary, 4-step context) of every core,
B environments planned together from a 2-frame context (the most with which the H = 2 leaves read Q at
slots the losses train, `max_context_frames`). A *decision* is one environment's action.

- greedy: feed the current frame (`observe`, 36 tokens in parallel form) and take the best legal Q.
- planning (K, H): the same, then `BeamSearchPlanner.plan`.
- minimum-token reference: the irreducible sequential work of any planner that decodes K*H*37 tokens
  greedily: 37*H calls of the model's incremental step (embedding, core.step, norm) plus the next-token
  head over B*K rows, in a bare loop. Target: planning time / reference time <= 1.5.
- pool: requests planned by a `PlannerPool` with 1 and 2 actors (1 torch thread each); target: 2 workers
  >= 1.7x the throughput of one.

Timings on a shared machine are noisy; the ratios are measured in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

CORES = ("transformer", "mamba", "mamba2", "atlas")
SETTINGS = ((2, 2), (4, 2))
TOKENS_PER_STEP = 37


def _model(core: str) -> Any:
    import dataclasses

    from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig

    cfg = dataclasses.replace(WorldActionModelConfig.from_preset("debug"), core=core, games=("Bench",))
    torch.manual_seed(0)
    return WorldActionModel(cfg).eval()


def _root(model: Any, b: int, frames: int, seed: int = 0):
    """A context of `frames` frames for b environments, encoded; returns (state before the current frame,
    current frame tokens, legal mask)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, model.cfg.vocab_size, (b, frames, 36), generator=g)
    actions = torch.randint(0, 6, (b, frames - 1), generator=g)
    game_ids = torch.zeros(b, dtype=torch.long)
    with torch.no_grad():
        _, state = model(obs[:, :-1], actions, game_ids)  # the earlier frames, each followed by its action
    legal = torch.zeros(b, 18, dtype=torch.bool)
    legal[:, :6] = True
    return state, obs[:, -1], legal


def _best_time(fn, reps: int) -> float:
    """Smallest wall time of `reps` calls (after one warm-up call): the least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _bench_core(core: str, b: int, reps: int) -> dict[str, Any]:
    from wam.planning.beam import BeamSearchPlanner, repeat_state

    model = _model(core)
    from wam.planning.beam import max_context_frames

    state, frame, legal = _root(model, b, frames=max_context_frames(model, max(h for _, h in SETTINGS)))

    @torch.no_grad()
    def greedy():
        q, _ = model.observe(frame, state)
        return model.q_values(q, legal).argmax(-1)

    t_greedy = _best_time(greedy, reps)
    row: dict[str, Any] = {"core": core, "envs": b, "greedy_decisions_per_s": b / t_greedy, "settings": []}
    for k, h in SETTINGS:
        planner = BeamSearchPlanner(model, beam_width=k, horizon=h)
        stats: dict[str, Any] = {}

        @torch.no_grad()
        def plan(planner=planner, stats=stats):
            q, st = model.observe(frame, state)
            res = planner.plan(st, q, legal)
            stats["calls"], stats["tokens"] = res.model_calls, res.tokens
            return res.action

        q0, st0 = model.observe(frame, state)
        st_bk = repeat_state(st0, k)
        x = torch.zeros(b * k, model.cfg.d_model)

        @torch.no_grad()
        def reference(st=st_bk, x=x, h=h):  # bare greedy decoding of K*H*37 tokens per environment
            for _ in range(h * TOKENS_PER_STEP):
                hh, st = model._step(x, st)
                model.obs_head(hh).argmax(-1)

        t_plan = _best_time(plan, reps)
        t_ref = _best_time(reference, reps)
        minimum = k * h * TOKENS_PER_STEP
        row["settings"].append({
            "K": k, "H": h, "planning_decisions_per_s": b / t_plan, "slowdown_vs_greedy": t_plan / t_greedy,
            "model_calls_per_decision": stats["calls"] / b, "model_calls_per_batch": stats["calls"],
            "tokens_per_decision": stats["tokens"] / b, "min_tokens_per_decision": minimum,
            "tokens_ratio": stats["tokens"] / b / minimum,
            "plan_seconds": t_plan - t_greedy, "min_token_seconds": t_ref,
            "cost_ratio_vs_min_tokens": (t_plan - t_greedy) / t_ref, "target_cost_ratio": 1.5,
            "meets_cost_target": (t_plan - t_greedy) / t_ref <= 1.5,
        })
    return row


def _bench_pool(n_requests: int, batch_size: int) -> dict[str, Any]:
    from wam.datasets.distributed import ray_session
    from wam.planning.beam import PlannerSettings, max_context_frames
    from wam.planning.pool import PlannerPool, PlanRequest

    model = _model("transformer")
    rng = np.random.default_rng(0)
    legal = np.zeros(18, dtype=bool)
    legal[:6] = True
    frames = max_context_frames(model, 2)
    reqs = [PlanRequest(obs_tokens=rng.integers(0, 512, (frames, 36)), actions=rng.integers(0, 6, frames - 1), game_id=0,
                        legal=legal) for _ in range(n_requests)]
    settings = PlannerSettings(beam_width=2, horizon=2)
    out: dict[str, Any] = {"requests": n_requests, "batch_size": batch_size, "K": 2, "H": 2, "core": "transformer"}
    answers = {}
    with ray_session(num_cpus=2):
        for workers in (1, 2):
            with PlannerPool(model, settings, workers=workers, batch_size=batch_size) as pool:
                pool.warmup()
                pool.plan(reqs[:batch_size * workers])  # warm-up: first calls allocate
                t0 = time.perf_counter()
                answers[workers] = pool.plan(reqs)
                out[f"states_per_s_{workers}w"] = n_requests / (time.perf_counter() - t0)
    out["speedup_2w"] = out["states_per_s_2w"] / out["states_per_s_1w"]
    out["target_speedup"] = 1.7
    out["meets_speedup_target"] = out["speedup_2w"] >= 1.7
    out["same_actions"] = [a.action for a in answers[1]] == [a.action for a in answers[2]]
    return out


def run(quick: bool = False) -> dict:
    from wam.runs.bench import machine_info

    torch.set_num_threads(1)  # one core per measurement, like one pool actor
    b, reps = (2, 1) if quick else (8, 5)
    cores = [_bench_core(c, b, reps) for c in (CORES[:2] if quick else CORES)]
    pool = _bench_pool(n_requests=8 if quick else 64, batch_size=4 if quick else 8)
    return {"benchmark": "planner", "quick": quick, "machine": machine_info(), "torch_threads": 1,
            "model": "debug (d=64, 2 layers, vocab 512, context 4 steps)", "cores": cores, "pool": pool}


def markdown(result: dict) -> str:
    lines = ["## Planner", "",
             f"`debug` model, {result['cores'][0]['envs']} environments planned together, 1 torch thread. "
             "Cost ratio = planning time / time of bare greedy decoding of the minimum K*H*37 tokens per "
             "decision (target <= 1.5).", "",
             "| core | greedy dec/s | K | H | planning dec/s | model calls/batch | tokens/decision (min) | cost ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cores"]:
        for s in c["settings"]:
            ok = "" if s["meets_cost_target"] else " (missed)"
            lines.append(f"| {c['core']} | {c['greedy_decisions_per_s']:.0f} | {s['K']} | {s['H']} | "
                         f"{s['planning_decisions_per_s']:.1f} | {s['model_calls_per_batch']} | "
                         f"{s['tokens_per_decision']:.0f} ({s['min_tokens_per_decision']}) | "
                         f"{s['cost_ratio_vs_min_tokens']:.2f}{ok} |")
    p = result["pool"]
    ok = "" if p["meets_speedup_target"] else " (missed)"
    lines += ["", f"Planner pool ({p['core']}, K={p['K']}, H={p['H']}, {p['requests']} states, chunks of "
              f"{p['batch_size']}): 1 worker {p['states_per_s_1w']:.1f} states/s, 2 workers "
              f"{p['states_per_s_2w']:.1f} states/s, speedup {p['speedup_2w']:.2f}x (target >= 1.7){ok}; "
              f"same actions: {p['same_actions']}.", "",
              f"Machine: {result['machine'].get('cpu_model')} ({result['machine'].get('cpus')} CPUs)."]
    return "\n".join(lines)
