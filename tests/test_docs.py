"""The documentation cannot rot: the site builds with warnings as errors, the API reference holds
every public name (its pages are what docs/gen_reference.py writes), every public name documents
its arguments and what it returns, and library source carries no measurements. (The pages' Python
snippets run in test_readme.py.)"""
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "docs"))

import _docstyle  # noqa: E402
import gen_reference  # noqa: E402


def test_reference_pages_are_what_the_generator_writes():
    written = gen_reference.pages()
    committed = {p.name: p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")}
    stale = sorted(n for n in set(written) | set(committed) if written.get(n) != committed.get(n))
    assert not stale, f"docs/reference/ is out of date ({stale}): run python docs/gen_reference.py"


def _resolve(identifier: str):
    """The object an entry renders: the longest importable module of the path, then attributes (as
    mkdocstrings reads it: `purenet.optim.kfac` is the module, `purenet.optim.kfac.kfac` the function)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(identifier)


def test_every_public_name_is_in_the_reference():
    """pn.__all__ and the __all__ of every public module object, against the reference's entries."""
    entries = [m.group(1) for page in (ROOT / "docs" / "reference").glob("*.md")
               for m in re.finditer(r"^::: (\S+)$", page.read_text(), flags=re.M)]
    shown = {id(_resolve(e)) for e in entries}
    missing = [name for name, obj in _docstyle.public_names() if id(obj) not in shown]
    assert not missing, f"public names missing from the API reference: {missing}"
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs" / "reference").glob("*.md"))
    assert [p for p in pages if f"reference/{p}" not in nav] == [], "a reference page is not in mkdocs.yml's nav"


def test_every_public_name_documents_its_arguments_and_returns():
    """Google style: Args for every parameter, Returns unless it returns None (tests/_docstyle.py)."""
    problems = _docstyle.problems()
    assert not problems, "\n".join(line for lines in problems.values() for line in lines)


def test_docstyle_reads_google_sections():
    doc = """Summary.

    Args:
        x: the input, (batch, d).
        *rest: more inputs.
          continued line: not an entry.

    Returns:
        y: the output.
    """
    import inspect
    found = _docstyle.sections(inspect.cleandoc(doc))
    assert found == {"Args": ["x", "rest"], "Returns": ["y"]}

    def documented(x: int, *rest: int) -> int:
        """Summary.

        Args:
            x: the input.
            *rest: more.

        Returns:
            x.
        """
        return x

    def undocumented(x: int, y: int) -> int:
        """Summary.

        Args:
            x: the input.
        """
        return x
    assert _docstyle.problems_of("documented", documented) == []
    assert _docstyle.problems_of("undocumented", undocumented) == [
        "undocumented: Args lack ['y']", "undocumented: no Returns section"]


# Benchmark figures: speeds, ratios against another library, timings. They belong in
# benchmarks/README.md (with date, machine and command), not in library source where they rot.
MEASUREMENT = re.compile(r"GFLOP/s|\b\d+(\.\d+)?x (PyTorch|faster|slower|the speed)|\b\d+(\.\d+)? ?(ms|µs)\b"
                         r"|\b\d+(\.\d+)? (seconds|minutes)\b|\d ?% (faster|slower)")


def test_library_source_carries_no_measurements():
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in sorted((ROOT / "purenet").rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if MEASUREMENT.search(line)]
    assert not found, "measurements belong in benchmarks/README.md:\n" + "\n".join(found)


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """`mkdocs build --strict`: broken links or anchors, a page missing from the nav, a docstring that
    names a parameter the signature lacks, a reference to a name that does not exist: each fails it."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed: pip install -e '.[docs]' (the test extra includes it)"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert done.returncode == 0 and not warnings, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "optim" / "index.html").exists()
