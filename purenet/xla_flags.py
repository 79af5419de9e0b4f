"""purenet's recommended XLA configuration, applied only when asked, before JAX starts its backend.

    import purenet as pn
    pn.xla_flags.configure()      # first thing in a script: before any JAX computation

XLA reads its flags (the XLA_FLAGS environment variable) once, when JAX
creates its first backend; a library cannot change them behind its user's
back after that, and importing purenet changes nothing. `configure()` adds
purenet's recommended flags to XLA_FLAGS (keeping every flag already there,
and any value the user gave a recommended flag's name), and is an error once
the backend has started. `environ()` gives a subprocess's environment with
the same flags. The examples, the benchmarks and the test suite apply it.

What it sets, and why (each only where the installed jaxlib knows the flag:
XLA aborts the process on an unknown one):

- --xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution:
  keep reductions and convolutions out of YNNPACK on the CPU.
  -reduce, for correctness: jaxlib 0.10.2's XLA:CPU fuses a dot whose
  output keeps the batch as its minor axis with a reduce (the shape of
  jax.vmap(lambda r: jnp.sum((M @ r) ** 2)), a per-example squared norm) and
  silently computes wrong rows once the batch exceeds 16,384 rows in float64
  (32,768 in float32): row 16,384 + j comes back as row 16,320 + j (jax issue
  39103). In purenet it corrupts `pn.stats.gradient_gram` with a large second
  batch (and gives NaN columns for attention with biases from a few thousand
  examples); tests/test_xla_cpu_guard.py checks the pattern and every
  per-example quantity above 16,384 examples.
  -individual_convolution, for speed: XLA's own (Eigen) convolutions run
  the LeNet's 16 -> 32 convolution's forward, dx and dW and its whole step
  markedly faster than YNNPACK's on our shapes (the autoencoder's strided backward
  passes a little slower). Both measured in benchmarks/README.md ("XLA:CPU
  flags" and "XLA:CPU levers per operation").
"""
import functools
import mmap
import os
from pathlib import Path
from typing import Mapping

__all__ = ["RECOMMENDED", "configure", "environ", "merged", "recommended"]

# flag -> why (one clause); `recommended()` keeps the ones the installed jaxlib knows
RECOMMENDED: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_convolution":
        "YNNPACK's reduce fusion miscomputes per-example squared norms above 16,384 rows (jax issue 39103); "
        "XLA's own convolutions are faster on our conv shapes",
}
"""purenet's recommended XLA flags: {flag: why, in one clause}; `recommended()` keeps those the installed
jaxlib knows."""


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


@functools.cache
def _known(name: str) -> bool:
    """Whether the installed jaxlib's XLA defines the flag `name` (its name is in the shared library)."""
    try:
        import jaxlib
    except ImportError:
        return False
    needle = name.lstrip("-").encode()
    for library in sorted(Path(jaxlib.__file__).parent.glob("*.so"), key=lambda p: -p.stat().st_size):
        with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(needle) >= 0:
                return True
    return False


def recommended() -> tuple[str, ...]:
    """The recommended flags (`RECOMMENDED`) that the installed jaxlib knows.

    A flag counts as known when its name appears in one of jaxlib's shared
    libraries (XLA aborts the process on an unknown flag).

    Returns:
        The flags, each "--name=value", in `RECOMMENDED`'s order.
    """
    return tuple(flag for flag in RECOMMENDED if _known(_name(flag)))


def merged(current: str, flags: tuple[str, ...]) -> str:
    """XLA_FLAGS `current` with each of `flags` appended, unless a flag of that name is already set there.

    The user's value wins: a flag whose name `current` sets is not added.

    Args:
        current: an XLA_FLAGS value, flags separated by whitespace ("" for none).
        flags: the flags to add, each "--name" or "--name=value".

    Returns:
        The merged XLA_FLAGS value, stripped.
    """
    present = {_name(f) for f in current.split()}
    extra = [f for f in flags if _name(f) not in present]
    return " ".join([current.strip(), *extra]).strip()


def environ(env: Mapping[str, str] | None = None, flags: tuple[str, ...] | None = None) -> dict[str, str]:
    """A copy of `env` whose XLA_FLAGS also hold `flags`: a subprocess's environment, configured.

    Args:
        env: the environment to copy; None for this process's (`os.environ`).
        flags: the flags to add (see `merged`); None for `recommended()`.

    Returns:
        A new dict, `env` with XLA_FLAGS merged; `env` itself is not changed.
    """
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = merged(env.get("XLA_FLAGS", ""), recommended() if flags is None else flags)
    return env


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another jax: XLA then reads the flags at its first computation
        return False


def configure(flags: tuple[str, ...] | None = None) -> str:
    """Add `flags` (default: `recommended()`) to this process's XLA_FLAGS, before JAX starts its backend.

    Args:
        flags: the flags to add (None: `recommended()`); a flag whose name
            XLA_FLAGS already sets keeps the user's value.

    Returns:
        The XLA_FLAGS now in force.

    Raises:
        RuntimeError: if the flags would change XLA_FLAGS and JAX has already
            created a backend (XLA has read its flags): call configure()
            before the first JAX computation, or set XLA_FLAGS in the
            environment before starting Python.
    """
    value = environ(flags=flags)["XLA_FLAGS"]
    if value == os.environ.get("XLA_FLAGS", "").strip():
        return value
    if _backend_started():
        raise RuntimeError(f"pn.xla_flags.configure() comes too late: JAX has started its backend, and XLA has "
                           f"read its flags. Call it before the first JAX computation, or start Python with "
                           f"XLA_FLAGS={value!r}")
    os.environ["XLA_FLAGS"] = value
    return value
