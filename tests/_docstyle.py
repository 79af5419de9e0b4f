"""The public surface and what its docstrings must hold (Google style), for the API reference.

    python tests/_docstyle.py                      every problem, grouped by the module that defines the name
    python tests/_docstyle.py purenet.optim.base   only the names defined in these modules

Public: every name of `pn.__all__` and of the `__all__` of each public module object in it
(`pn.stats`, `pn.optim`, ...). A function needs a docstring with an `Args:` entry for every
parameter and a `Returns:` (or `Yields:`) section unless it returns None; a class needs a
docstring with an `Args:` or `Attributes:` entry for every constructor parameter. Data (tables,
constants, loss instances) needs only to appear in the reference.
"""
import enum
import inspect
import re
import sys
import types
from typing import Any, Iterator

SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Returns|Yields|Raises|Example|Examples|Note|Notes):\s*$")
ENTRY = re.compile(r"^\s*\**([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?\s*:")


def public_modules() -> dict[str, types.ModuleType]:
    """{"pn.stats": module, ...}: the module objects of pn.__all__ and, below them, of their own
    `__all__` (pn.analysis.curvature), each once, keyed by the shortest way users reach it."""
    import purenet as pn
    out: dict[str, types.ModuleType] = {"pn": pn}
    todo = ["pn"]
    while todo:
        where = todo.pop(0)
        for name in getattr(out[where], "__all__", []):
            obj = getattr(out[where], name)
            if isinstance(obj, types.ModuleType) and obj not in out.values():
                out[f"{where}.{name}"] = obj
                todo.append(f"{where}.{name}")
    return out


def public_names() -> Iterator[tuple[str, Any]]:
    """(the name a user writes, the object) for every public name, each object once."""
    seen: set[int] = set()
    for where, module in public_modules().items():
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{where}.{name}", obj


def sections(doc: str) -> dict[str, list[str]]:
    """{section title: the names its entries define} of a Google-style docstring."""
    out: dict[str, list[str]] = {}
    current, indent = None, -1
    for line in doc.splitlines():
        m = SECTION.match(line)
        if m:
            current, indent = m.group(2), len(m.group(1))
            out.setdefault(current, [])
            continue
        if current is None or not line.strip():
            continue
        own = len(line) - len(line.lstrip())
        if own <= indent:
            current = None
            continue
        entry = ENTRY.match(line)
        if entry and own <= indent + 4:
            out[current].append(entry.group(1))
    return out


def _parameters(obj: Any) -> list[str]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _returns_nothing(fn: Any) -> bool:
    try:
        ann = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return ann is None or ann == "None"


def problems_of(name: str, obj: Any) -> list[str]:
    """What the docstring of one public name lacks."""
    if inspect.isclass(obj):
        doc = inspect.getdoc(obj) or ""
        if not doc or (obj.__doc__ is None and not issubclass(obj, BaseException)):
            return [f"{name}: no docstring"]
        if issubclass(obj, (BaseException, enum.Enum)):
            return []
        found = sections(doc)
        documented = set(found.get("Args", [])) | set(found.get("Arguments", [])) | set(found.get("Attributes", []))
        missing = [p for p in _parameters(obj) if p not in documented]
        return [f"{name}: Args/Attributes lack {missing}"] if missing else []
    if callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        doc = inspect.getdoc(obj) or ""
        if not doc:
            return [f"{name}: no docstring"]
        found = sections(doc)
        out = []
        documented = set(found.get("Args", [])) | set(found.get("Arguments", []))
        missing = [p for p in _parameters(obj) if p not in documented]
        if missing:
            out.append(f"{name}: Args lack {missing}")
        if not _returns_nothing(obj) and "Returns" not in found and "Yields" not in found:
            out.append(f"{name}: no Returns section")
        return out
    return []


def problems(modules: list[str] | None = None) -> dict[str, list[str]]:
    """{defining module: its public names' problems}, for the names defined in `modules` (all if None)."""
    out: dict[str, list[str]] = {}
    for name, obj in public_names():
        home = getattr(obj, "__module__", None) or "?"
        if modules and home not in modules:
            continue
        found = problems_of(name, obj)
        if found:
            out.setdefault(home, []).extend(found)
    return out


if __name__ == "__main__":
    report = problems(sys.argv[1:] or None)
    for module, lines in sorted(report.items()):
        print(f"# {module} ({len(lines)})")
        for line in lines:
            print("   ", line)
    print(sum(len(v) for v in report.values()), "problems")
