"""`wam bench cores`: training time and memory of every sequence core, and their step cost as context grows.

Figures, each against the transformer measured in the same run (and Mamba-1 against `mambapy`, ATLAS
against `titans-pytorch`, when those install: `pip install -e .[bench]`):

1. **Forward + backward** of a `n_layers x d_model` core on a [B, T, D] float32 batch (loss = mean y²),
   T in {296, 1024, 4096} (B = 8, and B = 2 at T = 4096 to stay within a shared 23 GB machine; every
   core gets the same B at a given T; the reference packages at T = 296 only). Time: best of `reps` after one warm-up, wall clock and process
   CPU time (all threads), the latter being less disturbed when other processes compete for the cores.
   Memory: each (core, T) runs in a fresh subprocess; the figure is the growth of the peak resident
   set size (`ru_maxrss`) over the RSS just before the first forward+backward — what the activations,
   gradients and allocator really took from the OS (tracemalloc does not see torch's allocations).
   Everything runs on **one thread** (`threads`): on a shared machine a second OpenMP thread that is
   not scheduled stalls every op at the next barrier (measured: a 256x64 @ 64x256 matmul took 16 ms
   with 2 threads and 0.08 ms with 1 while other processes held a core), which swamps the figures.
2. **Step**: per-token latency of `core.step` (batch 1, no grad) after a prefill of c tokens, for
   c in {0, 256, 1024, 4096}, and the exact size of the state (sum of its tensors' bytes). The
   transformer is measured with full attention (its KV cache grows) and with a 296-token window.

Targets (issue 6): mamba2 <= 1.2x the transformer's time at T = 296 and faster at T = 4096; mamba >= 4x
faster than mambapy at equal size; atlas <= 3x the transformer at T = 1024; the step state of the
recurrent cores constant in c. A missed target is reported with its figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

FULL = {"d_model": 256, "n_layers": 4, "lengths": {296: 8, 1024: 8, 4096: 2}, "reps": 2, "threads": 1,
        "step_contexts": [0, 256, 1024, 4096], "step_tokens": 16, "window": 296, "reference_lengths": [296]}
QUICK = {"d_model": 64, "n_layers": 2, "lengths": {128: 2}, "reps": 3, "threads": 1,
         "step_contexts": [0, 32, 128], "step_tokens": 4, "window": 32, "reference_lengths": [128]}
TARGETS = {"mamba2_over_transformer_t296": 1.2, "mamba2_over_transformer_t4096": 1.0,
           "mambapy_over_mamba": 4.0, "atlas_over_transformer_t1024": 3.0, "recurrent_state_growth": 1.0,
           "mamba_memory": 4.0, "atlas_memory": 3.0}
"""Issue 19's targets; `*_memory`: peak memory growth of the first forward+backward x the transformer's, at
every measured length (a length killed for memory misses it)."""
CHILD_TIMEOUT_S = 900
LIMITS = {
    "atlas_over_transformer_t1024": "the paper's Newton-Schulz on every token's momentum (the default since "
    "2026-12-07) runs five 3-matrix products per token instead of per chunk; `atlas-chunk` is the fast form "
    "(docs/atlas.md).",
    "atlas_memory": "what grows with T is glibc's heap under the per-token NS5 transients, not stored tensors "
    "(autograd keeps 11 MiB at T = 256; MALLOC_MMAP_THRESHOLD_=65536 cuts the peak 3x but trains 3x slower; "
    "docs/atlas.md); use `newton_schulz=\"chunk\"` for long sequences on CPU. That form (`atlas-chunk`) still "
    "grows 5.3-5.5x the transformer's memory; its cause is not measured yet.",
    "mambapy_over_mamba": "the token-by-token selective scan (worldmodel/cores/mamba.py) steps through the "
    "sequence one token at a time; not profiled since its rewrite (docs/cores.md).",
    "mamba_memory": "the scan keeps its inputs and one state per chunk (`chunk_size`) for backward "
    "(docs/cores.md).",
}
"""What limits each target when it is missed (printed under the table only then)."""


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"atlas-chunk": ("atlas", {"newton_schulz": "chunk"})}
"""Measured beside the registered cores: name -> (core, options). `atlas` is the paper's per-token
Newton-Schulz (the default), `atlas-chunk` NS5 once per chunk (docs/atlas.md)."""


def core_kwargs(name: str, d_model: int, max_len: int) -> dict[str, Any]:
    """Benchmark settings per core: defaults, except the transformer's heads (64-dim) and cache limit."""
    if name in VARIANTS:
        return dict(VARIANTS[name][1])
    if name == "transformer":
        return {"n_heads": max(1, d_model // 64), "max_len": max(max_len, 1)}
    return {}


def core_name(name: str) -> str:
    """The registered core a benchmark name builds (`atlas-chunk` -> `atlas`)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(kind: str, name: str, d_model: int, n_layers: int, max_len: int):
    """The model to time, and a function mapping x [B, T, D] to y [B, T, D]."""
    import torch

    if kind == "core":
        from wam.worldmodel.cores import build_core

        core = build_core(core_name(name), d_model=d_model, n_layers=n_layers, **core_kwargs(name, d_model, max_len))
        return core, lambda x: core(x)[0]
    if kind == "mambapy":
        from mambapy.mamba import Mamba, MambaConfig  # pure PyTorch Mamba-1 with a parallel (Blelloch) scan

        model = Mamba(MambaConfig(d_model=d_model, n_layers=n_layers))
        return model, model
    if kind == "titans":
        from titans_pytorch import NeuralMemory  # Titans memory: deep MLP memory, momentum, chunked updates

        layers = torch.nn.ModuleList(NeuralMemory(dim=d_model, chunk_size=64) for _ in range(n_layers))

        def fn(x):
            for mem in layers:
                x = x + mem(x)[0]
            return x

        return layers, fn
    raise ValueError(f"unknown model kind {kind!r}")


def _train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and memory of forward+backward; runs in a fresh process (see the module docstring)."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model, fn = _build(spec["kind"], spec["name"], spec["d_model"], spec["n_layers"], spec["T"])
    x = torch.randn(spec["B"], spec["T"], spec["d_model"])

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        fn(x).pow(2).mean().backward()

    rss0 = _rss_bytes()
    fwd_bwd()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    walls, cpus = [], []
    for _ in range(spec["reps"]):
        w, c = time.perf_counter(), time.process_time()
        fwd_bwd()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": min(walls), "cpu_s": min(cpus), "walls": walls, "peak_mem_bytes": max(0, peak),
            "params": sum(p.numel() for p in model.parameters())}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "wam.runs.bench_cores", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    if proc.returncode == -9:  # SIGKILL with nothing said: the kernel's out-of-memory killer, as a rule
        return {"error": "killed (SIGKILL): out of memory"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_nbytes(state: Any) -> int:
    """Bytes of every tensor inside a state (dataclasses, tuples, lists, dicts)."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.nbytes
    if dataclasses.is_dataclass(state):
        return sum(state_nbytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (tuple, list)):
        return sum(state_nbytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_nbytes(s) for s in state.values())
    return 0


def _step_costs(name: str, kwargs: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-token step latency (batch 1, no grad) and state bytes after prefilling c tokens."""
    import torch

    from wam.worldmodel.cores import build_core

    torch.manual_seed(0)
    core = build_core(core_name(name), d_model=cfg["d_model"], n_layers=cfg["n_layers"], **kwargs).eval()
    rows = []
    with torch.no_grad():
        for c in cfg["step_contexts"]:
            state = core.init_state(1) if c == 0 else core(torch.randn(1, c, cfg["d_model"]))[1]
            xs = torch.randn(cfg["step_tokens"] + 3, 1, cfg["d_model"])
            for x_t in xs[:3]:  # warm-up
                _, state = core.step(x_t, state)
            times = []
            for x_t in xs[3:]:
                t0 = time.perf_counter()
                _, state = core.step(x_t, state)
                times.append(time.perf_counter() - t0)
            times.sort()
            rows.append({"context": c, "step_ms": 1000 * times[len(times) // 2], "state_bytes": state_nbytes(state)})
    return rows


def _load() -> float:
    return os.getloadavg()[0]


def run(quick: bool = False) -> dict[str, Any]:
    """Measure every registered core (and the reference packages that import); see the module docstring."""
    import importlib.util

    from wam.runs.bench import machine_info
    from wam.worldmodel.cores import available_cores

    cfg = QUICK if quick else FULL
    cores = [*available_cores(), *(v for v, (base, _) in VARIANTS.items() if base in available_cores())]
    refs = {kind: importlib.util.find_spec(mod) is not None
            for kind, mod in (("mambapy", "mambapy"), ("titans", "titans_pytorch"))}
    load_before = _load()
    max_t = max(cfg["lengths"])
    train: dict[str, dict[str, Any]] = {}
    oom_tokens: dict[str, int] = {}  # name -> fewest tokens per batch (T x B) at which its child ran out of memory
    for t, b in cfg["lengths"].items():
        base = {"d_model": cfg["d_model"], "n_layers": cfg["n_layers"], "T": t, "B": b, "reps": cfg["reps"],
                "threads": cfg["threads"]}
        specs = [{"kind": "core", "name": n} for n in cores]
        specs += [{"kind": k, "name": k} for k in ("mambapy", "titans") if refs[k] and t in cfg["reference_lengths"]]
        for s in specs:
            if t * b >= oom_tokens.get(s["name"], t * b + 1):  # it would only run out of memory again
                r = {"error": f"skipped: ran out of memory at {oom_tokens[s['name']]} tokens per batch, fewer "
                              f"than the {t * b} here"}
            else:
                r = _run_child({**base, **s})
                if r.get("error", "").endswith("out of memory"):
                    oom_tokens[s["name"]] = min(oom_tokens.get(s["name"], t * b), t * b)
            r.update(T=t, B=b)
            train.setdefault(s["name"], {})[str(t)] = r
    for per_t in train.values():  # ratios vs the transformer at the same T
        for t, r in per_t.items():
            ref = train.get("transformer", {}).get(t, {})
            if "wall_s" in r and "wall_s" in ref:
                r["time_vs_transformer"] = r["wall_s"] / ref["wall_s"]
                r["cpu_time_vs_transformer"] = r["cpu_s"] / ref["cpu_s"]
                r["mem_vs_transformer"] = r["peak_mem_bytes"] / max(1, ref["peak_mem_bytes"])

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    step: dict[str, list[dict[str, Any]]] = {}
    for name in cores:
        step[name] = _step_costs(name, core_kwargs(name, cfg["d_model"], max(cfg["step_contexts"]) + 64), cfg)
    step[f"transformer-window{cfg['window']}"] = _step_costs(
        "transformer", {**core_kwargs("transformer", cfg["d_model"], 0), "window": cfg["window"]}, cfg)
    torch.set_num_threads(threads)

    result = {"config": {k: (v if k != "lengths" else {str(t): b for t, b in v.items()}) for k, v in cfg.items()},
              "quick": quick, "train": train, "step": step, "references_installed": refs,
              "machine": machine_info(), "load_average_1min": {"before": load_before, "after": _load()}}
    result["targets"], result["targets_met"] = _targets(result, max_t)
    return result


def _ratio(train: dict, a: str, b: str, t: int, key: str = "wall_s") -> float | None:
    ra, rb = train.get(a, {}).get(str(t), {}), train.get(b, {}).get(str(t), {})
    return ra[key] / rb[key] if key in ra and key in rb else None


def _targets(result: dict[str, Any], max_t: int) -> tuple[dict[str, Any], dict[str, bool | None]]:
    """The issue's targets: figures and met (True/False) or None when not measured in this run."""
    train, step = result["train"], result["step"]
    ref_t = max(result["config"]["reference_lengths"])
    figures = {
        "mamba2_over_transformer_t296": _ratio(train, "mamba2", "transformer", 296),
        "mamba2_over_transformer_t4096": _ratio(train, "mamba2", "transformer", 4096),
        f"mambapy_over_mamba_t{ref_t}": _ratio(train, "mambapy", "mamba", ref_t),
        "atlas_over_transformer_t1024": _ratio(train, "atlas", "transformer", 1024),
        "atlas_chunk_over_transformer_t1024": _ratio(train, "atlas-chunk", "transformer", 1024),
    }
    for name in ("mamba", "atlas"):
        figures[f"{name}_memory"] = _memory_ratios(train, name)
    growth = {}
    for name in ("mamba", "mamba2", "atlas"):
        if name in step:
            sizes = [r["state_bytes"] for r in step[name]]
            growth[name] = max(sizes) / min(sizes)
    figures["recurrent_state_growth"] = growth
    window = result["config"]["window"]  # the windowed cache fills up to window-1 tokens, then stays put
    full = [r["state_bytes"] for r in step.get(f"transformer-window{window}", []) if r["context"] >= window]
    figures["windowed_transformer_state_growth_after_window"] = max(full) / min(full) if full else None
    met = {
        "mamba2_over_transformer_t296": _le(figures["mamba2_over_transformer_t296"], TARGETS["mamba2_over_transformer_t296"]),
        "mamba2_over_transformer_t4096": _le(figures["mamba2_over_transformer_t4096"], 1.0, strict=True),
        "mambapy_over_mamba": (None if figures[f"mambapy_over_mamba_t{ref_t}"] is None
                               else figures[f"mambapy_over_mamba_t{ref_t}"] >= TARGETS["mambapy_over_mamba"]),
        "atlas_over_transformer_t1024": (False if "1024" in figures["atlas_memory"]["out_of_memory"] else  # no time
                                         _le(figures["atlas_over_transformer_t1024"], TARGETS["atlas_over_transformer_t1024"])),
        "recurrent_state_growth": all(g == 1.0 for g in growth.values()) if growth else None,
        **{f"{n}_memory": _memory_met(figures[f"{n}_memory"], TARGETS[f"{n}_memory"]) for n in ("mamba", "atlas")},
    }
    return figures, met


def _memory_ratios(train: dict, name: str) -> dict[str, Any]:
    """Peak memory growth of core `name` x the transformer's at each length both ran, and the lengths at which
    `name` ran out of memory (killed, or skipped after being killed at fewer tokens)."""
    ratios = {t: r["mem_vs_transformer"] for t, r in train.get(name, {}).items() if "mem_vs_transformer" in r}
    oom = [t for t, r in train.get(name, {}).items() if "out of memory" in r.get("error", "")]
    return {"ratios": ratios, "out_of_memory": oom}


def _memory_met(fig: dict[str, Any], bound: float) -> bool | None:
    if fig["out_of_memory"]:
        return False
    return max(fig["ratios"].values()) <= bound if fig["ratios"] else None


def _le(x: float | None, bound: float, strict: bool = False) -> bool | None:
    if x is None:
        return None
    return x < bound if strict else x <= bound


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _mem_text(fig: dict[str, Any] | None) -> str:
    if fig is None:  # figures of a run before the memory targets
        return "—"
    parts = [f"T={t}: {x:.2f}x" for t, x in fig["ratios"].items()]
    parts += [f"T={t}: out of memory" for t in fig["out_of_memory"]]
    return ", ".join(parts) or "—"


def markdown(result: dict[str, Any]) -> str:
    """The cores benchmark as markdown tables."""
    cfg, train, step = result["config"], result["train"], result["step"]
    lengths = list(cfg["lengths"])
    head = "| model | " + " | ".join(f"T={t} (B={cfg['lengths'][t]})" for t in lengths) + " |"
    lines = [f"Forward + backward, {cfg['n_layers']} layers, d={cfg['d_model']}, float32, {cfg.get('threads', '?')} "
             "thread(s): wall seconds "
             "(x transformer, same run), CPU seconds x transformer, peak memory growth (x transformer).", "",
             head, "|---|" + "---|" * len(lengths)]
    for name, per_t in train.items():
        cells = []
        for t in lengths:
            r = per_t.get(t)
            if r is None:
                cells.append("—")
            elif "error" in r:
                cells.append(f"error: {r['error'][:60]}")
            else:
                rel = (f" ({r['time_vs_transformer']:.2f}x; cpu {r['cpu_time_vs_transformer']:.2f}x)"
                       if "time_vs_transformer" in r else "")
                mem = f", {_mib(r['peak_mem_bytes'])}" + (f" ({r['mem_vs_transformer']:.2f}x)" if "mem_vs_transformer" in r else "")
                cells.append(f"{r['wall_s']:.3f} s{rel}{mem}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    contexts = cfg["step_contexts"]
    lines += ["", "Step (one token, batch 1, no grad): median ms per token / state size, after a prefill of c tokens.", "",
              "| core | " + " | ".join(f"c={c}" for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for name, rows in step.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['step_ms']:.2f} ms / {r['state_bytes'] / 1024:,.0f} KiB"
                                                for r in rows) + " |")
    t, met = result["targets"], result["targets_met"]

    def mark(key: str) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[met.get(key)]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}x"

    ref_key = next(k for k in t if k.startswith("mambapy_over_mamba"))
    atlas_oom = (t.get("atlas_memory") or {}).get("out_of_memory", [])  # runs before the memory targets: none
    atlas_t1024 = "out of memory" if "1024" in atlas_oom else fmt(t["atlas_over_transformer_t1024"])
    lines += ["", "| target | figure | status |", "|---|---|---|",
              f"| mamba2 <= 1.2x transformer time at T=296 | {fmt(t['mamba2_over_transformer_t296'])} "
              f"| {mark('mamba2_over_transformer_t296')} |",
              f"| mamba2 faster than transformer at T=4096 | {fmt(t['mamba2_over_transformer_t4096'])} "
              f"| {mark('mamba2_over_transformer_t4096')} |",
              f"| mamba >= 4x faster than mambapy ({ref_key.rsplit('_', 1)[-1]}) | {fmt(t[ref_key])} "
              f"| {mark('mambapy_over_mamba')} |",
              f"| atlas <= 3x transformer time at T=1024 | {atlas_t1024} | {mark('atlas_over_transformer_t1024')} |",
              f"| mamba peak memory <= 4x transformer, every length | {_mem_text(t.get('mamba_memory'))} "
              f"| {mark('mamba_memory')} |",
              f"| atlas peak memory <= 3x transformer, every length | {_mem_text(t.get('atlas_memory'))} "
              f"| {mark('atlas_memory')} |",
              f"| (no target) atlas-chunk (NS5 once per chunk) time at T=1024 | "
              f"{fmt(t.get('atlas_chunk_over_transformer_t1024'))} | |",
              "| recurrent step state constant in context (max/min bytes) | "
              + ", ".join(f"{k} {v:.2f}x" for k, v in t["recurrent_state_growth"].items())
              + f" | {mark('recurrent_state_growth')} |"]
    win = t.get("windowed_transformer_state_growth_after_window")
    if win is not None:
        lines.append(f"| (no target) windowed transformer cache constant once c >= window | {win:.2f}x | |")
    missed = [f"- **{key} missed:** {why}" for key, why in LIMITS.items() if met.get(key) is False]
    lines += ["", "What limits each miss:", "", *missed] if missed else []
    refs = result["references_installed"]
    missing = [k for k, ok in refs.items() if not ok]
    load = result["load_average_1min"]
    lines += ["", f"Reference packages not installed (figures absent): {', '.join(missing)}." if missing else "",
              f"Time: best of {cfg['reps']} after a warm-up; memory: peak RSS growth of a fresh process during the "
              f"first forward+backward. 1-min load average {load['before']:.1f} before, {load['after']:.1f} after, on "
              f"{result['machine'].get('cpus')} CPUs (a load above the CPU count means contended, noisy timings)."
              + (" Quick run: tiny sizes, figures only show the benchmark works." if result["quick"] else "")]
    return "\n".join(ln for ln in lines if ln is not None)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_train_child(json.loads(sys.argv[2]))))
    else:
        print(markdown(run(quick="--quick" in sys.argv)))


def plot(result: dict, path) -> None:
    """Time per token (forward + backward) vs sequence length, and step latency vs context, per core."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for core, rows in sorted(result.get("train", {}).items()):
        pts = sorted((int(t), r["wall_s"] / (r["B"] * r["T"]) * 1e6) for t, r in rows.items()
                     if "wall_s" in r)  # lengths that failed (out of memory, timed out) have no point
        if len(pts) > 1:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=core)
    ax1.set(xscale="log", xlabel="sequence length T", ylabel="µs per token (fwd+bwd)",
            title="training time vs T")
    ts = sorted({int(t) for rows in result.get("train", {}).values() for t in rows})
    ax1.set_xticks(ts, [str(t) for t in ts])
    ax1.minorticks_off()
    for core, rows in sorted(result.get("step", {}).items()):
        ax2.plot([max(r["context"], 1) for r in rows], [r["step_ms"] for r in rows], marker="o", label=core)
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="ms per step", title="step latency vs context")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a quick run may have no curve with two points
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
