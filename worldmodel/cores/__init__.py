"""Selectable sequence cores behind one interface (see base.py)."""

from wam.worldmodel.cores.base import SequenceCore, available_cores, build_core, core_class, register_core

__all__ = ["SequenceCore", "available_cores", "build_core", "core_class", "register_core"]
