"""The outputs of `wam tokenizer probe`: the report dataclass, its markdown table and its bar plot."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wam.datasets.files import atomic_write_bytes
from wam.worldmodel.probe_fit import PROBES


@dataclass
class ProbeReport:
    """What `probe_tokenizer` wrote and found."""

    out: Path
    result: dict = field(repr=False)
    """The contents of probe.json."""
    seconds: float

    def summary_line(self) -> str:
        parts = []
        for g in self.result["games"]:
            for v in g["variables"]:
                r = v["r2"]
                tok = _best(r["token_ridge"], r["token_mlp"])
                pix = _best(r["pixel_ridge"], r["pixel_mlp"])
                parts.append(f"{g['game']} {v['name']} {_fmt(tok)}" + (f"/{_fmt(pix)}" if pix is not None else ""))
        what = "tokens/pixels" if self.result["config"]["pixels"] else "tokens"
        return (f"probe of tokenizer {self.result['tokenizer']['id']}: held-out R² ({what}, best of ridge and MLP) "
                f"{'; '.join(parts)}; {self.seconds:.0f} s; wrote {self.out}/probe.md")


def _best(a: float | None, b: float | None) -> float | None:
    vals = [x for x in (a, b) if x is not None]
    return max(vals) if vals else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_markdown(path: Path, result: dict) -> None:
    tok = result["tokenizer"]
    cfg = result["config"]
    lines = [
        "# State probe of a frozen tokenizer", "",
        f"Tokenizer `{tok['id']}` (`{tok['checkpoint']}`, step {tok['step']}, codebook {tok['codebook_size']} × "
        f"{tok['codebook_dim']}). Held-out R² of object coordinates read from RAM (AtariARI addresses), regressed "
        f"from the frame's {tok.get('tokens_per_frame', 36)} code vectors (tokens), from the raw 84×84 pixels, and by the training mean "
        f"(constant). Ratio = best token R² / best pixel R² (blank when the pixel R² is not positive).", "",
        "| game | variable | token ridge R² | token MLP R² | pixel ridge R² | pixel MLP R² | constant R² | "
        "ratio token-best/pixel-best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for g in result["games"]:
        for v in g["variables"]:
            r = v["r2"]
            ratio = "" if v["ratio"] is None else f"{v['ratio']:.2f}"
            lines.append(f"| {g['game']} | {v['name']} (RAM[{v['address']}]) | "
                         + " | ".join(_fmt(r[p]) for p in PROBES) + f" | {ratio} |")
            if v["mask"]:
                m = v["masked_frames"]
                notes.append(f"- {g['game']} {v['name']}: {v['mask']} — {m['fit']} fitting, {m['val']} validation "
                             f"and {m['heldout']} held-out frames left out.")
            if v["note"]:
                notes.append(f"- {g['game']} {v['name']}: {v['note']}.")
    lines += ["", "## Data", ""]
    for g in result["games"]:
        f, e = g["frames"], g["episodes"]
        lines.append(f"- {g['game']}: {len(g['datasets'])} dataset(s); {e['train']} training episodes ({e['val']} of "
                     f"them for validation), {e['heldout']} held out; {f['fit']} fitting + {f['val']} validation frames "
                     f"(of {f['training_total']} training frames), {f['heldout']} held-out frames (of "
                     f"{f['heldout_total']}); tokens {g['tokens_from']}; features: "
                     + ", ".join(f"{k} {n}" for k, n in g["features"].items())
                     + "; seconds: " + ", ".join(f"{k} {s:.1f}" for k, s in g["seconds"].items()) + ".")
    if notes:
        lines += ["", "## Masked frames and notes", "", *notes]
    lines += ["", "## Settings", "",
              f"- Held out: the last {cfg['holdout_fraction']:.0%} of each dataset's episodes (at least one); "
              f"validation: the last {cfg['val_fraction']:.0%} of the training episodes.",
              f"- Ridge: float64 closed form on standardised inputs, α per frame chosen on the validation split from "
              f"{', '.join(f'{a:g}' for a in cfg['ridge_alphas'])}; fitted on the fitting frames only.",
              f"- MLP: {cfg['hidden']} ReLU hidden units, Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, at most "
              f"{cfg['epochs']} epochs, early stopping (patience {cfg['patience']}) on the validation split, seed "
              f"{cfg['seed']}.",
              f"- Frames: at most {cfg['max_frames']} training and {cfg['max_heldout_frames']} held-out frames per game.",
              f"- Total time {result['seconds']:.1f} s.", ""]
    atomic_write_bytes(path, "\n".join(lines).encode())


def plot_probe(path: Path, result: dict) -> None:
    """Grouped bars of held-out R², one group per game variable, one bar per probe (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels, values = [], []
    for g in result["games"]:
        for v in g["variables"]:
            labels.append(f"{g['game']}\n{v['name']}")
            values.append([v["r2"][p] for p in PROBES])
    arr = np.array([[np.nan if x is None else x for x in row] for row in values], dtype=np.float64).reshape(-1, len(PROBES))
    floor = -0.5
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels) + 1.5), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(PROBES)
    colours = ("#1f77b4", "#6baed6", "#d62728", "#fc9272", "#7f7f7f")
    x = np.arange(len(labels))
    for k, (name, colour) in enumerate(zip(PROBES, colours)):
        ax.bar(x + (k - (len(PROBES) - 1) / 2) * width, np.clip(arr[:, k], floor, None), width,
               label=name.replace("_", " ").replace("mlp", "MLP"), color=colour)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(floor, 1.05)
    ax.set_ylabel(f"held-out R² (clipped at {floor})")
    ax.set_title(f"state probe of tokenizer {result['tokenizer']['id']}", fontsize=10)
    ax.legend(fontsize=7, ncol=len(PROBES), loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
