"""The package's architecture as tests (docs/DESIGN.md, "Layout"): the library never imports the
application, the application uses only the library's public API, there is no import cycle
(imports inside functions count; ``if TYPE_CHECKING:`` imports do not), ``import avkernels``
loads no application or plotting module, and no module outgrows what a reader can navigate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import script_environment

PACKAGE = Path(__file__).resolve().parents[2] / "avkernels"
APP = "avkernels.app"
# Modules allowed over MAX_LINES, each with the reason its parts stay together.
MAX_LINES = 520
LONG_MODULES = {
    # The four entry kernels share one work split and addressing scheme, documented once at
    # the top; the device helpers they share are already in triton_device.py.
    "avkernels.ops.batch_norm.triton_kernels",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path) -> set[str]:
    """Every ``avkernels`` module ``path`` imports, anywhere in the file (functions included),
    except under ``if TYPE_CHECKING:``; ``from a import b`` counts ``a.b`` when it is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    stack = list(ast.parse(path.read_text(), str(path)).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            stack.extend(ast.iter_child_nodes(node))
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def in_app(name: str) -> bool:
    return name == APP or name.startswith(APP + ".")


def test_the_library_never_imports_the_application():
    offenders = {
        name: sorted(filter(in_app, imports))
        for name, imports in GRAPH.items()
        if not in_app(name) and any(map(in_app, imports))
    }
    assert not offenders, f"library modules importing the application: {offenders}"


def test_the_application_uses_only_the_public_api():
    """No ``avkernels._private`` module or ``_name`` from the library in the application."""
    offenders = []
    for name, path in MODULES.items():
        if not in_app(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and not node.level
                and node.module.startswith("avkernels")
                and not in_app(node.module)
            ):
                parts = node.module.split(".") + [alias.name for alias in node.names]
                if any(part.startswith("_") and part != "__version__" for part in parts):
                    offenders.append(
                        f"{name}: from {node.module} import {', '.join(a.name for a in node.names)}"
                    )
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A deferred import that closes a cycle is still found (the check must be able to fail)."""
    module = tmp_path / "avkernels" / "sample.py"
    module.parent.mkdir()
    module.write_text("def late():\n    from avkernels.other import thing\n")
    monkeypatch.setitem(MODULES, "avkernels.other", tmp_path / "other.py")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "avkernels")
    assert imported_modules(module) == {"avkernels.other"}


def test_import_avkernels_loads_no_application_or_plotting_module():
    code = (
        "import sys, avkernels; print(sorted(m for m in sys.modules if m.startswith("
        f"{APP!r}) or m.split('.')[0] in ('matplotlib', 'torchvision', 'torchaudio', "
        "'soundfile', 'PIL')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=script_environment(),
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_navigable(name):
    lines = len(MODULES[name].read_text().splitlines())
    if name in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility"
