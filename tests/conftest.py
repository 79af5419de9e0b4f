"""Shared test setup: float64 on, purenet's recommended XLA flags (`pn.xla_flags`), hypothesis profiles.

Profiles (choose with PURENET_HYPOTHESIS_PROFILE): "ci" (default, sized for a
few minutes on 2 cores) and "slow" (many more examples).
"""
import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

import purenet  # noqa: E402  (after x64 is on, as every test module imports it)

purenet.xla_flags.configure()  # before any computation; subprocesses: purenet.xla_flags.environ(...)

settings.register_profile(
    "ci", max_examples=50, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow", max_examples=1000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("PURENET_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def scaled(n):
    """A test's own example count, ten times more under the slow profile (like the profiles' default)."""
    return n * 10 if PROFILE == "slow" else n


def pytest_collection_modifyitems(items):
    """The tests marked slow run first (a stable sort), so pytest-xdist spreads them over the
    workers while the short ones fill in at the end, instead of one long test finishing alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
