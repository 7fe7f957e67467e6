"""`wam bench recall`: long-memory recall of every sequence core, measured (issue 19 §2).

Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): a sequence starts with P key-value
pairs (`k1 v1 k2 v2 ...`, keys distinct, from the lower half of the vocabulary, values from the upper
half); later, each key appears once more as a query at a random position and the model must predict, at
the query, the value stored with it. Every other position holds token 0 and is not scored. Accuracy is
the share of queries answered exactly, on fresh held-out sequences. It is the task on which attention is
perfect and fixed-size recurrent states must show what they hold.

Each core is built by `build_core` (embedding -> core -> linear read-out over the vocabulary), trained
with AdamW and a one-cycle schedule (10 % linear warm-up, cosine to 0) for a fixed number of steps or a
wall-clock budget, whichever comes first, one torch thread, the same data stream for every core. Two
settings: short (T = 64, 8 pairs, the issue's) and long (T = 512, 32 pairs), where a transformer whose
attention window (64) is shorter than the sequence is the reference a recurrent memory must match.

Targets (short): transformer >= 95 %, atlas >= 90 %, mamba2 >= 90 %, mamba >= 50 %; each core's time per
step <= 2x the transformer's. Long: atlas and mamba2 at least as accurate as the windowed transformer.
"""

from __future__ import annotations

import os
import time
from typing import Any

FULL: dict[str, Any] = {
    "d_model": 64, "n_layers": 2, "batch": 64, "lr": 3e-3, "weight_decay": 0.1, "vocab": 256, "threads": 1,
    "eval_sequences": 512, "settings": [
        {"name": "short", "T": 64, "pairs": 8, "steps": 2000, "budget_s": 300.0, "window": None},
        {"name": "long", "T": 512, "pairs": 32, "steps": 1000, "budget_s": 300.0, "window": 64},
    ]}
QUICK: dict[str, Any] = {
    "d_model": 32, "n_layers": 1, "batch": 32, "lr": 3e-3, "weight_decay": 0.1, "vocab": 64, "threads": 1,
    "eval_sequences": 128, "settings": [
        {"name": "short", "T": 16, "pairs": 2, "steps": 30, "budget_s": 20.0, "window": None},
    ]}
CORES: dict[str, tuple[str, dict[str, Any]]] = {
    "transformer": ("transformer", {}), "mamba": ("mamba", {}), "mamba2": ("mamba2", {}),
    "atlas": ("atlas", {}), "atlas-chunk": ("atlas", {"newton_schulz": "chunk"}),
}
"""name -> (registered core, options). `atlas` is the paper's per-token Newton-Schulz (the default)."""
TARGETS = {"transformer": 0.95, "atlas": 0.90, "mamba2": 0.90, "mamba": 0.50, "time_vs_transformer": 2.0}


def mqar_batch(gen: Any, batch: int, length: int, pairs: int, vocab: int) -> tuple[Any, Any]:
    """One MQAR batch: tokens [B, T] (int64) and targets [B, T] (-100 where not scored).

    Keys are distinct in a row, drawn from 1 .. vocab/2 - 1; values from vocab/2 .. vocab - 1. The pairs
    fill positions 0 .. 2P-1; each key is queried once, at a distinct even position after them, and its
    value follows the query (so the target at a query is the next input token, as in language modelling).
    """
    import torch

    half = vocab // 2
    if pairs > half - 1:
        raise ValueError(f"{pairs} pairs need distinct keys: vocab {vocab} gives {half - 1}")
    slots = (length - 2 * pairs) // 2
    if slots < pairs:
        raise ValueError(f"T={length} holds {slots} query slots after {pairs} pairs; need T >= {4 * pairs}")
    keys = torch.argsort(torch.rand(batch, half - 1, generator=gen), dim=1)[:, :pairs] + 1
    values = torch.randint(half, vocab, (batch, pairs), generator=gen)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    targets = torch.full((batch, length), -100, dtype=torch.long)
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    pos = 2 * pairs + 2 * torch.argsort(torch.rand(batch, slots, generator=gen), dim=1)[:, :pairs]
    order = torch.argsort(torch.rand(batch, pairs, generator=gen), dim=1)
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)
    tokens.scatter_(1, pos, q_keys)
    tokens.scatter_(1, pos + 1, q_values)
    targets.scatter_(1, pos, q_values)
    return tokens, targets


def build_model(core_name: str, options: dict[str, Any], d_model: int, n_layers: int, vocab: int,
                max_len: int) -> Any:
    """Embedding -> core -> linear read-out; returns a module mapping tokens [B, T] to logits [B, T, V]."""
    from torch import nn

    from wam.worldmodel.cores import build_core

    kw = dict(options)
    if core_name == "transformer":
        kw.setdefault("max_len", max_len)

    class Recall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.core = build_core(core_name, d_model=d_model, n_layers=n_layers, **kw)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, tokens):
            return self.head(self.core(self.embed(tokens))[0])

    return Recall()


def accuracy(model: Any, tokens: Any, targets: Any, batch: int = 64) -> float:
    """Share of scored positions whose arg-max prediction is the target."""
    import torch

    hit = total = 0
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch):
            logits = model(tokens[i:i + batch])
            mask = targets[i:i + batch] != -100
            hit += int((logits.argmax(-1)[mask] == targets[i:i + batch][mask]).sum())
            total += int(mask.sum())
    return hit / max(1, total)


def train_recall(name: str, setting: dict[str, Any], cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Train one core on one setting; accuracy, steps run, time per step."""
    import torch

    from wam.worldmodel.trainer import TrainerConfig, lr_factor

    core_name, options = CORES.get(name, (name, {}))
    options = dict(options)
    if setting.get("window") and name == "transformer-window":
        core_name, options = "transformer", {"window": setting["window"]}
    torch.manual_seed(seed)
    model = build_model(core_name, options, cfg["d_model"], cfg["n_layers"], cfg["vocab"], setting["T"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = setting["steps"]
    schedule = TrainerConfig(lr=cfg["lr"], min_lr=0.0, warmup_steps=max(1, steps // 10), steps=steps,
                             schedule="cosine")  # one-cycle: 10 % linear warm-up, cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule))
    gen = torch.Generator().manual_seed(seed + 1)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    eval_x, eval_y = mqar_batch(eval_gen, cfg["eval_sequences"], setting["T"], setting["pairs"], cfg["vocab"])
    start = time.perf_counter()
    times: list[float] = []
    loss_first, loss, done = None, float("nan"), 0
    for done in range(1, steps + 1):  # noqa: B007 (read after the loop: the steps run)
        x, y = mqar_batch(gen, cfg["batch"], setting["T"], setting["pairs"], cfg["vocab"])
        t0 = time.perf_counter()
        logits = model(x)
        loss_t = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        loss = float(loss_t.detach())
        loss_first = loss if loss_first is None else loss_first
        if time.perf_counter() - start > setting["budget_s"]:
            break
    model.eval()
    per_step = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    return {"accuracy": accuracy(model, eval_x, eval_y), "steps": done, "planned_steps": steps,
            "step_ms": 1000 * per_step, "train_s": time.perf_counter() - start, "loss_first": loss_first,
            "loss_last": loss, "params": sum(p.numel() for p in model.parameters())}


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from wam.runs.bench import machine_info
    from wam.worldmodel.cores import available_cores

    cfg = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    load_before = os.getloadavg()[0]
    names = [n for n, (core, _) in CORES.items() if core in available_cores()]
    results: dict[str, dict[str, Any]] = {}
    try:
        for setting in cfg["settings"]:
            row = {}
            for name in names + (["transformer-window"] if setting.get("window") else []):
                row[name] = train_recall(name, setting, cfg)
            ref = row.get("transformer", {}).get("step_ms")
            for r in row.values():
                r["time_vs_transformer"] = r["step_ms"] / ref if ref else None
            results[setting["name"]] = row
    finally:
        torch.set_num_threads(threads)
    result = {"config": cfg, "quick": quick, "results": results, "machine": machine_info(),
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    result["targets_met"] = targets_met(result)
    return result


def targets_met(result: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's targets (None where not measured in this run)."""
    short, long = result["results"].get("short", {}), result["results"].get("long", {})
    met: dict[str, bool | None] = {}
    for name in ("transformer", "atlas", "mamba2", "mamba"):
        met[f"short_{name}_accuracy"] = short[name]["accuracy"] >= TARGETS[name] if name in short else None
    for name, r in short.items():
        if name != "transformer" and r.get("time_vs_transformer") is not None:
            met[f"short_{name}_time"] = r["time_vs_transformer"] <= TARGETS["time_vs_transformer"]
    ref = long.get("transformer-window", {}).get("accuracy")
    for name in ("atlas", "mamba2"):
        met[f"long_{name}_vs_windowed"] = (long[name]["accuracy"] >= ref) if name in long and ref is not None else None
    return met


def _figure_and_limit(result: dict[str, Any], key: str) -> tuple[str, str]:
    """A target's figure and, measured in the same run, what bounded the core: its time budget (steps run of
    those planned, ms a step) or, when it ran every step, its loss at the end."""
    setting, name, kind = key.split("_", 2) if key.count("_") >= 2 else (key, "", "")
    rows = result["results"].get(setting, {})
    r = rows.get(name)
    if r is None:
        return "—", ""
    limit = (f"its {r['steps']} of {r['planned_steps']} steps filled the time budget ({r['step_ms']:.0f} ms a step)"
             if r["steps"] < r["planned_steps"] else
             f"trained all {r['planned_steps']} steps; loss {r['loss_first']:.2f} → {r['loss_last']:.2f}")
    if kind == "accuracy":
        return f"{100 * r['accuracy']:.1f} % (≥ {100 * TARGETS[name]:.0f} %)", limit
    if kind == "time":
        return (f"{r['time_vs_transformer']:.2f}x (≤ {TARGETS['time_vs_transformer']:.0f}x)",
                f"{r['step_ms']:.0f} ms a step against the transformer's {rows['transformer']['step_ms']:.0f}")
    ref = rows.get("transformer-window", {})
    return (f"{100 * r['accuracy']:.1f} % vs {100 * ref.get('accuracy', float('nan')):.1f} % (window)",
            limit)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [f"Multi-query associative recall (MQAR), d_model {cfg['d_model']}, {cfg['n_layers']} layers, batch "
             f"{cfg['batch']}, lr {cfg['lr']} one-cycle, vocabulary {cfg['vocab']}, {cfg['threads']} thread(s); "
             f"accuracy on {cfg['eval_sequences']} held-out sequences. Each core trains for its planned steps or "
             "its time budget, whichever comes first (steps run shown).", ""]
    for setting in cfg["settings"]:
        row = result["results"].get(setting["name"], {})
        lines += [f"**{setting['name']}**: T = {setting['T']}, {setting['pairs']} pairs, {setting['steps']} steps "
                  f"or {setting['budget_s']:.0f} s" + (f"; `transformer-window` attends to the last "
                                                       f"{setting['window']} tokens" if setting.get("window") else ""),
                  "", "| core | accuracy | steps run | ms / step | x transformer | loss first → last |",
                  "|---|---|---|---|---|---|"]
        for name, r in row.items():
            rel = f"{r['time_vs_transformer']:.2f}x" if r.get("time_vs_transformer") else "—"
            lines.append(f"| {name} | {100 * r['accuracy']:.1f} % | {r['steps']} / {r['planned_steps']} | "
                         f"{r['step_ms']:.0f} | {rel} | {r['loss_first']:.2f} → {r['loss_last']:.2f} |")
        lines.append("")
    met = result["targets_met"]
    label = {True: "met", False: "**missed**", None: "not measured"}
    lines += ["| target | figure | status | what limits a miss |", "|---|---|---|---|"]
    lines += [f"| {k} | {figure} | {label[v]} | {why if v is False else ''} |"
              for k, v in met.items() for figure, why in [_figure_and_limit(result, k)]]
    load = result["load_average_1min"]
    lines += ["", f"1-min load average {load['before']:.1f} before, {load['after']:.1f} after, on "
              f"{result['machine'].get('cpus')} CPUs." + (" Quick run: tiny sizes, figures only show the benchmark "
                                                          "works." if result["quick"] else "")]
    return "\n".join(lines)
