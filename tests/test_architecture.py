"""The tree's rules, checked: imports go one way (no cycles) and no module reaches into another
package's private names (`_name`, or a `_module` of another package)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "visionzoo"
TOOL = Path(__file__).parent / "tools" / "import_cycles.py"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _package(module: str, is_pkg: bool) -> str:
    """`visionzoo.tasks.predict` -> `visionzoo.tasks`; top-level modules are their own package."""
    parts = module.split(".")
    return module if is_pkg or len(parts) <= 2 else ".".join(parts[:2])


def private_imports() -> list[str]:
    mods = _modules()
    problems = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = _package(name, is_pkg)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            target_pkg = _package(target, target in mods and mods[target].name == "__init__.py")
            if target_pkg == here or target_pkg.split(".")[:2] == here.split(".")[:2]:
                continue
            private = [p for p in target.split(".")[1:] if p.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            if private:
                problems.append(f"{name} imports {', '.join(private)} from {target}")
    return problems


def test_no_module_imports_a_private_name_of_another_package():
    assert private_imports() == []


def test_no_import_cycles():
    result = subprocess.run([sys.executable, str(TOOL), str(SRC)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
