"""The `wam` command: one entry point, subcommands, typed configs, presets.

Each leaf command is a function taking one config dataclass. Its field docstrings are the `--help`
text (tyro). A config class that defines `from_preset(name)` accepts `--preset NAME`; the preset gives
the defaults and every field can still be overridden on the command line.

User errors (`WamError`) print one line and exit 2; Ctrl-C exits 130 after the command has saved
what it had.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Sequence

# "words of the command" -> (module, function, one-line summary). Modules import lazily, so
# `wam --help` is instant and a command only pays for the libraries it uses.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data collect": ("wam.runs.data_cmds", "collect", "Collect Atari episodes with Ray workers into an HDF5 dataset."),
    "data info": ("wam.runs.data_cmds", "info", "Summarise datasets: games, episodes, returns, size on disk."),
    "data validate": ("wam.runs.data_cmds", "validate", "Read every chunk of a dataset and report any damage."),
    "data import-dqn-replay": ("wam.runs.data_cmds", "import_dqn_replay", "Import DQN-Replay files for one game."),
    "data import-minari": ("wam.runs.data_cmds", "import_minari", "Import a Minari Atari dataset (210x160 RGB) into wam's format."),
    "data export-minari": ("wam.runs.data_cmds", "export_minari", "Export a wam dataset as a Minari dataset."),
    "demo": ("wam.runs.demo", "demo", "Run the whole pipeline end to end on the debug preset (CPU, minutes)."),
    "recipe": ("wam.runs.recipe", "recipe", "Run the `small` recipe: several seeds, evaluations, checks whether the model learns."),
    "eval": ("wam.runs.eval_cmds", "eval_command", "Evaluate an agent on Atari games with Ray workers (scores, HNS, IQM, CIs)."),
    "plan correct": ("wam.runs.plan_cmds", "correct", "Plan from dataset states on Ray workers; write corrected Q-values (HDF5)."),
    "report": ("wam.runs.report", "report", "Write report.md with tables and plots from eval and run directories."),
    "pretrain": ("wam.runs.train_cmds", "pretrain", "Pretrain the world-action model on trajectories of many games."),
    "finetune": ("wam.runs.train_cmds", "finetune", "Fine-tune a world-action model on a new game (or train it from scratch)."),
    "tokenizer train": ("wam.runs.tokenizer_cmds", "train", "Train the VQ-VAE frame tokenizer (84x84 frame -> 36 tokens)."),
    "tokenizer probe": ("wam.runs.tokenizer_cmds", "probe", "Probe a frozen tokenizer for RAM object coordinates (R² vs pixels)."),
    "tokenize": ("wam.runs.tokenizer_cmds", "tokenize", "Encode every frame of datasets into their token caches."),
    "diagnose": ("wam.runs.diagnose_cmds", "diagnose", "Q of a trained model on real episodes: vs Monte-Carlo returns, action histograms."),
    "baseline train": ("wam.runs.baseline_cmds", "train", "Train d3rlpy's DiscreteCQL / DiscreteBC on wam datasets (a baseline agent for `wam eval`)."),
    "bench": ("wam.runs.bench", "bench", "Run benchmarks and write JSON figures (data, cores, tokenizer, ...)."),
}


def _usage(prefix: str = "") -> str:
    lines = [f"usage: wam {prefix + ' ' if prefix else ''}COMMAND [--help] [OPTIONS]", "", "commands:"]
    for words, (_, _, summary) in COMMANDS.items():
        if words.startswith(prefix):
            lines.append(f"  wam {words:<26} {summary}")
    lines += ["", "Run `wam COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def _find_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The longest registered command made of the leading words of argv."""
    for n in range(min(3, len(argv)), 0, -1):
        words = " ".join(argv[:n])
        if words in COMMANDS:
            return words, list(argv[n:])
    return None, list(argv)


def _config_type(fn) -> type:
    params = list(inspect.signature(fn).parameters.values())
    assert len(params) == 1, f"command {fn.__name__} must take exactly one config argument"
    hints = typing.get_type_hints(fn)
    cls = hints[params[0].name]
    assert dataclasses.is_dataclass(cls), f"command {fn.__name__}: config must be a dataclass"
    return cls


def _preset_default(cls: type, args: list[str]):
    """The preset named by --preset (if the config supports presets), else None."""
    if not hasattr(cls, "from_preset"):
        return None
    name = None
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    return cls.from_preset(name) if name is not None else None


def parse_command(words: str, rest: Sequence[str]):
    """The function of command `words` and its config parsed from `rest` (tyro exits 2 on bad options)."""
    import tyro

    module, fn_name, summary = COMMANDS[words]
    fn = getattr(importlib.import_module(module), fn_name)
    cls = _config_type(fn)
    default = _preset_default(cls, list(rest))
    # Every sequence option is given by repeating its flag (`--data A --data B`), in every command.
    return fn, tyro.cli(cls, args=list(rest), prog=f"wam {words}", description=summary, default=default,
                        config=(tyro.conf.UseAppendAction,))


def run_command(argv: Sequence[str]) -> int:
    from wam.datasets.errors import WamError

    words, rest = _find_command(argv)
    if words is None:
        groups = {w.split()[0] for w in COMMANDS if " " in w}
        if argv and argv[0] in groups:
            if len(argv) > 1 and argv[1] not in ("-h", "--help"):
                print(_usage(argv[0]), file=sys.stderr)
                print(f"\nwam: error: unknown command 'wam {argv[0]} {argv[1]}'", file=sys.stderr)
                return 2
            print(_usage(argv[0]))
            return 0
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        if argv[0] == "--version":
            from importlib.metadata import version

            print(f"wam {version('wam')}")
            return 0
        print(_usage(), file=sys.stderr)
        print(f"\nwam: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2

    try:
        fn, cfg = parse_command(words, rest)
        result = fn(cfg)
    except WamError as e:
        print(f"wam {words}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nwam {words}: interrupted; finished work was saved.", file=sys.stderr)
        return 130
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run_command(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # e.g. `wam data info --json | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
