"""Selectable sequence cores behind one interface (see base.py)."""

from wam.worldmodel.cores.base import SequenceCore, available_cores, build_core, register_core

__all__ = ["SequenceCore", "available_cores", "build_core", "register_core"]
