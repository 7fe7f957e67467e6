"""`wam bench data`: collection throughput, sampler throughput and storage size of the data layer.

Three figures, each against a reference measured in the same run:

1. **Collection** agent-steps/s of `wam.datasets.collect.collect` (random policy, Ray actors) with 1 and
   2 workers; figure: the 2-worker / 1-worker ratio (target >= 1.7 on 2 cores). Each worker count is
   timed end to end (Ray actor start-up included; Ray itself is started once beforehand) and, from two
   budgets, at its marginal steady-state rate (Δsteps / Δseconds), which excludes the start-up.
2. **Sampler** frames/s of `SegmentSampler` reading observations from HDF5 (`in_memory=False`), in the
   calling thread (`prefetch=0`, one core); reference: the same sampler gathering from RAM
   (`in_memory=True`), the ceiling of the gather itself (target >= 50k frames/s from HDF5). A "frame"
   is one 84x84 observation delivered in a batch: B x (H+1) per batch. The headline divides by the
   sampling thread's CPU time (`time.thread_time`), i.e. frames per second of one core, which stays
   meaningful when other processes compete for the cores; the wall-clock rate is reported beside it.
   The file sits in the OS page cache (a dataset larger than RAM would add disk reads).
3. **Storage**: bytes per stored frame on disk (whole dataset directory: frames, per-step arrays,
   metadata) vs 84 x 84 = 7,056 raw uint8 bytes (target <= 1/15, i.e. a ratio >= 15).

The machine may be shared: the JSON keeps every repeat and the load average before and after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

GAME = "Breakout"
"""Collected with the random policy: short episodes, several per worker, real frames."""
RAW_FRAME_BYTES = 84 * 84
TARGETS = {"collect_ratio": 1.7, "sampler_hdf5_frames_per_s": 50_000.0, "compression_ratio": 15.0}


def _collect_rate(root: Path, workers: int, budgets: tuple[int, int], seed: int) -> dict:
    """End-to-end and marginal agent-steps/s of collect() with `workers` workers."""
    from wam.datasets.collect import collect

    runs = []
    for i, steps in enumerate(budgets):
        out = root / f"collect-w{workers}-{i}"
        summary = collect([GAME], policy="random", steps=steps, workers=workers, seed=seed, out=out, progress=False)
        runs.append({"steps": int(summary.steps), "episodes": int(summary.episodes), "seconds": float(summary.seconds)})
    (s0, t0), (s1, t1) = ((r["steps"], r["seconds"]) for r in runs)
    return {"runs": runs, "steps_per_s": s1 / t1, "marginal_steps_per_s": (s1 - s0) / max(t1 - t0, 1e-9)}


def _sampler_rate(dataset: Path, in_memory: bool, batches: int, repeats: int, batch_size: int, horizon: int) -> dict:
    """Frames (B x (H+1) per batch) per CPU-second and per wall-clock second of the sampler in the
    calling thread; best of the repeats and all of them."""
    from wam.datasets.sampler import SegmentSampler

    cpu, wall = [], []
    frames = batches * batch_size * (horizon + 1)
    with SegmentSampler([dataset], horizon=horizon, batch_size=batch_size, source="frames", seed=0,
                        in_memory=in_memory, prefetch=0) as sampler:
        for _ in range(batches // 10):  # warm-up: open the episodes' datasets, page cache
            sampler.sample()
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(batches):
                sampler.sample()
            cpu.append(frames / (time.thread_time() - c0))
            wall.append(frames / (time.perf_counter() - t0))
    return {"frames_per_cpu_s": max(cpu), "frames_per_wall_s": max(wall), "cpu_repeats": cpu, "wall_repeats": wall}


def _storage(dataset: Path) -> dict:
    from wam.datasets.store import TrajectoryStore

    store = TrajectoryStore.open(dataset)
    frames = int(store.num_steps) + int(store.num_episodes)  # T+1 frames per episode
    close = getattr(store, "close", None)
    if close is not None:
        close()
    disk = sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
    per_frame = disk / frames
    return {"frames": frames, "bytes_on_disk": disk, "bytes_per_frame": per_frame,
            "raw_bytes_per_frame": RAW_FRAME_BYTES, "compression_ratio": RAW_FRAME_BYTES / per_frame}


def run(quick: bool = False) -> dict:
    """Measure the three figures; `quick` takes well under a minute (noisier figures)."""
    from wam.datasets.distributed import ray_session
    from wam.datasets.store import find_datasets
    from wam.runs.bench import machine_info

    budgets = (1_000, 3_000) if quick else (10_000, 40_000)
    batches, repeats = (60, 2) if quick else (400, 3)
    batch_size, horizon = 32, 8
    root = Path(tempfile.mkdtemp(prefix="wam-bench-data-"))
    load_before = os.getloadavg()
    try:
        with ray_session(num_cpus=2):
            collect_1 = _collect_rate(root, 1, budgets, seed=0)
            collect_2 = _collect_rate(root, 2, budgets, seed=0)
        dataset = find_datasets([root / "collect-w2-1"])[0]
        hdf5 = _sampler_rate(dataset, False, batches, repeats, batch_size, horizon)
        ram = _sampler_rate(dataset, True, batches * 5, repeats, batch_size, horizon)
        storage = _storage(dataset)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "game": GAME, "quick": quick, "targets": TARGETS,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "collect": {
            "workers_1": collect_1, "workers_2": collect_2,
            "ratio_2_over_1": collect_2["steps_per_s"] / collect_1["steps_per_s"],
            "marginal_ratio_2_over_1": collect_2["marginal_steps_per_s"] / collect_1["marginal_steps_per_s"],
        },
        "sampler": {
            "batch_size": batch_size, "horizon": horizon, "frames_per_batch": batch_size * (horizon + 1),
            "dataset_frames": storage["frames"], "hdf5": hdf5, "ram": ram,
            "hdf5_frames_per_s": hdf5["frames_per_cpu_s"], "ram_frames_per_s": ram["frames_per_cpu_s"],
            "hdf5_frames_per_wall_s": hdf5["frames_per_wall_s"], "ram_frames_per_wall_s": ram["frames_per_wall_s"],
            "hdf5_over_ram": hdf5["frames_per_cpu_s"] / ram["frames_per_cpu_s"],
            "hdf5_over_target": hdf5["frames_per_cpu_s"] / TARGETS["sampler_hdf5_frames_per_s"],
        },
        "storage": storage,
        "machine": machine_info(),
    }
    result["targets_met"] = {
        "collect_ratio": result["collect"]["ratio_2_over_1"] >= TARGETS["collect_ratio"],
        "sampler_hdf5_frames_per_s": hdf5["frames_per_cpu_s"] >= TARGETS["sampler_hdf5_frames_per_s"],
        "compression_ratio": storage["compression_ratio"] >= TARGETS["compression_ratio"],
    }
    return result


def markdown(result: dict) -> str:
    """The data benchmark as a markdown table."""
    c, s, st, ok = result["collect"], result["sampler"], result["storage"], result["targets_met"]

    def mark(key: str) -> str:
        return "met" if ok[key] else "**missed**"

    rows = [
        "| figure | value | reference (same run) | ratio | target |",
        "|---|---|---|---|---|",
        f"| collection, 2 Ray workers ({result['game']}, random) | {c['workers_2']['steps_per_s']:,.0f} steps/s "
        f"| 1 worker: {c['workers_1']['steps_per_s']:,.0f} steps/s | {c['ratio_2_over_1']:.2f}x "
        f"| >= {result['targets']['collect_ratio']}x ({mark('collect_ratio')}) |",
        f"| collection, marginal rate (start-up excluded) | {c['workers_2']['marginal_steps_per_s']:,.0f} steps/s "
        f"| 1 worker: {c['workers_1']['marginal_steps_per_s']:,.0f} steps/s | {c['marginal_ratio_2_over_1']:.2f}x | |",
        f"| sampler from HDF5, 1 core (B={s['batch_size']}, H={s['horizon']}) | {s['hdf5_frames_per_s']:,.0f} frames/s "
        f"| from RAM: {s['ram_frames_per_s']:,.0f} frames/s | {s['hdf5_over_ram']:.3f} of RAM, "
        f"{s['hdf5_over_target']:.2f}x target | >= {result['targets']['sampler_hdf5_frames_per_s']:,.0f} frames/s "
        f"({mark('sampler_hdf5_frames_per_s')}) |",
        f"| sampler, wall clock | {s['hdf5_frames_per_wall_s']:,.0f} frames/s | from RAM: "
        f"{s['ram_frames_per_wall_s']:,.0f} frames/s | | |",
        f"| storage ({st['frames']:,} frames) | {st['bytes_per_frame']:,.0f} bytes/frame "
        f"| raw 84x84 uint8: {st['raw_bytes_per_frame']:,} bytes | 1/{st['compression_ratio']:.1f} "
        f"| <= 1/{result['targets']['compression_ratio']:.0f} ({mark('compression_ratio')}) |",
    ]
    load = result.get("load_average_1min", {})
    notes = ["", "A sampler frame is one observation delivered in a batch (B x (H+1) per batch); the 1-core "
             "sampler figures are frames per CPU-second of the sampling thread. Collection rates include Ray "
             "actor start-up, the marginal rate does not. 1-min load average "
             f"{load.get('before', float('nan')):.1f} before, {load.get('after', float('nan')):.1f} after, on "
             f"{result.get('machine', {}).get('cpus')} CPUs (a load above the CPU count means contended timings)."
             + (" Quick run: figures are noisy." if result.get("quick") else "")]
    return "\n".join(rows + notes) + "\n"
