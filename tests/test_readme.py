"""Every Python snippet of the README and of the documentation's pages (docs/**/*.md) runs as written,
each on its own (a snippet is self-contained: its imports, its data). A snippet under a
`<!-- test: slow -->` line (one that trains or runs the heavier estimators op by op) is marked slow:
`python -m pytest -m slow` runs it."""
import re
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPET = re.compile(r"(<!-- test: slow -->\n)?```python\n(.*?)```", flags=re.S)
FOUND = [(page.relative_to(ROOT), i, bool(slow), code)
         for page in PAGES for i, (slow, code) in enumerate(SNIPPET.findall(page.read_text()))]
CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes", "jax_enable_x64")


@pytest.mark.parametrize("page, index, code", [
    pytest.param(str(page), i, code, id=f"{page}-{i}", marks=[pytest.mark.slow] if slow else [])
    for page, i, slow, code in FOUND])
def test_snippet_runs(page, index, code):
    saved = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    try:
        exec(compile(code, f"{page} snippet {index}", "exec"), {})
    finally:  # a snippet that switches on the compilation cache or float64 must not leave it on for other tests
        if jax.config.jax_compilation_cache_dir != saved["jax_compilation_cache_dir"]:
            compilation_cache.reset_cache()
        for name, value in saved.items():
            jax.config.update(name, value)


def test_readme_has_snippets():
    assert sum(1 for page, *_ in FOUND if str(page) == "README.md") >= 2
