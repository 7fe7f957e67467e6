"""The architecture of DESIGN.md, enforced: namespace, import direction, Ray-free model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["datasets", "worldmodel", "planning", "agents", "runs"]


def _wam_imports(path: Path) -> set[str]:
    """Top-level wam folders imported by a source file (absolute `wam.<folder>` imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            found.add("..")  # relative import that leaves its folder
        for n in names:
            parts = n.split(".")
            if parts[0] == "wam" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in LAYERS:
                found.add("bare:" + parts[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no sources in {layer}/"
    bad = []
    for f in files:
        for target in _wam_imports(f):
            if target.startswith("bare:"):
                bad.append(f"{f.relative_to(ROOT)} imports top-level {target[5:]!r}; use wam.{target[5:]}")
            elif target == "..":
                bad.append(f"{f.relative_to(ROOT)} uses a relative import that leaves its folder")
            elif target not in allowed:
                bad.append(f"{f.relative_to(ROOT)} imports wam.{target} (to the right of {layer})")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_bad_import(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from wam.agents import thing\nimport datasets.store\n")
    assert _wam_imports(src) == {"agents", "bare:datasets"}


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_worldmodel_import_does_not_import_ray(tmp_path):
    code = (
        "import importlib, pkgutil, sys\n"
        "import wam.worldmodel as w\n"
        "for m in pkgutil.walk_packages(w.__path__, 'wam.worldmodel.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing wam.worldmodel imported Ray: {r.stdout}"


def test_no_top_level_datasets_module(tmp_path):
    code = (
        "import importlib.util, wam.datasets\n"
        "spec = importlib.util.find_spec('datasets')\n"
        "print('none' if spec is None else spec.origin)\n"
        "print(wam.datasets.__name__)\n"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    origin, name = r.stdout.split()
    assert name == "wam.datasets"
    assert origin == "none" or str(ROOT) not in origin, f"installing wam put a top-level `datasets` on the path: {origin}"


def test_no_private_name_is_imported_across_modules():
    """A module's `_private` names are its own: another module that needs one gets a public name instead."""
    crossing = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wam."):
                    crossing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                                 if a.name.startswith("_")]
    assert not crossing, "private names imported across modules:\n" + "\n".join(crossing)
