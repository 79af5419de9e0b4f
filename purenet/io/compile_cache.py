"""Switch on JAX's persistent compilation cache, so a second run skips XLA.

Every jitted program (a training epoch, an evaluation, even the small
programs behind eager ops such as `pn.init`) is compiled by XLA the first
time a process meets it: on a small CPU that takes longer than training a
digits-size model (measured in benchmarks/README.md, "Latest results
(CPU)"). With the cache on, compiled
executables are written to a directory keyed by a hash of the program, the
compiler options, the JAX version and the device, and later processes load
them instead of compiling. Tracing still runs; XLA does not.

    import purenet as pn
    pn.enable_compilation_cache()             # ~/.cache/purenet/xla, or $PURENET_COMPILATION_CACHE
    pn.enable_compilation_cache("/scratch/x") # or a directory of your own

Call it once, at the top of a script, before the programs you want cached
are compiled. The cache is safe to share between runs of different code
(entries are keyed by program) and to delete at any time.
"""
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

__all__ = ["ENV_VAR", "default_directory", "enable_compilation_cache"]

ENV_VAR = "PURENET_COMPILATION_CACHE"
"""The environment variable that names the default cache directory."""


def default_directory() -> str:
    """The default cache directory: $PURENET_COMPILATION_CACHE if set, else ~/.cache/purenet/xla.

    Returns:
        The directory, not created: the variable's value as it is, or the
            path under the user's home directory.
    """
    return os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "purenet", "xla")


def enable_compilation_cache(directory: str | os.PathLike[str] | None = None, min_compile_time_s: float = 0.0) -> str:
    """Cache every compiled program of at least `min_compile_time_s` in `directory`; returns the directory.

    JAX's own default caches only programs that took >= 1 s to compile,
    which on a CPU leaves most of a small model's programs uncached: here
    the threshold defaults to 0 and the entry-size floor is off.

    Args:
        directory: where to keep the cache (created if missing; ~ expanded);
            None for `default_directory()`.
        min_compile_time_s: cache only programs whose compilation took at
            least this many seconds (>= 0).

    Returns:
        The cache directory, as an absolute path.

    Raises:
        ValueError: if `min_compile_time_s` is negative.
        OSError: if the directory cannot be created.
        PermissionError: if the directory is not writable.
    """
    directory = os.path.abspath(os.path.expanduser(directory or default_directory()))
    if min_compile_time_s < 0:
        raise ValueError(f"min_compile_time_s must be >= 0, got {min_compile_time_s}")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the compilation cache directory {directory!r}: {e}") from e
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"the compilation cache directory {directory!r} is not writable")
    if jax.config.jax_compilation_cache_dir != directory:  # type: ignore[attr-defined]  # a runtime-set option
        compilation_cache.reset_cache()  # JAX opens its cache once: let it reopen at the new directory
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory
