"""Write the API reference's pages (docs/reference/*.md) from the public surface.

    python docs/gen_reference.py          # rewrite docs/reference/ (run after adding a public name)

One page per public module object (`pn.optim`, `pn.stats`, ...: `tests/_docstyle.public_modules`),
with the module's docstring and every name of its `__all__`, each rendered by mkdocstrings from
its docstring; the top-level `pn` page groups `pn.__all__` by what the names are.
`tests/test_docs.py` checks that the committed pages equal what this writes, so a public name
cannot be missing from the reference.
"""
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _docstyle import public_modules  # noqa: E402

OUT = ROOT / "docs" / "reference"

# The top-level names, grouped by the module that defines them (first match wins).
TOP_GROUPS = [
    ("Layers and containers", lambda m: m.startswith("purenet.layers") and not m.endswith(".roles")),
    ("Models", lambda m: m.startswith("purenet.models")),
    ("The network as functions", lambda m: m in ("purenet.network", "purenet.losses", "purenet.layers.roles",
                                                 "purenet._checks")),
    ("Gradients: per example, checks and interop", lambda m: m.startswith(("purenet.analysis", "purenet.testing"))),
    ("Differential privacy", lambda m: m.startswith("purenet.privacy")),
    ("Training", lambda m: m.startswith("purenet.training")),
    ("Checkpoints and weights", lambda m: m.startswith("purenet.io")),
]


def page_name(where: str) -> str:
    """"pn" -> "pn.md", "pn.analysis.curvature" -> "analysis.curvature.md"."""
    return "pn.md" if where == "pn" else where.removeprefix("pn.") + ".md"


def _entry(module: types.ModuleType, name: str) -> str:
    """The mkdocstrings entry of a name: its path through the module, or where it is defined when a
    submodule has the same name (`pn.optim.kfac` the function, not the module optim/kfac.py)."""
    obj = getattr(module, name)
    package = hasattr(module, "__path__")
    if package and importlib.util.find_spec(f"{module.__name__}.{name}") is not None and hasattr(obj, "__qualname__"):
        return f"::: {obj.__module__}.{obj.__qualname__}\n"
    return f"::: {module.__name__}.{name}\n"


def _summary(module: types.ModuleType) -> str:
    """The module docstring's first paragraph, on one line."""
    paragraph = (module.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines()).replace("|", "\\|")


def module_page(where: str, module: types.ModuleType) -> str:
    """A module object's page: its docstring, then each public name (modules link to their pages)."""
    lines = [f"# {where}\n", f"::: {module.__name__}\n    options:\n      members: false\n      show_root_heading: false\n"]
    names = [n for n in getattr(module, "__all__", []) if not isinstance(getattr(module, n), types.ModuleType)]
    subs = [n for n in getattr(module, "__all__", []) if isinstance(getattr(module, n), types.ModuleType)]
    if subs:
        lines.append("## Modules\n")
        mods = public_modules()
        for n in subs:
            target = next(w for w, m in mods.items() if m is getattr(module, n))
            lines.append(f"- [`{target}`]({page_name(target)}): {_summary(getattr(module, n))}")
        lines.append("")
    for n in names:
        lines.append(_entry(module, n))
    return "\n".join(lines)


def top_page(module: types.ModuleType) -> str:
    """The `pn` page: pn.__all__'s names grouped, and the module objects linked."""
    lines = ["# pn\n", "`import purenet as pn`: the names most programs need. The modules below hold the rest.\n"]
    names = sorted((n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)), key=str.lower)
    placed: set[str] = set()
    for title, belongs in TOP_GROUPS:
        group = [n for n in names if n not in placed and belongs(getattr(getattr(module, n), "__module__", "") or "")]
        if group:
            lines.append(f"## {title}\n")
            lines.extend(_entry(module, n) for n in group)
            placed.update(group)
    rest = [n for n in names if n not in placed]
    if rest:
        lines.append("## Other names\n")
        lines.extend(_entry(module, n) for n in rest)
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """{file name: text} of every reference page, the index included."""
    mods = public_modules()
    out = {page_name(w): (top_page(m) if w == "pn" else module_page(w, m)) for w, m in mods.items()}
    index = ["# API reference\n",
             "Every public name, generated from its docstring: the arguments with their shapes, what it "
             "returns, what it raises, and the math. One page per module object.\n",
             "| module | what it holds |", "|---|---|"]
    index += [f"| [`{w}`]({page_name(w)}) | {_summary(m)} |" for w, m in mods.items()]
    out["index.md"] = "\n".join(index) + "\n"
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    written = pages()
    for stale in OUT.glob("*.md"):
        if stale.name not in written:
            stale.unlink()
    for name, text in written.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(written)} pages to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
