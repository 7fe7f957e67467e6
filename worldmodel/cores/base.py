"""The interface every sequence core implements, and the registry `build_core` reads.

    core = build_core("transformer" | "mamba" | "mamba2" | "atlas", d_model=..., n_layers=..., **kwargs)
    state = core.init_state(batch_size, device=..., dtype=...)
    y, state = core(x, state=None)        # x: [B, T, D] -> y: [B, T, D]   (parallel / chunked form)
    y_t, state = core.step(x_t, state)    # x_t: [B, D]  -> y_t: [B, D]    (one token)
    state = core.reset_state(state, rows) # rows: [B] bool; those rows become a fresh state

State is an explicit object returned by every call; a core never stores it on `self` and never
mutates a state it was given (it returns a new one), so a caller may keep the old state (planning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from wam.datasets.errors import WamError

_REGISTRY: dict[str, Callable[..., SequenceCore]] = {}


class SequenceCore(nn.Module):
    """Base class of the cores. Subclasses implement `init_state`, `forward`, `step`, `reset_state`."""

    d_model: int
    n_layers: int

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def reset_state(self, state: Any, rows: torch.Tensor) -> Any:
        raise NotImplementedError


def register_core(name: str) -> Callable[[Callable[..., SequenceCore]], Callable[..., SequenceCore]]:
    """Class decorator: make a core buildable by name. Registering a name twice is an error."""

    def deco(cls: Callable[..., SequenceCore]) -> Callable[..., SequenceCore]:
        assert name not in _REGISTRY, f"core {name!r} registered twice"
        _REGISTRY[name] = cls
        return cls

    return deco


def available_cores() -> list[str]:
    _import_builtin_cores()
    return sorted(_REGISTRY)


def core_class(name: str) -> Callable[..., SequenceCore]:
    """The registered class of a core (e.g. to inspect which options it takes); unknown names are a user error."""
    _import_builtin_cores()
    if name not in _REGISTRY:
        raise WamError(f"unknown core {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_core(name: str, d_model: int, n_layers: int, **kwargs: Any) -> SequenceCore:
    """Build a registered core by name; unknown names are a user error listing the known ones."""
    return core_class(name)(d_model=d_model, n_layers=n_layers, **kwargs)


def _import_builtin_cores() -> None:
    import importlib

    for mod in ("transformer", "mamba", "mamba2", "atlas"):
        try:
            importlib.import_module(f"wam.worldmodel.cores.{mod}")
        except ModuleNotFoundError as e:  # a core not written yet
            if e.name != f"wam.worldmodel.cores.{mod}":
                raise
