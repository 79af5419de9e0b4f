"""The README's Python snippets run as written. A snippet under a `<!-- test: slow -->` line (one that
trains or runs the heavier estimators op by op) is marked slow: `python -m pytest -m slow` runs it."""
import re
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FOUND = re.findall(r"(<!-- test: slow -->\n)?```python\n(.*?)```", README, flags=re.S)
SNIPPETS = [code for _, code in FOUND]


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


@pytest.mark.parametrize("index", [pytest.param(i, marks=[pytest.mark.slow] if slow else [])
                                   for i, (slow, _) in enumerate(FOUND)])
def test_readme_snippet_runs(index):
    saved = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    try:
        exec(compile(SNIPPETS[index], f"README snippet {index}", "exec"), {})
    finally:  # a snippet that switches on the compilation cache must not leave it on for other tests
        if jax.config.jax_compilation_cache_dir != saved["jax_compilation_cache_dir"]:
            compilation_cache.reset_cache()
        for name, value in saved.items():
            jax.config.update(name, value)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2
