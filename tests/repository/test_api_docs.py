"""docs/api.md as tests: the API reference and the code's public names agree.

* Every name in a public module's ``__all__`` is listed in that module's section of docs/api.md
  (a section is headed ``## `module` ``), and every section names a module that exists.
* Every entry of a section (a bullet starting with a backticked name) is a public name of it.
* Every public function and class has a docstring; every public function has type hints on each
  parameter and on its return. So do the public methods and properties a public class defines
  (``__init__``: hints only).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from tests.helpers import markdown

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "docs" / "api.md"
SECTION = re.compile(r"^## `([\w.]+)`\s*$", re.MULTILINE)
# An entry: a bullet whose first backticked token is a name, optionally called or dotted.
ENTRY = re.compile(r"^- `([A-Za-z_][\w]*)", re.MULTILINE)


SECTIONS = markdown.sections(API.read_text(encoding="utf-8"), SECTION)


def test_api_md_has_sections():
    assert "avkernels" in SECTIONS and len(SECTIONS) >= 5, sorted(SECTIONS)


@pytest.mark.parametrize("module_name", sorted(SECTIONS))
def test_every_public_name_is_documented(module_name: str):
    module = importlib.import_module(module_name)
    public = getattr(module, "__all__", None)
    assert public, f"{module_name} has no __all__: declare its public names"
    body = SECTIONS[module_name]
    missing = [name for name in public if not re.search(rf"`{re.escape(name)}\b", body)]
    assert not missing, f"docs/api.md, section `{module_name}`, lacks {missing}"


@pytest.mark.parametrize("module_name", sorted(SECTIONS))
def test_every_entry_names_a_public_name(module_name: str):
    module = importlib.import_module(module_name)
    public = set(module.__all__)
    unknown = [name for name in ENTRY.findall(SECTIONS[module_name]) if name not in public]
    assert not unknown, (
        f"docs/api.md, section `{module_name}`, lists names not in __all__: {unknown}"
    )


def _public_objects():
    for module_name in sorted(SECTIONS):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield pytest.param(obj, id=f"{module_name}.{name}")


def _assert_hinted(function) -> None:
    signature = inspect.signature(function)
    unhinted = [
        name
        for name, parameter in signature.parameters.items()
        if parameter.annotation is inspect.Parameter.empty and name not in ("self", "cls")
    ]
    assert not unhinted, f"{function.__qualname__}: parameters without type hints: {unhinted}"
    assert signature.return_annotation is not inspect.Signature.empty, (
        f"{function.__qualname__} has no return type hint"
    )


@pytest.mark.parametrize("obj", list(_public_objects()))
def test_public_objects_have_docstrings_and_hints(obj):
    assert inspect.getdoc(obj), f"{obj.__qualname__} has no docstring"
    if inspect.isfunction(obj):
        _assert_hinted(obj)


def _public_methods():
    seen = set()
    for param in _public_objects():
        (cls,) = param.values
        if not inspect.isclass(cls) or not cls.__module__.startswith("avkernels") or cls in seen:
            continue
        seen.add(cls)
        for name, value in vars(cls).items():
            if name.startswith("_") and name != "__init__":
                continue
            function = value.fget if isinstance(value, property) else value
            function = getattr(function, "__func__", function)  # classmethod, staticmethod
            if inspect.isfunction(function):
                yield pytest.param(function, name == "__init__", id=f"{cls.__qualname__}.{name}")


@pytest.mark.parametrize(("method", "is_init"), list(_public_methods()))
def test_public_methods_have_docstrings_and_hints(method, is_init):
    if not is_init:
        assert method.__doc__, f"{method.__qualname__} has no docstring"
    _assert_hinted(method)
